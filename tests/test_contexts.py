"""Teacher contexts: the right hint reaches the right group, for every strategy, and the
three contexts render through the chat template (or plain text) without duplicated BOS."""

import random

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from cepo.contexts import (ANSWER_ONLY_TEMPLATE, NATURAL_HINT_TEMPLATE, build_contexts,
                           choose_wrong_answers, hinted_prompt, render_prompt)
from tiny_lm import CHARS, make_tokenizer


def r(answer, correct, reward=None):
    return {"answer": answer, "correct": correct,
            "reward": float(correct) if reward is None else reward}


GROUPS = [
    [r("7", True), r("8", False, 0.1), r("9", False, 0.0), r("9", False, 0.0)],    # several wrong
    [r("5", True), r("5", True)],                                                  # all correct
    [r(None, False), r("3", True), r("  ", False)],                               # wrong, no answer
    [r("1 2", False, 0.2), r("4", False, 0.2), r("12", False, 0.2), r("6", True)],  # ties
    [r("4", False, 0.1), r("5", False, 0.1), r("5", False, 0.3), r("4", False, 0.3)],  # 2-2 tie
]


def test_worst_is_the_lowest_reward_first_in_order():
    got = choose_wrong_answers(GROUPS, "worst", random.Random(0))
    assert got == ["9", None, None, "1 2", "4"]


def test_most_frequent_after_normalisation_ties_first_seen():
    # group 0: "9" twice; group 3: "1 2" and "12" are one answer once spaces go;
    # group 4: "4" and "5" twice each, "4" seen first
    got = choose_wrong_answers(GROUPS, "most_frequent", random.Random(0))
    assert got == ["9", None, None, "1 2", "4"]


def test_random_is_reproducible_and_covers_choices():
    picks = {choose_wrong_answers(GROUPS[:1], "random", random.Random(s))[0] for s in range(40)}
    assert picks == {"8", "9"}
    a = choose_wrong_answers(GROUPS, "random", random.Random(5))
    assert a == choose_wrong_answers(GROUPS, "random", random.Random(5))
    assert a[1] is None and a[2] is None and a[3] in {"1 2", "4", "12"}


def test_random_accepts_a_torch_generator():
    draw = lambda s: choose_wrong_answers(  # noqa: E731
        GROUPS, "random", torch.Generator().manual_seed(s))
    assert draw(3) == draw(3)
    assert {draw(s)[3] for s in range(40)} == {"1 2", "4", "12"}
    with pytest.raises(ValueError, match="needs rng"):
        choose_wrong_answers(GROUPS, "random", None)


def test_no_wrong_answer_gives_none_for_every_strategy():
    groups = [[r("5", True)] * 3, [r(None, False, 0.0), r("2", True)], []]
    for strategy in ("worst", "most_frequent", "random"):
        assert choose_wrong_answers(groups, strategy, random.Random(0)) == [None, None, None]


def test_rejected_rollouts_carrying_the_gold_answer_are_skipped():
    # a rollout rejected for its format (or a verifier timeout) can hold the right answer
    group = [r("1/2", False, -0.5), r("0.75", False, 0.0), r("1 / 2", False, -0.5)]
    assert choose_wrong_answers([group], "worst", gold_answers=["1/2"]) == ["0.75"]
    assert choose_wrong_answers([group], "most_frequent", gold_answers=["1/2"]) == ["0.75"]
    assert choose_wrong_answers([group[::2]], "worst", gold_answers=["1/2"]) == [None]
    assert choose_wrong_answers([group], "worst") == ["1/2"]
    with pytest.raises(ValueError, match="gold_answers"):
        choose_wrong_answers([group], "worst", gold_answers=["1", "2"])


def test_bad_strategy_and_rollouts_are_named():
    with pytest.raises(ValueError, match="wrong_answer_strategy"):
        choose_wrong_answers(GROUPS, "best", random.Random(0))
    with pytest.raises(ValueError, match="'reward'"):
        choose_wrong_answers([[{"answer": "1", "correct": False}]], "worst")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def test_contexts_carry_the_right_hints(tokenizer):
    prompts, answers, wrong = ["(1+2)*3", "4-1", "2*2"], ["9", "3", "4"], ["8", None, "5"]
    pol, pos, neg = build_contexts(tokenizer, prompts, answers, wrong)
    dec = tokenizer.decode
    assert [dec(p) for p in pol] == [f"<|user|>{p}<|assistant|>" for p in prompts]
    assert [dec(p) for p in pos] == [f"<|user|>{p}\n\n{a}<|assistant|>"
                                     for p, a in zip(prompts, answers)]
    assert dec(neg[0]) == "<|user|>(1+2)*3\n\n8<|assistant|>" and neg[1] is None
    assert dec(neg[2]) == "<|user|>2*2\n\n5<|assistant|>"
    assert pol[0] == render_prompt(tokenizer, prompts[0])  # what the sampler was given


def test_natural_template_is_neutral_and_only_in_teachers(tokenizer):
    pol, pos, neg = build_contexts(tokenizer, ["2*5"], ["10"], ["12"], NATURAL_HINT_TEMPLATE)
    text = [tokenizer.decode(x[0]) for x in (pol, pos, neg)]
    assert "reference answer" not in text[0] and "10" not in text[0]
    assert "A reference final answer is 10." in text[1] and "A reference final answer is 12." in text[2]
    # same framing for right and wrong: the texts differ only in the answer itself
    assert text[1].replace("10", "X") == text[2].replace("12", "X")
    assert "correct" not in NATURAL_HINT_TEMPLATE.lower() and "wrong" not in NATURAL_HINT_TEMPLATE


def test_hint_template_is_validated(tokenizer):
    assert hinted_prompt("p", "\\frac{1}{2}") == "p\n\n\\frac{1}{2}"  # braces in answers are fine
    assert hinted_prompt("p", "7", "\\boxed{{{answer}}}") == "p\n\n\\boxed{7}"
    assert hinted_prompt("p", None, NATURAL_HINT_TEMPLATE) == "p"
    for bad in ("no field", "{answer} {other}", "{0}", "{answer"):
        with pytest.raises(ValueError, match="hint_template"):
            build_contexts(tokenizer, ["p"], ["1"], [None], bad)
    with pytest.raises(ValueError, match="one entry per group"):
        build_contexts(tokenizer, ["p", "q"], ["1"], [None], ANSWER_ONLY_TEMPLATE)


def test_render_prompt_without_chat_template(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    plain = AutoTokenizer.from_pretrained(tmp_path)
    plain.chat_template = None
    assert plain.decode(render_prompt(plain, "2+2", "4")) == "2+2\n\n4\n"
    assert plain.decode(render_prompt(plain, "2+2")) == "2+2\n"


def bos_tokenizer(chat_template):
    """A tokenizer that adds <s> ... </s> when asked for special tokens (Llama-like)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
    vocab = {t: i for i, t in enumerate(specials + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>",
                                   additional_special_tokens=["<|user|>", "<|assistant|>"])
    fast.chat_template = chat_template
    return fast


def test_bos_appears_once_and_eos_never():
    template = ("{{ bos_token }}{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok = bos_tokenizer(template)
    ids = render_prompt(tok, "1+1", "2")
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert tok.eos_token_id not in ids
    assert tok.decode(ids) == "<s><|user|>1+1\n\n2<|assistant|>"
    tok.chat_template = None  # plain text: the tokenizer's BOS, without its trailing EOS
    ids = render_prompt(tok, "1+1")
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.eos_token_id not in ids and tok.decode(ids) == "<s>1+1\n"
