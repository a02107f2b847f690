"""theory.landscapes: documented minima are minima, batching, the registry, the valley demo."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from theory import landscapes as L


def _dense_grad_hessian(fn, point):
    theta = torch.tensor(point, dtype=torch.float64)
    g = torch.autograd.functional.jacobian(fn, theta)
    H = torch.autograd.functional.hessian(fn, theta)
    return g, H


@pytest.mark.parametrize("name", L.names())
def test_minima_are_stationary_with_the_stated_values(name):
    land = L.get(name)
    assert land.minima, name
    for minimum in land.minima:
        g, H = _dense_grad_hessian(land.fn, minimum.point)
        assert float(g.abs().max()) < 1e-7, (name, minimum)
        assert float(land.fn(torch.tensor(minimum.point, dtype=torch.float64))) == pytest.approx(
            minimum.value, abs=1e-12
        )
        # A minimum: no direction of negative curvature (semi-definite on the cardioid's curve).
        assert float(np.linalg.eigvalsh(H.numpy()).min()) > -1e-8, (name, minimum)
    assert land.global_minimum.value == min(m.value for m in land.minima)
    assert land.global_minimum.kind == "global"


@pytest.mark.parametrize("name", ["rosenbrock", "beale", "rastrigin", "ring_valley", "cardioid"])
def test_global_minimum_beats_a_grid(name):
    land = L.get(name)
    (lo_x, hi_x), (lo_y, hi_y) = land.bounds
    X, Y = torch.meshgrid(
        torch.linspace(lo_x, hi_x, 301, dtype=torch.float64),
        torch.linspace(lo_y, hi_y, 301, dtype=torch.float64),
        indexing="ij",
    )
    Z = land.loss_grid(X, Y)
    assert Z.shape == X.shape
    assert float(Z[torch.isfinite(Z)].min()) >= land.global_minimum.value - 1e-12


@pytest.mark.parametrize("name", L.names())
def test_batched_evaluation_matches_pointwise(name):
    land = L.get(name)
    generator = torch.Generator().manual_seed(0)
    points = torch.randn(3, 4, land.dim, generator=generator, dtype=torch.float64) + 0.3
    batched = land.loss(points)
    assert batched.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            assert float(batched[i, j]) == pytest.approx(float(land.loss(points[i, j])), rel=1e-12)
    assert land.loss(points.float()).dtype == torch.float32


def test_quadratic_matches_its_construction():
    land = L.get("quadratic", dim=12, condition=250.0, seed=4)
    A = land.extras["hessian"].numpy()
    eigenvalues = np.linalg.eigvalsh(A)
    assert eigenvalues.max() / eigenvalues.min() == pytest.approx(250.0, rel=1e-9)
    _, H = _dense_grad_hessian(land.fn, land.start)
    np.testing.assert_allclose(H.numpy(), A, atol=1e-12)


def test_logistic_minimum_against_an_independent_gradient():
    land = L.get("logistic", n_samples=150, dim=4, weight_decay=0.05, seed=2)
    X, y = land.extras["X"].numpy(), land.extras["y"].numpy()
    w = np.array(land.global_minimum.point)
    margins = y * (X @ w)
    grad = -(X * (y / (1 + np.exp(margins)))[:, None]).mean(axis=0) + 0.05 * w
    assert np.abs(grad).max() < 1e-10
    assert np.log1p(np.exp(-margins)).mean() + 0.025 * w @ w == pytest.approx(
        land.global_minimum.value, rel=1e-12
    )


def test_ring_valley_profile():
    land = L.get("ring_valley")
    values = sorted({round(m.value, 9) for m in land.minima})
    assert len(values) >= 3  # several depths
    for m in land.minima:
        assert math.hypot(*m.point) == pytest.approx(1.0, abs=1e-12)  # all on the valley r = 1
    assert land.global_minimum.point == pytest.approx((-1.0, 0.0), abs=1e-12)


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown landscape 'nope'"):
        L.get("nope")
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 2\)"):
        L.get("beale").loss(torch.zeros(3))
    with pytest.raises(ValueError, match="2-D landscape"):
        L.get("quadratic").loss_grid(torch.zeros(2, 2), torch.zeros(2, 2))


def test_trajectory_records_every_step():
    land = L.get("rosenbrock")
    path = L.trajectory(land, lambda p: torch.optim.SGD(p, lr=1e-4), steps=5)
    assert path.shape == (6, 2)
    assert path[0].tolist() == list(land.start)
    # One plain gradient step, computed here from the closed-form gradient.
    x, y = land.start
    gx = -2 * (1 - x) - 400 * x * (y - x * x)
    gy = 200 * (y - x * x)
    assert path[1].tolist() == pytest.approx([x - 1e-4 * gx, y - 1e-4 * gy], rel=1e-12)


def _final_losses(land):
    demo = land.demo
    return {
        name: float(land.loss(L.trajectory(land, make, demo.steps, demo.start)[-1]))
        for name, make in demo.optimizers().items()
    }


def test_ring_valley_demo_explored_ends_lower(capsys):
    """Figure 1's claim on our valley: from the same start and budget, E-SGD and E-Adam
    (α < 0) end at a lower loss than SGD and Adam, which stop in the first well."""
    land = L.get("ring_valley")
    losses = _final_losses(land)
    with capsys.disabled():
        print("\nring_valley demo, final loss:", {k: round(v, 4) for k, v in losses.items()})
    first_well = max(m.value for m in land.minima if m.value < 1.0)  # the well at φ ≈ 1.2
    for base in ("SGD", "Adam"):
        assert losses[base] == pytest.approx(first_well, abs=1e-4)
        assert losses[f"E-{base}"] < losses[base] - 0.4
