"""``lab.stats`` on inputs with a known answer: t-intervals and paired tests.

References are computed here in float64 from the textbook formulas with the Student-t
constants typed from tables (and, for 4 degrees of freedom, its closed-form CDF), never
from the implementation or scipy.
"""

from __future__ import annotations

import math

import pytest

from lab.stats import paired_difference, t_interval

# Two-sided 95 % critical values t_{ν, 0.975}, typed from a table (ν = 1, 2, 4).
T975 = {1: 12.706204736174698, 2: 4.302652729749464, 4: 2.7764451051977934}


def _mean_sd(values):
    n = len(values)
    mean = math.fsum(values) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, sd


def _two_sided_p_nu4(t):
    """Student t with 4 degrees of freedom in closed form: F(t) = 1/2 + 3u/4 − u³/4 with
    u = t / √(4 + t²); two-sided p = 2 (1 − F(|t|))."""
    u = abs(t) / math.sqrt(4.0 + t * t)
    cdf = 0.5 + 0.75 * u - 0.25 * u**3
    return 2.0 * (1.0 - cdf)


def test_closed_form_reference_is_right():
    # the reference itself: t = 2.776445... (ν = 4) has two-sided p = 0.05
    assert _two_sided_p_nu4(T975[4]) == pytest.approx(0.05, abs=1e-12)


def test_t_interval_matches_the_hand_computed_interval():
    values = [96.1, 97.3, 95.8, 96.9, 96.4]
    mean, sd = _mean_sd(values)
    half = T975[4] * sd / math.sqrt(5)
    got = t_interval(values, 0.95)
    assert got.n == 5
    assert got.mean == pytest.approx(mean, abs=1e-12)
    assert got.sd == pytest.approx(sd, abs=1e-12)
    assert got.half_width == pytest.approx(half, rel=1e-12)
    assert (got.low, got.high) == pytest.approx((mean - half, mean + half), rel=1e-12)
    # By hand: x̄ = 96.5, Σ(x − x̄)² = 1.46, s = √(1.46/4) = 0.60415, s/√5 = 0.27019.
    # Mutations caught here: z = 1.96 for t (half 0.530), t on n degrees of freedom (0.694),
    # the sd with ddof = 0 (0.671), √(n − 1) for √n (0.839).
    assert half == pytest.approx(0.75015, abs=1e-5)


def test_t_interval_other_levels_and_sizes():
    two = t_interval([1.0, 2.0], 0.95)  # ν = 1: x̄ ± 12.706 · (1/√2) / √2
    assert two.half_width == pytest.approx(T975[1] * 0.5, rel=1e-12)
    three = t_interval([1.0, 2.0, 4.0], 0.95)
    _, sd = _mean_sd([1.0, 2.0, 4.0])
    assert three.half_width == pytest.approx(T975[2] * sd / math.sqrt(3), rel=1e-12)
    # 90 %: t_{4, 0.95} = 2.131846786 (table)
    ninety = t_interval([96.1, 97.3, 95.8, 96.9, 96.4], 0.90)
    _, sd5 = _mean_sd([96.1, 97.3, 95.8, 96.9, 96.4])
    assert ninety.half_width == pytest.approx(2.131846786326649 * sd5 / math.sqrt(5), rel=1e-9)
    one = t_interval([0.7])
    assert one.mean == 0.7 and math.isnan(one.half_width) and one.n == 1


def test_zero_paired_difference_covers_zero_with_a_large_p():
    control = [80.0, 85.5, 78.25, 90.0, 82.0]
    shifts = [0.5, -0.5, 1.0, -1.0, 0.0]  # mean exactly 0, spread 0.79
    treated = [c + s for c, s in zip(control, shifts)]
    got = paired_difference(treated, control)
    assert got.difference.mean == pytest.approx(0.0, abs=1e-12)
    assert got.difference.covers(0.0)
    assert got.t_statistic == pytest.approx(0.0, abs=1e-9)
    assert got.p_value == pytest.approx(1.0, abs=1e-9)
    assert got.wilcoxon_p > 0.5


def test_planted_effect_excluded_zero_and_matches_hand_t_interval():
    # Control varies a lot from seed to seed (70..90); the effect is +1 ± 0.16 on every seed.
    control = [80.0, 72.5, 90.0, 85.0, 70.0]
    planted = [1.2, 0.9, 1.1, 1.0, 0.8]
    treated = [c + d for c, d in zip(control, planted)]
    got = paired_difference(treated, control)
    mean, sd = _mean_sd(planted)  # 1.0, 0.158113883...
    half = T975[4] * sd / math.sqrt(5)
    t = mean / (sd / math.sqrt(5))
    assert mean == pytest.approx(1.0, abs=1e-12)
    assert got.difference.mean == pytest.approx(mean, abs=1e-12)
    assert got.difference.half_width == pytest.approx(half, rel=1e-9)
    assert not got.difference.covers(0.0)
    assert got.difference.low == pytest.approx(mean - half, rel=1e-9)
    assert got.t_statistic == pytest.approx(t, rel=1e-9)  # 14.142
    assert got.p_value == pytest.approx(_two_sided_p_nu4(t), rel=1e-6)
    assert got.p_value < 1e-3
    # Unpaired (ttest_ind) the seed-to-seed spread of the control hides the effect: p ≈ 0.85.
    # Wilcoxon: all 5 differences positive, exact two-sided p = 2 / 2⁵.
    assert got.wilcoxon_p == pytest.approx(2 / 32, abs=1e-12)


def test_pairing_order_matters():
    # Same values, pairs shuffled: the paired interval widens (pairing is by position).
    control = [80.0, 72.5, 90.0, 85.0, 70.0]
    treated = [c + d for c, d in zip(control, [1.2, 0.9, 1.1, 1.0, 0.8])]
    shuffled = paired_difference(treated[1:] + treated[:1], control)
    assert shuffled.difference.covers(0.0)


def test_degenerate_inputs():
    same = paired_difference([0.9, 0.8, 0.7], [0.9, 0.8, 0.7])
    assert (same.difference.mean, same.difference.half_width) == (0.0, 0.0)
    assert (same.p_value, same.wilcoxon_p) == (1.0, 1.0)
    # every seed gains exactly one test sample: the t-test is undefined, not "p = 0"
    const = paired_difference([100 * 0.5 + 0.1, 100 * 0.7 + 0.1], [100 * 0.5, 100 * 0.7])
    assert const.t_statistic == math.inf and math.isnan(const.p_value)
    single = paired_difference([1.0], [0.0])
    assert math.isnan(single.p_value) and math.isnan(single.difference.half_width)
    diverged = paired_difference([1.0, math.nan], [0.0, 0.0])
    assert math.isnan(diverged.p_value)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: paired_difference([1.0, 2.0], [1.0]), "same length"),
        (lambda: paired_difference([], []), "empty"),
        (lambda: t_interval([1.0, 2.0], confidence=1.0), "confidence"),
        (lambda: t_interval([[1.0, 2.0]]), "1-D"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
