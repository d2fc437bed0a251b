"""Hand-written verdicts: what counts as the final answer, and what it matches.

Each row is (response, gold, mode, correct, status); the expected verdicts were written
by hand from the rules (strict last-complete-box extraction, hedged answers never match
one gold value, structural limits), not computed. The whole table is also scored once
through a worker pool, which must agree row by row.
"""

import pytest

from cepo.verifier import STATUSES, Verifier, score_one

B = "boxed"
TABLE = [
    # restating the question without a box earns nothing
    ("She has 45 - 11 cookies left.", "34", B, False, "unparseable"),
    ("The answer is 34 or 29", "34", B, False, "unparseable"),
    ("Anna has 30 pencils and 60 more", "60", B, False, "unparseable"),
    ("34", "34", B, False, "unparseable"),
    ("The answer is $34$.", "34", B, False, "unparseable"),
    ("", "34", B, False, "unparseable"),
    ("so 45 - 11 = 34", "34", B, False, "unparseable"),
    # several candidates in the box never match one gold value
    ("\\boxed{34 or 29}", "34", B, False, "wrong"),
    ("\\boxed{34 \\text{ or } 29}", "34", B, False, "wrong"),
    ("\\boxed{29 \\text{ or } 34}", "34", B, False, "wrong"),
    ("\\boxed{\\{29, 34\\}}", "34", B, False, "wrong"),
    ("\\boxed{34, 29}", "34", B, False, "wrong"),
    ("\\boxed{34 \\lor 29}", "34", B, False, "wrong"),
    ("\\boxed{34 \\lor 29}", "29", B, False, "wrong"),
    ("\\boxed{34 \\vee 29}", "29", B, False, "wrong"),
    ("\\boxed{\\pm 3}", "3", B, False, "wrong"),
    ("\\boxed{34; 29}", "34", B, False, "wrong"),
    ("\\boxed{34 and 29}", "34", B, False, "wrong"),
    ("\\boxed{x = 34 \\text{ or } x = 29}", "34", B, False, "wrong"),
    ("\\boxed{34 \\text{ or } 34}", "34", B, False, "wrong"),
    # ... while a set, interval or tuple gold is matched as math-verify matches it
    ("\\boxed{\\{2, 1\\}}", "\\{1, 2\\}", B, True, "ok"),
    ("\\boxed{2, 1}", "1, 2", B, True, "ok"),
    ("\\boxed{(1, 2]}", "(1, 2]", B, True, "ok"),
    ("\\boxed{[1, 2)}", "(1, 2]", B, False, "wrong"),
    ("\\boxed{\\{1, 2, 3\\}}", "\\{1, 2\\}", B, False, "wrong"),
    ("\\boxed{\\pm 3}", "\\pm 3", B, True, "ok"),
    # several boxes: the last complete one is the answer
    ("\\boxed{29} no wait, \\boxed{34}", "34", B, True, "ok"),
    ("\\boxed{34} no wait, \\boxed{29}", "34", B, False, "wrong"),
    ("\\boxed{34} so \\boxed{34}", "34", B, True, "ok"),
    ("The answer is 34, \\boxed{29}", "34", B, False, "wrong"),
    # a truncated box is no answer; an earlier complete one still is
    ("so the answer is \\boxed{3", "34", B, False, "unparseable"),
    ("\\boxed{\\frac{1}{2}", "\\frac{1}{2}", B, False, "unparseable"),
    ("\\boxed{34} hmm, actually \\boxed{2", "34", B, True, "ok"),
    # nested braces
    ("\\boxed{\\frac{1}{2}}", "0.5", B, True, "ok"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", B, True, "ok"),
    ("\\boxed{{34}}", "34", B, True, "ok"),
    ("\\boxed{\\boxed{34}}", "34", B, True, "ok"),
    ("\\fbox{34}", "34", B, True, "ok"),
    ("$\\boxed{34}$.", "34", B, True, "ok"),
    # fractions
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", B, True, "ok"),
    ("\\boxed{3/4}", "\\frac{3}{4}", B, True, "ok"),
    ("\\boxed{0.75}", "\\frac{3}{4}", B, True, "ok"),
    ("\\boxed{\\frac{4}{3}}", "\\frac{3}{4}", B, False, "wrong"),
    ("\\boxed{\\frac{6}{8}}", "0.75", B, True, "ok"),
    # negative numbers and decimals
    ("\\boxed{-12}", "-12", B, True, "ok"),
    ("\\boxed{12}", "-12", B, False, "wrong"),
    ("\\boxed{-\\frac{1}{2}}", "-0.5", B, True, "ok"),
    ("\\boxed{34.0}", "34", B, True, "ok"),
    ("\\boxed{1,234}", "1234", B, True, "ok"),
    # whitespace
    ("\\boxed{ 34 }", "34", B, True, "ok"),
    ("\\boxed{\n34\n}", "34", B, True, "ok"),
    ("\\boxed{}", "34", B, False, "unparseable"),
    ("\\boxed{   }", "34", B, False, "unparseable"),
    # LaTeX text wrappers and units
    ("\\boxed{\\text{34}}", "34", B, True, "ok"),
    ("\\boxed{34 \\text{ cookies}}", "34", B, True, "ok"),
    ("\\boxed{34 \\text{ cm}}", "34", B, True, "ok"),
    ("\\boxed{34\\,\\mathrm{cm}}", "34", B, True, "ok"),
    ("\\boxed{x = 34}", "34", B, True, "ok"),
    ("\\boxed{50\\%}", "50\\%", B, True, "ok"),
    ("\\boxed{\\sqrt{2}}", "\\sqrt{2}", B, True, "ok"),
    ("\\boxed{1.41}", "\\sqrt{2}", B, False, "wrong"),
    ("\\boxed{\\pi}", "\\pi", B, True, "ok"),
    ("\\boxed{3.14}", "\\pi", B, False, "wrong"),
    # refused before parsing
    ("\\boxed{9^{9^{9}}}", "34", B, False, "too_complex"),
    ("\\boxed{(10^{6})!}", "34", B, False, "too_complex"),
    ("\\boxed{" + "1" * 2000 + "}", "34", B, False, "too_long"),
    ("x" * 600_000 + "\\boxed{34}", "34", B, False, "too_long"),
    # opt-in modes
    ("She has 45 - 11 cookies left.", "34", "last_number", False, "wrong"),
    ("so 45 - 11 = 34 cookies", "34", "last_number", True, "ok"),
    ("The answer is 34 or 29", "34", "last_number", False, "wrong"),
    ("no digits here", "34", "last_number", False, "unparseable"),
    ("it costs 1,234 dollars", "1234", "last_number", True, "ok"),
    ("She has 45 - 11 cookies left.", "34", "math_verify", True, "ok"),  # gameable: opt-in
]


def _ids():
    return [f"{i}-{mode}-{r[:24]!r}" for i, (r, _, mode, _, _) in enumerate(TABLE)]


def test_table_is_big_enough_and_uses_known_statuses():
    assert len(TABLE) >= 50
    assert {status for *_, status in TABLE} <= set(STATUSES)


@pytest.mark.parametrize("response,gold,mode,correct,status", TABLE, ids=_ids())
def test_verdict(response, gold, mode, correct, status):
    s = score_one(response, gold, answer_extraction=mode)
    assert (s.correct, s.status) == (correct, status), s
    assert s.reward == (1.0 if correct else 0.0)


@pytest.fixture(scope="module")
def pool():
    with Verifier(timeout_s=10, num_workers=2) as v:
        yield v


def test_pool_agrees_with_the_table(pool):
    rows = [row for row in TABLE if row[2] == "boxed"]
    scores = pool.score([r for r, *_ in rows], [g for _, g, *_ in rows])
    assert [(s.correct, s.status) for s in scores] == [(c, st) for *_, c, st in rows]
    stats = pool.stats()
    assert stats["too_long"] == 2 and stats["too_complex"] == 2


def test_extracted_answer_is_reported():
    assert score_one("so \\boxed{29} no, \\boxed{ 34 }", "34").extracted == "34"
    assert score_one("no box at all", "34").extracted is None
    assert score_one("\\boxed{34 or 29}", "34").extracted == "34 or 29"
    long = score_one("\\boxed{" + "1" * 5000 + "}", "34")
    assert long.status == "too_long" and 1000 <= len(long.extracted) < 1010
