"""``preset(batch_size)``, the gradient-estimator protocol, and ``explore(...)``'s arguments."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from adaptor import Autograd, E, GradEstimator, check_alpha_beta, explore, preset
from tests.adaptor.reference import TwoBufferReference

F64 = torch.float64

# -- presets ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch_size", "expected"),
    [
        (1, {"alpha": 0.5, "beta": 0.01}),
        (128, {"alpha": 0.5, "beta": 0.01}),
        (1023, {"alpha": 0.5, "beta": 0.01}),
        (1024, {"alpha": -5.0, "beta": 0.99}),
        (4096, {"alpha": -5.0, "beta": 0.99}),
        (2**20, {"alpha": -5.0, "beta": 0.99}),
    ],
)
def test_preset_follows_the_papers_guidance(batch_size, expected):
    values = preset(batch_size)
    assert values == expected
    check_alpha_beta(values["alpha"], values["beta"])  # admissible


def test_preset_returns_a_fresh_dict():
    preset(256)["alpha"] = 100.0
    preset(4096)["beta"] = 0.0
    assert preset(256) == {"alpha": 0.5, "beta": 0.01}
    assert preset(4096) == {"alpha": -5.0, "beta": 0.99}


@pytest.mark.parametrize(
    ("batch_size", "exc", "match"),
    [
        (0, ValueError, r"batch_size must be >= 1, got 0"),
        (-256, ValueError, r"batch_size must be >= 1, got -256"),
        (256.0, TypeError, r"batch_size must be an int, got float"),
        (True, TypeError, r"batch_size must be an int, got bool"),
        ("256", TypeError, r"batch_size must be an int, got str"),
        (None, TypeError, r"batch_size must be an int, got NoneType"),
    ],
)
def test_preset_rejects_bad_batch_sizes(batch_size, exc, match):
    with pytest.raises(exc, match=match):
        preset(batch_size)


def test_preset_feeds_explore():
    theta = torch.ones(3, requires_grad=True)
    optimizer = explore(Autograd(), torch.optim.SGD([theta], lr=0.1), **preset(8192))
    group = optimizer.param_groups[0]
    assert (group["explore_alpha"], group["explore_beta"]) == (-5.0, 0.99)


# -- the estimator protocol ------------------------------------------------------------------


class AnalyticQuadratic(GradEstimator):
    """A user's estimator: the exact gradient ``h·θ`` of ``½·h·‖θ‖²``, no autograd.

    It counts its calls (state that must survive a checkpoint).
    """

    def __init__(self, curvature: float) -> None:
        self.curvature = curvature
        self.calls = 0

    def estimate(self, closure, param_groups):
        self.calls += 1
        for group in param_groups:
            for p in group["params"]:
                p.grad = self.curvature * p.detach().clone()
        return None if closure is None else closure()

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state_dict):
        if set(state_dict) != {"calls"}:
            raise ValueError(f"AnalyticQuadratic state must have 'calls', got {sorted(state_dict)}")
        self.calls = state_dict["calls"]


class LossOnly(GradEstimator):
    """An estimator that needs the closure (like a finite-difference one): g = 2·loss·θ."""

    requires_closure = True

    def estimate(self, closure, param_groups):
        loss = closure()
        for group in param_groups:
            for p in group["params"]:
                p.grad = 2.0 * loss.detach() * p.detach()
        return loss


def test_custom_estimator_drives_the_replacement(device):
    h, lr, alpha, beta = 3.0, 0.1, -2.0, 0.8
    theta = torch.linspace(-1.0, 1.0, 5, dtype=F64, device=device).requires_grad_()
    estimator = AnalyticQuadratic(h)
    optimizer = explore(estimator, torch.optim.SGD([theta], lr=lr), alpha=alpha, beta=beta)
    assert optimizer.estimator is estimator
    expected = theta.detach().cpu().clone()
    reference = TwoBufferReference()
    for _ in range(6):
        assert optimizer.step() is None
        expected = expected - lr * reference(h * expected, alpha, beta)
    assert estimator.calls == 6
    torch.testing.assert_close(theta.detach().cpu(), expected, rtol=1e-13, atol=1e-14)


def test_custom_estimator_state_is_checkpointed(device):
    theta = torch.ones(4, dtype=F64, device=device, requires_grad=True)
    optimizer = explore(AnalyticQuadratic(2.0), torch.optim.SGD([theta], lr=0.1, momentum=0.9))
    for _ in range(3):
        optimizer.step()
    state_dict = copy.deepcopy(optimizer.state_dict())
    assert state_dict["explore_estimator"] == {"calls": 3}
    twin = theta.detach().clone().requires_grad_()
    resumed = explore(AnalyticQuadratic(2.0), torch.optim.SGD([twin], lr=0.1, momentum=0.9))
    resumed.load_state_dict(state_dict)
    assert resumed.estimator.calls == 3
    for _ in range(3):
        optimizer.step()
        resumed.step()
    assert torch.equal(theta, twin)
    assert resumed.estimator.calls == 6
    # an Autograd optimizer has no estimator entry
    plain = E(torch.optim.SGD([torch.ones(2, requires_grad=True)], lr=0.1))
    assert "explore_estimator" not in plain.state_dict()


def test_estimator_that_requires_a_closure(device):
    theta = torch.ones(3, dtype=F64, device=device, requires_grad=True)
    optimizer = explore(LossOnly(), torch.optim.SGD([theta], lr=0.1), alpha=0.5, beta=0.5)
    with pytest.raises(ValueError, match=r"LossOnly needs a closure"):
        optimizer.step()
    assert torch.equal(theta.detach(), torch.ones(3, dtype=F64, device=device))
    assert len(optimizer.state) == 0 and theta.grad is None

    def closure():
        return (theta.detach() ** 2).sum()

    loss = optimizer.step(closure)
    assert loss.item() == 3.0
    # g = 2·3·1 = 6, a_1 = ½·6 = 3, g̃ = 6 + ½·3 = 7.5, θ = 1 - 0.75
    torch.testing.assert_close(theta.detach().cpu(), torch.full((3,), 0.25, dtype=F64))


def test_explore_with_autograd_is_E_bit_for_bit():
    runs = []
    for make in (
        lambda base: explore(Autograd(), base, alpha=-3.0, beta=0.9),
        lambda base: E(base, -3.0, 0.9),
    ):
        theta = torch.linspace(-1.0, 2.0, 6, requires_grad=True)
        optimizer = make(torch.optim.Adam([theta], lr=0.05))
        for _ in range(5):
            optimizer.zero_grad()
            (theta**4).sum().backward()
            optimizer.step()
        runs.append(theta.detach())
    assert torch.equal(*runs)


# -- argument errors -------------------------------------------------------------------------


def _sgd():
    return torch.optim.SGD([torch.ones(2, requires_grad=True)], lr=0.1)


@pytest.mark.parametrize(
    ("estimator", "match"),
    [
        (
            Autograd,
            r"grad_estimator must be an instance, got the class Autograd; write Autograd\(\)",
        ),
        (AnalyticQuadratic, r"got the class AnalyticQuadratic"),
        (object(), r"grad_estimator must implement estimate\(closure, param_groups\)"),
        (lambda closure, groups: None, r"grad_estimator must implement estimate"),
        (None, r"grad_estimator must implement estimate.*NoneType"),
    ],
)
def test_bad_estimators_raise_type_errors(estimator, match):
    base = _sgd()
    with pytest.raises(TypeError, match=match):
        explore(estimator, base)
    assert "explore_alpha" not in base.param_groups[0]


@pytest.mark.parametrize(
    "base",
    [
        [torch.ones(2, requires_grad=True)],
        nn.Linear(2, 2),
        torch.optim.SGD,  # the class, not an instance
        None,
    ],
    ids=["params", "module", "optimizer-class", "None"],
)
def test_non_optimizer_base_raises_type_error(base):
    with pytest.raises(TypeError, match=r"base_update must be a torch.optim.Optimizer instance"):
        explore(Autograd(), base)
    with pytest.raises(TypeError, match=r"base_update must be a torch.optim.Optimizer instance"):
        E(base)


def test_duck_typed_estimator_without_state_methods_is_refused_at_construction():
    """``state_dict()`` calls the estimator's: a duck with only ``estimate`` must fail now,
    with a clear error, not later at the first checkpoint."""

    class Duck:
        def estimate(self, closure, param_groups):
            return None

    with pytest.raises(
        TypeError, match=r"Duck lacks state_dict and load_state_dict.*GradEstimator"
    ):
        explore(Duck(), _sgd())

    class DuckWithState(Duck):
        def state_dict(self):
            return {}

        def load_state_dict(self, state_dict):
            pass

    theta = torch.ones(2, requires_grad=True)
    optimizer = explore(DuckWithState(), torch.optim.SGD([theta], lr=0.1))
    theta.grad = torch.ones(2)
    optimizer.step()
    optimizer.load_state_dict(optimizer.state_dict())
