"""cepo.integrations.cepo_batch: CEPO's pieces on another trainer's batch (no TRL needed)."""

import math

import pytest

from cepo.contexts import NATURAL_HINT_TEMPLATE, hinted_prompt
from cepo.integrations.cepo_batch import (CEPOOptions, completion_text, hinted_trl_prompt,
                                          wrong_answers_per_rollout)


def test_hint_goes_into_the_last_user_message_like_hinted_prompt():
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3*4"},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": "(7+5)*3"}]
    out = hinted_trl_prompt(chat, "36", NATURAL_HINT_TEMPLATE)
    assert out[-1]["content"] == hinted_prompt("(7+5)*3", "36", NATURAL_HINT_TEMPLATE)
    assert out[:-1] == chat[:-1]
    assert chat[-1]["content"] == "(7+5)*3"  # the batch's prompt is left alone
    assert hinted_trl_prompt("1+1", "2", "{answer}") == hinted_prompt("1+1", "2", "{answer}")


@pytest.mark.parametrize("prompt, match", [
    ([{"role": "user", "content": [{"type": "text", "text": "x"}]}], "multimodal"),
    ([{"role": "system", "content": "s"}], "no"),
    ([], "non-empty"),
])
def test_hint_on_unsupported_prompts_raises(prompt, match):
    with pytest.raises(ValueError, match=match):
        hinted_trl_prompt(prompt, "1", "{answer}")


def test_wrong_answer_per_rollout_follows_choose_wrong_answers():
    completions = ["\\boxed{5}", "\\boxed{7}", "\\boxed{9}", "no box",     # group 0, gold 5
                   "\\boxed{3}", "\\boxed{3}", "\\boxed{3}", "\\boxed{3}",  # group 1: all correct
                   "\\boxed{4}", "\\boxed{8}", "\\boxed{4}", "\\boxed{8}"]  # group 2, gold 8
    rewards = [1.0, 0.0, 0.1, 0.0, 1.0, 1.0, 1.2, 1.0, 0.0, 1.0, float("nan"), 0.5]
    golds = ["5"] * 4 + ["3"] * 4 + ["8"] * 4
    wrong = wrong_answers_per_rollout(completions, rewards, golds, 4, options=CEPOOptions())
    # group 0: worst reward among rejected answers (9 has 0.1, 7 has 0.0); group 1 none;
    # group 2: the NaN (unscorable) rollout is no candidate, "8" equals gold though rejected
    assert wrong == ["7"] * 4 + [None] * 4 + ["4"] * 4
    assert math.isnan(rewards[10])
    strict = CEPOOptions(correct_threshold=1.1)
    wrong = wrong_answers_per_rollout(completions, rewards, golds, 4, options=strict)
    assert wrong[4] is None  # every rejected "3" equals the gold: skipped


def test_custom_extractor_and_message_completions():
    options = CEPOOptions(answer_extractor=lambda text: text.split("=")[-1].strip() or None)
    completions = [[{"role": "assistant", "content": "x = 4"}], [{"role": "assistant", "content": "x = 5"}]]
    texts = [completion_text(c) for c in completions]
    assert wrong_answers_per_rollout(texts, [0.0, 1.0], ["5", "5"], 2, options=options) == ["4", "4"]


def test_bad_group_shapes_raise():
    with pytest.raises(ValueError, match="groups of 4"):
        wrong_answers_per_rollout(["a"] * 6, [0.0] * 6, ["1"] * 6, 4, options=CEPOOptions())


@pytest.mark.parametrize("kwargs, field", [
    (dict(lambda0=-0.1), "cepo_lambda0"), (dict(eps_w=2.0), "cepo_eps_w"),
    (dict(schedule="step"), "cepo_schedule"), (dict(algo="grpo"), "cepo_algo"),
    (dict(wrong_answer_strategy="best"), "cepo_wrong_answer_strategy"),
    (dict(hint_template="no field"), "hint_template"),
])
def test_options_name_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CEPOOptions(**kwargs)


def test_lambda_schedule_and_enabled():
    assert not CEPOOptions().enabled
    options = CEPOOptions(lambda0=0.5, t_warm=4)
    assert options.enabled
    assert [options.lam(s) for s in range(5)] == pytest.approx([0.5, 0.375, 0.25, 0.125, 0.0])
    assert CEPOOptions(lambda0=0.5, schedule="constant").lam(100) == 0.5


def test_answer_extraction_modes():
    from cepo import answers

    boxed = CEPOOptions().answer_extractor
    assert boxed("so 3+4=7 and \\boxed{7} then 9") == "7"
    assert boxed("no box, 12") is None
    with pytest.raises(ValueError, match="cepo_answer_extraction"):
        CEPOOptions(answer_extraction="first_word")
    if not hasattr(answers, "extract_answer"):
        pytest.skip("cepo.answers.extract_answer is not in this checkout: only 'boxed' exists")
    last = CEPOOptions(answer_extraction="last_number").answer_extractor
    assert last("no box, 12") == answers.extract_answer("no box, 12", "last_number")
    wrong = wrong_answers_per_rollout(["it is 4", "it is 5"], [0.0, 1.0], ["5", "5"], 2,
                                      options=CEPOOptions(answer_extraction="last_number"))
    assert wrong == ["4", "4"]
