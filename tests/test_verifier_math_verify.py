"""Ordinary answers are scored exactly as math-verify scores them.

A few hundred varied (gold, boxed prediction) pairs, correct and wrong: integers,
negatives, decimals, fractions (\\frac, \\dfrac, a/b), roots, pi, percentages, sets,
intervals, tuples, units and text wrappers, polynomials. The verifier's verdict must
equal calling math-verify's ``parse`` / ``verify`` directly on the same boxed answer;
the structural limits and the hedging rule must refuse none of them.
"""

import math
import random

import pytest

from cepo.verifier import score_one


def _pairs() -> list[tuple[str, str]]:
    rng = random.Random(1234)
    pairs = []
    for _ in range(12):
        n = rng.randint(-999, 999)
        pairs += [(str(n), p) for p in (
            str(n), f"{n}.0", str(n + 1), str(-n) if n else "1", f"\\text{{{n}}}",
            f"{n} \\text{{ apples}}", f"\\frac{{{2 * n}}}{{2}}", f"{n}\\,\\mathrm{{cm}}",
            f"x = {n}", f"{n}\\%")]
    for _ in range(10):
        p, q = rng.randint(1, 40), rng.randint(2, 40)
        k = rng.randint(2, 5)
        gold = f"\\frac{{{p}}}{{{q}}}"
        pairs += [(gold, x) for x in (
            f"\\dfrac{{{p}}}{{{q}}}", f"{p}/{q}", f"{round(p / q, 6)}", f"{round(p / q, 2)}",
            f"\\frac{{{k * p}}}{{{k * q}}}", f"\\frac{{{q}}}{{{p}}}", f"\\frac{{{p + 1}}}{{{q}}}",
            f"-\\frac{{{p}}}{{{q}}}", f"\\tfrac{{{p}}}{{{q}}}")]
        pairs.append((f"{round(p / q, 3)}", f"\\frac{{{p}}}{{{q}}}"))
        pairs.append((f"-{p}/{q}", f"-\\frac{{{p}}}{{{q}}}"))
    for _ in range(6):
        k, m = rng.randint(2, 9), rng.choice([2, 3, 5, 6, 7])
        gold = f"{k}\\sqrt{{{m}}}"
        pairs += [(gold, x) for x in (
            f"\\sqrt{{{k * k * m}}}", f"{k}\\sqrt{{{m + 1}}}", f"{k * math.sqrt(m):.6f}",
            f"{k * math.sqrt(m):.2f}", f"\\sqrt{{{m}}} \\cdot {k}", f"{k + 1}\\sqrt{{{m}}}")]
    for _ in range(6):
        k = rng.randint(2, 12)
        gold = f"{k}\\pi"
        pairs += [(gold, x) for x in (
            f"\\pi {k}", f"{k} \\cdot \\pi", f"{k * math.pi:.6f}", f"{k + 1}\\pi",
            f"\\frac{{{2 * k}\\pi}}{{2}}", f"{k}")]
    for _ in range(8):
        p = rng.randint(1, 99)
        pairs += [(f"{p}\\%", x) for x in (f"{p}", f"{p}\\%", f"{p / 100}", f"{p + 1}\\%",
                                           f"{p} \\%", f"{p}\\text{{ percent}}")]
        pairs.append((f"{p / 100}", f"{p}\\%"))
    for _ in range(8):
        a, b, c = rng.sample(range(-20, 20), 3)
        pairs += [(f"\\{{{a}, {b}\\}}", x) for x in (
            f"\\{{{b}, {a}\\}}", f"\\{{{a}, {b}, {c}\\}}", f"\\{{{a}\\}}", f"{b}, {a}",
            f"\\{{{a}, {c}\\}}")]
        lo, hi = sorted((a, b))
        pairs += [(f"({lo}, {hi}]", x) for x in (
            f"({lo}, {hi}]", f"[{lo}, {hi}]", f"({lo}, {hi})", f"(-\\infty, {hi}]",
            f"\\left({lo}, {hi}\\right]")]
        pairs += [(f"({a}, {b})", x) for x in (f"({a}, {b})", f"({b}, {a})", f"({a}, {c})")]
    for _ in range(6):
        whole, frac = rng.randint(0, 99), rng.randint(1, 99)
        d = f"{whole}.{frac:02d}"
        pairs += [(d, x) for x in (d, f"{d}0", f"\\frac{{{whole * 100 + frac}}}{{100}}",
                                   f"{whole}.{(frac + 1) % 100:02d}", f"{whole}")]
    for _ in range(6):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        gold = f"x^2 + {a + b}x + {a * b}"
        pairs += [(gold, x) for x in (
            f"(x+{a})(x+{b})", f"x^2 + {a * b} + {a + b}x", f"(x+{a})(x+{b + 1})",
            f"{a * b} + {a + b}x + x^{{2}}", f"x^2 + {a + b}x")]
    for _ in range(6):
        n = rng.randint(1, 500)
        pairs += [(str(n), x) for x in (f"{n}^\\circ", f"\\${n}", f"{n} \\text{{ dollars}}",
                                        f"\\textbf{{{n}}}", f"{n}.00", f"{n + 1}\\text{{ cm}}")]
    return pairs


PAIRS = _pairs()


def _math_verify(gold: str, pred: str) -> tuple[bool, bool]:
    from math_verify import parse, verify

    p = parse("\\boxed{" + pred + "}")
    g = parse("$" + gold + "$") or parse("\\boxed{" + gold + "}")
    return bool(p), bool(g) and bool(p) and verify(g, p)


def test_there_are_a_few_hundred_varied_pairs():
    assert len(PAIRS) >= 300
    assert len(set(PAIRS)) >= 280


def test_verdicts_equal_math_verify():
    mismatches = []
    n_correct = 0
    for gold, pred in PAIRS:
        parsed, expected = _math_verify(gold, pred)
        s = score_one(f"Working...\nSo the answer is \\boxed{{{pred}}}.", gold)
        want = ("ok" if expected else "wrong") if parsed else "unparseable"
        n_correct += expected
        if (s.correct, s.status) != (expected, want):
            mismatches.append((gold, pred, expected, want, s))
    assert not mismatches, mismatches[:10]
    # both kinds are well represented, so the comparison means something
    assert 0.3 * len(PAIRS) < n_correct < 0.7 * len(PAIRS)


@pytest.mark.parametrize("mode", ["last_number"])
def test_last_number_mode_agrees_on_plain_numbers(mode):
    rng = random.Random(7)
    for _ in range(40):
        n, m = rng.randint(-500, 500), rng.randint(-500, 500)
        s = score_one(f"first {m} then finally {n}", str(n), answer_extraction=mode)
        assert (s.correct, s.extracted) == (True, str(n))
        s = score_one(f"first {n} then finally {m}", str(n), answer_extraction=mode)
        assert s.correct == (m == n)
