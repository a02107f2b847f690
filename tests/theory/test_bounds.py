"""theory.bounds: the α interval is the adaptor's, and the proven bounds hold on sequences."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptor import E
from theory import bounds as B

betas = st.floats(0.0, 0.999, allow_nan=False)


@given(beta=betas, fraction=st.floats(-3.0, 3.0, allow_nan=False))
@settings(max_examples=60)
def test_alpha_interval_is_what_the_adaptor_enforces(beta, fraction):
    lo, hi = B.alpha_interval(beta)
    assert lo == -hi and hi == pytest.approx(1.0 / (1.0 - beta), rel=1e-15)
    alpha = fraction * hi
    inside = lo < alpha < hi
    assert B.is_admissible(alpha, beta) == inside
    p = torch.zeros(2, requires_grad=True)
    if inside:
        E(torch.optim.SGD([p], lr=0.1), alpha=alpha, beta=beta)
    else:
        with pytest.raises(ValueError, match=r"\|alpha\| < 1/\(1-beta\)"):
            E(torch.optim.SGD([p], lr=0.1), alpha=alpha, beta=beta)


def test_interval_endpoints_and_bad_beta():
    assert B.alpha_interval(0.0) == (-1.0, 1.0)
    assert B.alpha_interval(0.99)[1] == pytest.approx(100.0)
    assert not B.is_admissible(100.0, 0.99)  # open interval
    assert not B.is_admissible(-100.0, 0.99)
    assert B.is_admissible(-99.9, 0.99)
    for beta in (1.0, -0.1):
        with pytest.raises(ValueError, match="0 <= beta < 1"):
            B.alpha_interval(beta)


def _replaced(gradients, alpha, beta):
    """The paper's two-buffer form, float64: g̃_k = g_k + α a_k, a_0 = g_0 = 0."""
    a = np.zeros_like(gradients[0])
    previous = np.zeros_like(gradients[0])
    out = []
    for g in gradients:
        a = beta * a + (1 - beta) * (g - previous)
        out.append(g + alpha * a)
        previous = g
    return out


@given(
    beta=st.floats(0.0, 0.99),
    fraction=st.floats(-0.999, 0.999),
    seed=st.integers(0, 2**16),
    steps=st.integers(1, 60),
)
@settings(max_examples=40)
def test_effective_weights_and_gradient_bound(beta, fraction, seed, steps):
    alpha = fraction / (1.0 - beta)
    rng = np.random.default_rng(seed)
    gradients = list(rng.uniform(-1.0, 1.0, size=(steps, 7)))
    replaced = _replaced(gradients, alpha, beta)
    weights = B.effective_weights(alpha, beta, steps)
    unrolled = sum(w * gradients[steps - 1 - j] for j, w in enumerate(weights))
    np.testing.assert_allclose(unrolled, replaced[-1], rtol=1e-9, atol=1e-9)
    if alpha <= 0:
        assert min(weights) >= 0 and math.fsum(weights) <= 1 + 1e-12
    largest = max(np.abs(g).max() for g in gradients)
    bound = B.replaced_gradient_bound(alpha, beta)
    for g_tilde in replaced:
        assert np.abs(g_tilde).max() <= bound * largest * (1 + 1e-12)
    # Lemma 3 (first part): ‖g‖∞ <= G/16 gives ‖g̃‖∞ <= G.
    assert bound / 16 <= 3 / 16


def test_gradient_bound_values():
    assert B.replaced_gradient_bound(-5.0, 0.99) == pytest.approx(1.0)
    assert B.replaced_gradient_bound(0.0, 0.5) == 1.0
    assert B.replaced_gradient_bound(9.0, 0.9) == pytest.approx(2.8)


def test_theorem_quantities():
    # Paper defaults β₃ = 0.99, ε₁ = 1e-6: μ <= 1 needs G∞ <= 1e-5.
    assert B.theorem1_mu(0.99, 1e-5, 1e-6) == pytest.approx(1.0)
    assert B.theorem1_mu(0.99, 1e-6, 1e-6) == pytest.approx(0.1)
    assert B.theorem1_weight_decay(1e-4, 0.1, 3) == pytest.approx(1e-4 * 0.9**3)
    eta = B.theorem1_step_size_bound(1e-6, 1e-6, 1e-10, 0.9, 10, 1.0, 1.0)
    assert eta == pytest.approx(math.sqrt(1e-18 * 1e-24 * 1e-20 * 1e-2 / 60))
    lr, alpha, wd = B.convex_schedules(0.1, -5.0, 1e-4, 4)
    assert (lr, alpha, wd) == pytest.approx((0.05, -2.5, 5e-5))
    assert B.moment_ratio_ok(0.9, 0.99)
    assert not B.moment_ratio_ok(0.99, 0.9)
    with pytest.raises(ValueError):
        B.theorem1_weight_decay(1e-4, 1.5, 1)
    with pytest.raises(ValueError):
        B.convex_schedules(0.1, -5.0, 1e-4, 0)
