"""Answer extraction (strict by default) and the structural limits applied before parsing."""

import pytest

from cepo.answers import (ANSWER_EXTRACTION_MODES, MAX_ANSWER_CHARS, answer_limits,
                          extract_answer, extract_boxed, extract_last_number, has_disjunction)


@pytest.mark.parametrize("text,expected", [
    ("\\boxed{34}", "34"),
    ("a \\boxed{1} b \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\boxed{3}}", "3"),
    ("\\boxed{1} then \\boxed{2", "1"),            # truncated last box: the earlier one
    ("\\boxed{3", None),
    ("no box", None),
    ("}} \\boxed{ 7 } {", "7"),                     # stray braces around are harmless
    ("\\fbox{5} and \\boxed{6}", "6"),
    ("\\boxed{6} and \\fbox{5}", "5"),
    ("\\boxed{a{b}c}", "a{b}c"),
    ("\\boxed{}", ""),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("She has 45 - 11 cookies left.", "11"),
    ("costs 1,234 dollars, then 5", "5"),
    ("it costs 1,234", "1234"),
    ("The total is 1,234, which is even", "1234"),
    ("so 10-3", "3"),
    ("so x = -3", "-3"),
    ("1," * 50_000 + "7", "7"),
    ("-12.5 degrees", "-12.5"),
    ("1/2", "2"),
    ("50%", "50"),
    ("so x=3.", "3"),
    ("34, 29", "29"),
    ("none", None),
])
def test_extract_last_number(text, expected):
    assert extract_last_number(text) == expected
    assert extract_answer(text, "last_number") == expected


def test_math_verify_mode_finds_expressions_anywhere():
    assert extract_answer("The answer is $33$.", "math_verify") == "33"
    assert extract_answer("nothing here", "math_verify") is None


def test_unknown_mode_is_a_clear_error():
    assert ANSWER_EXTRACTION_MODES == ("boxed", "last_number", "math_verify")
    with pytest.raises(ValueError, match="answer_extraction must be one of"):
        extract_answer("\\boxed{1}", "first_box")


@pytest.mark.parametrize("answer,hedged", [
    ("34 or 29", True), ("34 \\lor 29", True), ("29 \\text{ or } 34", True),
    ("\\pm 3", True), ("3 and 4", True), ("34", False), ("\\frac{1}{2}", False),
    ("\\sqrt{2}", False), ("\\operatorname{floor}(x)", False), ("x = 34", False),
])
def test_has_disjunction(answer, hedged):
    assert has_disjunction(answer) == hedged


@pytest.mark.parametrize("answer", [
    "34", "-12", "\\frac{3}{4}", "\\dfrac{\\sqrt{3}}{2}", "2^{10}", "2^{2^{3}}", "10^{9999}",
    "1000!", "\\binom{100}{50}", "3.0 \\times 10^{8} \\text{ m/s}", "\\left(1, 2\\right]",
    "\\{1, 2, 3\\}", "x^2 + 2x + 1", "(x+1)^{5}", "e^{x^2}", "\\sqrt[3]{27}", "50\\%",
    "\\pi", "(1, 2]", "x^{100}", "1.5 \\cdot 10^{-12}", "\\frac{2^{10000}}{3^{6000}}",
])
def test_ordinary_answers_pass_the_limits(answer):
    assert answer_limits(answer) is None


@pytest.mark.parametrize("answer,status", [
    ("2^{2^{2^{2^{2}}}}", "too_complex"),       # 2^65536: an exponent of 65536
    ("9^{9^{9}}", "too_complex"),
    ("10^{10^{10}}", "too_complex"),
    ("2^2^2^2^2^2^2", "too_complex"),
    ("9**9**9", "too_complex"),
    ("2^{-10^{10}}", "too_complex"),
    ("(10^{5})!", "too_complex"),
    ("100000!", "too_complex"),
    ("1000!!", "too_complex"),
    ("\\binom{10^{6}}{5}", "too_complex"),
    ("x^{1000}", "too_complex"),                # symbolic base: a smaller exponent limit
    ("(x+y+z)^{50}", "too_complex"),            # 1326 terms once expanded
    ("(a+b)(c+d)(e+f)(g+h)(i+j)(k+l)(m+n)(o+p)", "too_complex"),
    ("+".join(["1"] * 150), "too_complex"),
    ("1" * 150, "too_complex"),                 # digits in one number
    ("{" * 20 + "1" + "}" * 20, "too_complex"),  # nesting depth
    ("10^{9999} \\cdot 10^{9999} \\cdot 10^{9999}", "too_complex"),  # value digits
    ("x_{10^{10^{10}}}", "too_complex"),
    ("1" * (MAX_ANSWER_CHARS + 1), "too_long"),
])
def test_hostile_answers_are_refused(answer, status):
    refused = answer_limits(answer)
    assert refused is not None and refused[0] == status, refused


def test_whole_text_mode_skips_the_term_and_value_budgets():
    prose = " ".join(f"step {i}: add {i} and {i + 1}." for i in range(300))
    assert answer_limits(prose) is not None            # far too long as one answer
    assert answer_limits(prose, whole_text=True) is None
    assert answer_limits(prose + " 9^{9^{9}}", whole_text=True)[0] == "too_complex"


def test_large_hostile_structures():
    """A few hundred kilobytes of hostile structure (the scans are linear; a quadratic
    one would take minutes here: the bench times it, the test checks the results)."""
    assert extract_boxed("\\boxed{" * 100_000) is None
    assert extract_boxed("{" * 500_000 + "\\boxed{1}") == "1"
    assert answer_limits("2^" * 499 + "2")[0] == "too_complex"
    assert answer_limits("\\frac" * 199 + "1")[0] == "too_complex"
