"""The verifier: real math-verify, plug-ins, and hangs / crashes that never stall a step."""

import os
import sys
import time

import pytest

from cepo.verifier import Verifier, score_one

sys.path.insert(0, os.path.dirname(__file__))
os.environ["PYTHONPATH"] = os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", "")


@pytest.mark.parametrize("response,answer,correct,status", [
    ("so 3+4=7\n\\boxed{7}", "7", True, "ok"),
    ("\\boxed{0.5}", "\\frac{1}{2}", True, "ok"),
    ("\\boxed{\\frac{1}{2}}", "0.5", True, "ok"),
    ("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", True, "ok"),
    ("The answer is $33$.", "33", False, "unparseable"),  # strict: no box, no answer
    ("\\boxed{34}", "33", False, "wrong"),
    ("\\boxed{-12}", "-12", True, "ok"),
    ("I do not know", "33", False, "unparseable"),
])
def test_math_verify_cases(response, answer, correct, status):
    s = score_one(response, answer)
    assert (s.correct, s.status) == (correct, status)
    assert s.reward == (1.0 if correct else 0.0)


def test_opt_in_modes_find_unboxed_answers():
    s = score_one("The answer is $33$.", "33", answer_extraction="math_verify")
    assert (s.correct, s.status, s.extracted) == (True, "ok", "33")
    s = score_one("so it is 33 apples", "33", answer_extraction="last_number")
    assert (s.correct, s.status, s.extracted) == (True, "ok", "33")
    with pytest.raises(ValueError, match="answer_extraction"):
        score_one("\\boxed{1}", "1", answer_extraction="first_box")


def test_format_reward():
    assert score_one("\\boxed{34}", "33", format_reward=0.1).reward == pytest.approx(0.1)
    assert score_one("\\boxed{33}", "33", format_reward=0.1).reward == pytest.approx(1.1)
    assert score_one("33", "33", format_reward=0.1).reward == 0.0  # no box: unparseable
    assert score_one("\\boxed{ }", "33", format_reward=0.1).reward == 0.0  # an empty box
    assert score_one("33", "33", format_reward=0.1, answer_extraction="last_number").reward == 1.0
    refused = score_one("\\boxed{9^{9^{9}}}", "33", format_reward=0.1)
    assert (refused.status, refused.reward) == ("too_complex", 0.0)  # no format term


def test_pool_scores_in_order():
    with Verifier(timeout_s=10, num_workers=2) as v:
        scores = v.score(["\\boxed{1}", "\\boxed{2}", "x", "\\boxed{4}"], ["1", "3", "3", "4"])
        assert [s.status for s in scores] == ["ok", "wrong", "unparseable", "ok"]
        assert v.stats()["ok"] == 2 and v.stats()["unparseable"] == 1


def test_plugin_reward():
    with Verifier(timeout_s=10, num_workers=1, reward_fn="plugins_for_tests:length_reward") as v:
        scores = v.score(["it is 5", "no"], ["5", "5"])
    assert [(s.reward, s.correct) for s in scores] == [(1.0, True), (0.25, False)]


def test_hanging_plugin_times_out_and_the_rest_are_scored():
    with Verifier(timeout_s=1.0, num_workers=2, reward_fn="plugins_for_tests:hang") as v:
        t0 = time.monotonic()
        scores = v.score(["hang", "a 1", "hang", "b 2", "c"], ["1", "1", "1", "2", "9"])
        elapsed = time.monotonic() - t0
        assert [s.status for s in scores] == ["timeout", "ok", "timeout", "ok", "wrong"]
        assert elapsed < 6
        assert v.stats()["timeout"] == 2
        assert v.score(["x 3"], ["3"])[0].correct  # the pool recovered


def test_crashing_plugin_scores_error_and_recovers():
    with Verifier(timeout_s=10, num_workers=1, reward_fn="plugins_for_tests:crash") as v:
        scores = v.score(["crash", "ok 4", "exit", "ok 5"], ["4", "4", "4", "5"])
        assert [s.status for s in scores] == ["error", "ok", "error", "ok"]
        assert all(s.reward == 0 for s in scores if s.status == "error")


def test_bad_plugin_spec():
    with pytest.raises(ValueError, match="module:function"):
        Verifier(reward_fn="no_colon")
    with pytest.raises(ValueError, match="cannot import"):
        Verifier(reward_fn="no_such_module_xyz:f")
