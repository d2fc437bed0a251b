"""The comparison's statistics (cepo.stats) on hand-computed examples and published values."""

import math

import pytest

from cepo.stats import betainc, paired_difference, t_cdf, t_quantile


@pytest.mark.parametrize("df, p, expected", [
    # two-sided 95% and 99% critical values, as printed in standard t tables
    (1, 0.975, 12.7062047), (2, 0.975, 4.3026527), (3, 0.975, 3.1824463),
    (4, 0.975, 2.7764451), (9, 0.975, 2.2621572), (30, 0.975, 2.0422725),
    (1, 0.995, 63.6567412), (4, 0.995, 4.6040949), (120, 0.975, 1.9799304)])
def test_t_quantile_matches_tables(df, p, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=2e-7)
    assert t_quantile(1 - p, df) == pytest.approx(-expected, abs=2e-7)  # symmetric
    assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-12)


def test_t_cdf_closed_forms():
    # df = 1 is the Cauchy distribution: F(t) = 1/2 + atan(t)/pi
    for t in (-3.0, -0.5, 0.0, 0.7, 10.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
    # df = 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2))
    for t in (-2.0, 0.3, 4.0):
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    # large df approaches the normal: Phi(1.959964) = 0.975
    assert t_cdf(1.959964, 1e7) == pytest.approx(0.975, abs=1e-6)


def test_betainc_by_hand():
    # I_x(2, 3) = sum_{j=2..4} C(4, j) x^j (1-x)^(4-j); at x = 0.4: 0.3456 + 0.1536 + 0.0256
    assert betainc(2, 3, 0.4) == pytest.approx(0.5248, abs=1e-12)
    # I_x(1/2, 1/2) = (2/pi) asin(sqrt(x))
    assert betainc(0.5, 0.5, 0.3) == pytest.approx(2 / math.pi * math.asin(math.sqrt(0.3)),
                                                   abs=1e-12)
    assert betainc(3, 2, 0.0) == 0.0 and betainc(3, 2, 1.0) == 1.0


def test_paired_difference_worked_by_hand():
    """The issue's example: paired differences +1.0, +1.25, -1.5 points (3 seeds).
    mean = 0.25/3*3 = 0.25; deviations 0.75, 1.0, -1.75; sum of squares
    0.5625 + 1 + 3.0625 = 4.625; sd = sqrt(4.625 / 2) = 1.520691; se = sd / sqrt(3) = 0.877971;
    t(0.975, 2) = 4.302653; half width 3.777605: CI [-3.5276, +4.0276]."""
    cepo = [0.5300, 0.5425, 0.5150]
    grpo = [0.5200, 0.5300, 0.5300]
    p = paired_difference(cepo, grpo)
    assert p["per_seed"] == pytest.approx([0.01, 0.0125, -0.015])
    assert p["mean"] == pytest.approx(0.0025)
    assert p["sd"] == pytest.approx(0.01520691, abs=1e-8)
    assert p["se"] == pytest.approx(0.00877971, abs=1e-8)
    assert p["t"] == pytest.approx(4.3026527, abs=1e-7)
    assert p["ci_low"] == pytest.approx(-0.035276, abs=1e-6)
    assert p["ci_high"] == pytest.approx(0.040276, abs=1e-6)
    assert p["n"] == 3 and p["level"] == 0.95


def test_paired_difference_five_seeds_and_level():
    """d = 1, 2, 3, 4, 5: mean 3, sd sqrt(2.5), se sqrt(0.5); t(0.975, 4) = 2.776445."""
    p = paired_difference([1, 2, 3, 4, 5], [0, 0, 0, 0, 0])
    half = 2.7764451 * math.sqrt(0.5)
    assert (p["ci_low"], p["ci_high"]) == pytest.approx((3 - half, 3 + half), abs=1e-6)
    p90 = paired_difference([1, 2, 3, 4, 5], [0] * 5, level=0.90)  # t(0.95, 4) = 2.131847
    assert p90["ci_high"] - 3 == pytest.approx(2.1318468 * math.sqrt(0.5), abs=1e-6)
    # the pairing matters: a shared per-seed offset cancels
    shifted = paired_difference([1 + x for x in (0.0, 5.0, -3.0)], [0.0, 5.0, -3.0])
    assert shifted["sd"] == pytest.approx(0.0, abs=1e-12) and shifted["mean"] == pytest.approx(1)


def test_one_seed_has_no_interval():
    p = paired_difference([0.6], [0.5])
    assert p["mean"] == pytest.approx(0.1) and p["ci_low"] is None and p["sd"] is None


@pytest.mark.parametrize("call, match", [
    (lambda: paired_difference([1, 2], [1]), "equal"),
    (lambda: paired_difference([], []), "non-empty"),
    (lambda: paired_difference([1, 2], [1, 2], level=1.0), "level"),
    (lambda: t_quantile(1.0, 3), "p must"), (lambda: t_quantile(0.5, 0), "df must"),
    (lambda: betainc(0, 1, 0.5), "betainc")])
def test_bad_values(call, match):
    with pytest.raises(ValueError, match=match):
        call()
