"""Statistics of the lab's sweeps: t-intervals over seeds and paired comparisons.

- :func:`t_interval`: the mean of ``n`` values with its two-sided ``confidence`` interval
  ``x̄ ± t_{n−1, (1+c)/2} · s / √n``, ``s`` the sample standard deviation (``n − 1`` in the
  denominator) and ``t_{n−1, q}`` the ``q`` quantile of Student's t with ``n − 1`` degrees of
  freedom (``scipy.stats.t``). One value has no interval (half-width ``nan``).
- :func:`paired_difference`: runs paired by seed (same initialisation, same batch order), the
  differences ``dᵢ = treatedᵢ − controlᵢ``: their t-interval, the paired t-test
  ``t = d̄ / (s_d / √n)`` on ``n − 1`` degrees of freedom (``scipy.stats.ttest_rel``, two-sided)
  and the Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, two-sided; zero differences
  dropped). Pairing removes the seed-to-seed variation the two runs share, so the interval of
  the difference is usually much narrower than either mean's.

Degenerate inputs get a defined answer rather than a warning: every difference exactly zero →
p = 1 for both tests (no evidence of a difference); every difference the same non-zero value
(zero spread: accuracies on a small test set are discrete, so it happens) → the t-test is
undefined, ``t`` = ±∞ and p = ``nan`` (scipy would say p = 0, which reads as overwhelming
evidence from, say, three seeds; the Wilcoxon p is still given); fewer than two pairs or a
non-finite value (a diverged run) → p = ``nan``. With ``n`` pairs the
exact two-sided Wilcoxon p is at least ``2 / 2ⁿ`` (0.0625 for 5 pairs): it cannot reach 0.05
below 6 pairs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats as _scipy_stats


@dataclass(frozen=True)
class Interval:
    """``mean ± half_width`` (= ``[low, high]``) at ``confidence``, from ``n`` values."""

    mean: float
    low: float
    high: float
    half_width: float
    sd: float  # sample standard deviation (n − 1); 0 for one value
    n: int
    confidence: float

    def covers(self, value: float) -> bool:
        return self.low <= value <= self.high

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PairedComparison:
    """``treated − control`` over paired runs: interval of the mean difference and tests."""

    difference: Interval
    t_statistic: float
    p_value: float  # paired t-test, two-sided
    wilcoxon_p: float  # Wilcoxon signed-rank, two-sided

    def as_dict(self) -> dict[str, Any]:
        return {
            "difference": self.difference.as_dict(),
            "t_statistic": self.t_statistic,
            "p_value": self.p_value,
            "wilcoxon_p": self.wilcoxon_p,
        }


def _check_confidence(confidence: float) -> float:
    confidence = float(confidence)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return confidence


def _as_array(name: str, values: Sequence[float]) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of numbers, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty: need at least one value")
    return array


def t_quantile(confidence: float, dof: int) -> float:
    """``t_{dof, (1 + confidence)/2}``: the two-sided critical value of Student's t."""
    return float(_scipy_stats.t.ppf(0.5 + _check_confidence(confidence) / 2.0, dof))


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean and two-sided t-interval ``x̄ ± t_{n−1,(1+c)/2} s/√n`` (``nan`` width for n = 1)."""
    confidence = _check_confidence(confidence)
    array = _as_array("values", values)
    n = int(array.size)
    mean = float(array.mean())
    if n == 1:
        return Interval(mean, math.nan, math.nan, math.nan, 0.0, 1, confidence)
    sd = float(array.std(ddof=1))
    half = t_quantile(confidence, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, half, sd, n, confidence)


def paired_difference(
    treated: Sequence[float], control: Sequence[float], confidence: float = 0.95
) -> PairedComparison:
    """``treated[i] − control[i]``: t-interval of the mean difference, paired t and Wilcoxon."""
    a = _as_array("treated", treated)
    b = _as_array("control", control)
    if a.shape != b.shape:
        raise ValueError(
            f"paired samples must have the same length, got treated {a.size} and control {b.size}"
        )
    diff = a - b
    interval = t_interval(diff, confidence)
    n = int(diff.size)
    if not np.all(np.isfinite(diff)):
        return PairedComparison(interval, math.nan, math.nan, math.nan)
    if n < 2:
        return PairedComparison(interval, math.nan, math.nan, math.nan)
    # Rounding: 100·a − 100·b of "the same" accuracies differ in the last bits; treat
    # differences within 1e-9 of the data's scale as equal (seeds tie on discrete accuracies).
    tol = 1e-9 * max(1.0, float(np.abs(a).max()), float(np.abs(b).max()))
    if np.all(np.abs(diff) <= tol):
        return PairedComparison(interval, 0.0, 1.0, 1.0)
    wilcoxon = _scipy_stats.wilcoxon(diff, zero_method="wilcox", alternative="two-sided")
    if float(np.ptp(diff)) <= tol:
        return PairedComparison(interval, math.copysign(math.inf, diff[0]), math.nan,
                                float(wilcoxon.pvalue))
    test = _scipy_stats.ttest_rel(a, b)
    return PairedComparison(interval, float(test.statistic), float(test.pvalue),
                            float(wilcoxon.pvalue))
