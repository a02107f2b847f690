"""Convergence property tests: every optimizer of the library, with and without the adaptor.

- convex: random SPD quadratics (hypothesis draws the problem) — the distance to the
  minimiser shrinks by a factor ``CONVEX_TOL`` within ``CONVEX_STEPS`` steps;
- non-convex: Rosenbrock (``b = 10``, from near ``(0, 0)``) and Beale (from near
  ``(2, 0)``), starts drawn by hypothesis — ``min_k ‖∇f(θ_k)‖`` over the run falls below
  ``GRAD_TOL`` within ``NONCONVEX_STEPS`` (Theorem 1 bounds the mean of ``‖∇f(θ_k)‖²``,
  hence its minimum).

The adaptor's (α, β) are drawn from the admissible set restricted to ``0 <= β <= 0.9``,
``0.05/(1-β) <= |α| <= 0.5/(1-β)``, each sign of α a test case of its own (convergence
within the budget is what is tested; the full interval
includes α close to ``-1/(1-β)``, which converges slowly by design). Learning rates decay
linearly to a tenth (``tests/theory/optimizers.py``). Examples per test are few to keep the
whole theory suite within its time budget; the test ids name every optimizer.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from theory import landscapes as L

from .optimizers import ENTRIES, run

CONVEX_STEPS = 250
CONVEX_TOL = 0.05
CONVEX_TOL_ZEROTH_ORDER = 0.15  # SPSA's estimate is noisy: a looser tolerance
NONCONVEX_STEPS = 300
NONCONVEX_START = {"rosenbrock": (0.0, 0.0), "beale": (2.0, 0.0)}
GRAD_TOL = 0.25
# Non-convex problems are shifted by SHIFT (θ ↦ f(θ - SHIFT)) so that no iterate passes the
# origin: Lamb's trust ratio scales steps by ‖θ‖ and stalls at θ = 0 (a property of Lamb).
SHIFT = 2.0
NONCONVEX_LR = {
    "SGD": 0.005,
    "Adam": 0.05,
    "AdamW": 0.05,
    "Lamb": 0.005,
    "AdaBelief": 0.05,
    "ALTO": 0.005,
    "Muon": 0.03,
    "Shampoo": 0.05,
    "SPSA": 0.01,
}

ids = [entry.name for entry in ENTRIES]
# |α|·(1−β) in [MIN_SCALED_ALPHA, 0.5]: never α = 0 (hypothesis favours the boundary 0.0 of a
# float range that contains it: 6 of 14 explored examples were α = 0, which is the base).
MIN_SCALED_ALPHA = 0.05
SIGNS = {"explore": -1.0, "exploit": 1.0}


def admissible(sign: float) -> st.SearchStrategy[tuple[float, float]]:
    """``(α, β)`` with ``0 <= β <= 0.9`` and ``sign·α·(1−β)`` in ``[0.05, 0.5]``."""
    return st.floats(0.0, 0.9).flatmap(
        lambda beta: st.tuples(
            st.floats(MIN_SCALED_ALPHA, 0.5).map(lambda f: sign * f / (1.0 - beta)),
            st.just(beta),
        )
    )


@pytest.mark.parametrize("sign", SIGNS.values(), ids=SIGNS)
@given(data=st.data())
@settings(max_examples=50)
def test_the_alpha_strategy_never_draws_zero(sign, data):
    """The strategies exercise the adaptor: α ≠ 0, of the asked sign, admissible.

    Mutation caught: the former strategy ``st.floats(-0.5, 0.5)`` (draws α = 0 and either sign).
    """
    alpha, beta = data.draw(admissible(sign))
    assert alpha * sign >= MIN_SCALED_ALPHA / (1.0 - beta) * (1.0 - 1e-12)
    assert abs(alpha) < 1.0 / (1.0 - beta)


def _convex(entry, seed, alpha=None, beta=None):
    land = L.get("quadratic", dim=8, condition=10.0, seed=seed)
    A, minimizer = land.extras["hessian"], land.extras["minimizer"]

    def loss(theta):
        d = theta - minimizer
        return 0.5 * d @ (A @ d)

    start = torch.tensor(land.start, dtype=torch.float64)
    final, _ = run(entry, loss, start, CONVEX_STEPS, alpha=alpha, beta=beta)
    ratio = float((final - minimizer).norm() / (start - minimizer).norm())
    tol = CONVEX_TOL_ZEROTH_ORDER if entry.zeroth_order else CONVEX_TOL
    assert ratio <= tol, (entry.name, seed, alpha, beta, ratio)


@pytest.mark.parametrize("entry", ENTRIES, ids=ids)
@given(seed=st.integers(0, 10_000))
@settings(max_examples=2)
def test_convex_quadratic_base(entry, seed):
    _convex(entry, seed)


@pytest.mark.parametrize("sign", SIGNS.values(), ids=SIGNS)
@pytest.mark.parametrize("entry", ENTRIES, ids=ids)
@given(data=st.data())
@settings(max_examples=2)
def test_convex_quadratic_explored(entry, sign, data):
    """Both signs of α for every optimizer (α < 0 explores, α > 0 exploits), never α = 0."""
    seed = data.draw(st.integers(0, 10_000), label="seed")
    alpha, beta = data.draw(admissible(sign), label="alpha, beta")
    _convex(entry, seed, alpha, beta)


def _nonconvex(entry, name, offset, alpha=None, beta=None):
    land = L.get("rosenbrock", b=10.0) if name == "rosenbrock" else L.get(name)

    def loss(theta):
        return land.fn(theta - SHIFT)

    start = torch.tensor(NONCONVEX_START[name], dtype=torch.float64)
    start = start + torch.tensor(offset, dtype=torch.float64) + SHIFT
    _, grad_norm = run(
        entry, loss, start, NONCONVEX_STEPS, lr=NONCONVEX_LR[entry.name], alpha=alpha, beta=beta
    )
    assert grad_norm <= GRAD_TOL, (entry.name, name, offset, alpha, beta, grad_norm)


offsets = st.tuples(st.floats(-0.3, 0.3), st.floats(-0.3, 0.3))


@pytest.mark.parametrize("name", ["rosenbrock", "beale"])
@pytest.mark.parametrize("entry", ENTRIES, ids=ids)
@given(offset=offsets)
@settings(max_examples=1)
def test_nonconvex_gradient_small_base(entry, name, offset):
    _nonconvex(entry, name, offset)


@pytest.mark.parametrize("sign", SIGNS.values(), ids=SIGNS)
@pytest.mark.parametrize("name", ["rosenbrock", "beale"])
@pytest.mark.parametrize("entry", ENTRIES, ids=ids)
@given(data=st.data())
@settings(max_examples=1)
def test_nonconvex_gradient_small_explored(entry, name, sign, data):
    """One example per sign of α (never α = 0) for every optimizer and landscape."""
    offset = data.draw(offsets, label="offset")
    alpha, beta = data.draw(admissible(sign), label="alpha, beta")
    _nonconvex(entry, name, offset, alpha, beta)


@pytest.mark.parametrize("entry", ENTRIES, ids=ids)
def test_alpha_bound_enforced(entry):
    theta = torch.zeros(4, 2, dtype=torch.float64, requires_grad=True)
    for beta in (0.0, 0.9, 0.99):
        with pytest.raises(ValueError, match=r"\|alpha\| < 1/\(1-beta\)"):
            entry.build([theta], entry.lr, 1.0 / (1.0 - beta), beta)
        with pytest.raises(ValueError, match=r"\|alpha\| < 1/\(1-beta\)"):
            entry.build([theta], entry.lr, -1.0 / (1.0 - beta) * 1.5, beta)
        entry.build([theta], entry.lr, -0.99 / (1.0 - beta), beta)  # admissible: accepted
