"""Teacher contexts: the right hint reaches the right group, for every strategy."""

import random

import pytest
from transformers import AutoTokenizer

from cepo.contexts import (NATURAL_HINT_TEMPLATE, build_contexts, choose_wrong_answers,
                           render_prompt)
from tiny_lm import make_tokenizer


def r(answer, correct, reward=None):
    return {"answer": answer, "correct": correct, "reward": float(correct) if reward is None else reward}


GROUPS = [
    [r("7", True), r("8", False, 0.1), r("9", False, 0.0), r("9", False, 0.0)],   # several wrong
    [r("5", True), r("5", True)],                                                  # all correct
    [r(None, False), r("3", True)],                                                # wrong, no answer
    [r("1 2", False, 0.2), r("4", False, 0.2), r("12", False, 0.2), r("6", True)],  # ties
]


def test_worst():
    assert choose_wrong_answers(GROUPS, "worst", random.Random(0)) == ["9", None, None, "1 2"]


def test_most_frequent():
    # group 0: "9" twice; group 3: "1 2" and "12" are the same answer without spaces
    assert choose_wrong_answers(GROUPS, "most_frequent", random.Random(0)) == ["9", None, None, "1 2"]


def test_random_is_reproducible_and_covers_choices():
    picks = {choose_wrong_answers(GROUPS[:1], "random", random.Random(s))[0] for s in range(30)}
    assert picks == {"8", "9"}
    a = choose_wrong_answers(GROUPS, "random", random.Random(5))
    assert a == choose_wrong_answers(GROUPS, "random", random.Random(5))
    assert a[1] is None and a[2] is None


def test_unknown_strategy():
    with pytest.raises(ValueError, match="wrong_answer_strategy"):
        choose_wrong_answers(GROUPS, "best", random.Random(0))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def test_contexts_carry_the_right_hints(tokenizer):
    prompts, answers = ["(1+2)*3", "4-1"], ["9", "3"]
    wrong = ["8", None]
    pol, pos, neg = build_contexts(tokenizer, prompts, answers, wrong)
    dec = lambda ids: tokenizer.decode(ids)  # noqa: E731
    assert dec(pol[0]) == "<|user|>(1+2)*3<|assistant|>"
    assert dec(pos[0]) == "<|user|>(1+2)*3\n\n9<|assistant|>"
    assert dec(neg[0]) == "<|user|>(1+2)*3\n\n8<|assistant|>"
    assert dec(pos[1]) == "<|user|>4-1\n\n3<|assistant|>" and neg[1] is None
    _, pos_nl, _ = build_contexts(tokenizer, prompts[:1], answers[:1], [None], NATURAL_HINT_TEMPLATE)
    assert "A reference answer: 9." in dec(pos_nl[0])


def test_render_prompt_without_chat_template(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    plain = AutoTokenizer.from_pretrained(tmp_path)
    plain.chat_template = None
    ids = render_prompt(plain, "2+2", "4")
    assert plain.decode(ids) == "2+2\n\n4\n"
    with_template = render_prompt(tokenizer, "2+2")
    assert tokenizer.decode(with_template).count("<|user|>") == 1  # no duplicated specials
