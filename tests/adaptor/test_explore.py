"""The explored optimizer E(...): trajectories, schedules, checkpoints, groups, errors.

References are float64 formulas written here (and in ``tests/adaptor/reference.py``), not
the implementation's coefficients. The capability-table tests (``tests/test_optimizers.py``)
already cover the meta-device step, the host-read probe, resume, ``grad=None`` and param
groups for every entry; these tests are the adaptor's own.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from adaptor import E, ExploredOptimizer
from tests.adaptor.reference import TwoBufferReference
from tests.probes import host_read_probe

F64 = torch.float64
SHAPES = [(3, 4), (5,), (2, 2, 3)]


def _params(device, shapes=SHAPES, dtype=F64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(shape, generator=generator, dtype=dtype).to(device).requires_grad_()
        for shape in shapes
    ]


def _clone(params):
    return [p.detach().clone().requires_grad_() for p in params]


def _loss(params, step):
    """A non-quadratic loss whose data changes with the step."""
    generator = torch.Generator().manual_seed(100 + step)
    total = 0.0
    for p in params:
        target = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
        total = total + ((p - target) ** 2).sum() + 0.3 * torch.sin(3 * p).sum()
    return total


def _backward(optimizer, params, step):
    optimizer.zero_grad()
    _loss(params, step).backward()


def _grads(step, shapes=SHAPES, device="cpu"):
    generator = torch.Generator().manual_seed(500 + step)
    return [torch.randn(shape, generator=generator, dtype=F64).to(device) for shape in shapes]


def _assert_equal(actual, expected):
    for i, (a, b) in enumerate(zip(actual, expected)):
        assert torch.equal(a.detach(), b.detach()), f"tensor {i} differs"


def _state_snapshot(optimizer):
    """A deep copy of everything an optimizer holds: base state, adaptor state, groups."""
    return {
        "base": copy.deepcopy(optimizer.base.state_dict()),
        "explore": {
            i: {k: v.clone() for k, v in optimizer.state[p].items()}
            for i, p in enumerate(optimizer._indexed_params())
            if p in optimizer.state
        },
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
    }


def _assert_same_snapshot(actual, expected):
    assert actual["groups"] == expected["groups"]
    assert actual["explore"].keys() == expected["explore"].keys()
    for i, entry in expected["explore"].items():
        for key, value in entry.items():
            assert torch.equal(actual["explore"][i][key], value), (i, key)
    base_a, base_e = actual["base"]["state"], expected["base"]["state"]
    assert base_a.keys() == base_e.keys()
    for i, entry in base_e.items():
        assert base_a[i].keys() == entry.keys()
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(base_a[i][key], value), (i, key)
            else:
                assert base_a[i][key] == value, (i, key)


# -- the object ------------------------------------------------------------------------------


def test_is_a_torch_optimizer_sharing_the_base_groups(device):
    params = _params(device)
    base = torch.optim.Adam(params, lr=1e-2)
    optimizer = E(base, -5.0, 0.99)
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert isinstance(optimizer, ExploredOptimizer)
    assert optimizer.base is base
    assert optimizer.param_groups is base.param_groups
    assert optimizer.param_groups[0]["explore_alpha"] == -5.0
    assert optimizer.param_groups[0]["explore_beta"] == 0.99
    assert optimizer.param_groups[0]["lr"] == 1e-2
    for step in range(2):
        _backward(optimizer, params, step)
        optimizer.step()
    optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert optimizer.param_groups is base.param_groups
    optimizer.param_groups[0]["lr"] = 0.5
    assert base.param_groups[0]["lr"] == 0.5


# -- trajectories ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("h", "lr", "alpha", "beta", "momentum", "expected"),
    [
        # f = θ², θ_0 = 1, lr = 0.1, α = β = 1/2. By hand: g_1 = 2, a_1 = ½·2 = 1,
        # g̃_1 = 2 + ½ = 2.5, θ_1 = 1 - 0.25 = 0.75; g_2 = 1.5, a_2 = ½·1 + ½(1.5 - 2) = 0.25,
        # g̃_2 = 1.625, θ_2 = 0.5875; g_3 = 1.175, a_3 = -0.0375, g̃_3 = 1.15625, θ_3 = 0.471875;
        # g_4 = 0.94375, a_4 = -0.134375, g̃_4 = 0.8765625, θ_4 = 0.38421875.
        (2.0, 0.1, 0.5, 0.5, 0.0, [0.75, 0.5875, 0.471875, 0.38421875]),
        # f = 2θ², θ_0 = 1, lr = 1/8, α = -3, β = 3/4, heavy ball μ = ½ (buf_1 = g̃_1,
        # buf_k = μ·buf_{k-1} + g̃_k). By hand: g_1 = 4, a_1 = 1, g̃_1 = 1, θ_1 = 7/8;
        # g_2 = 7/2, a_2 = 3/4 - 1/8 = 5/8, g̃_2 = 13/8, buf_2 = 17/8, θ_2 = 39/64;
        # θ_3 = 127/512, θ_4 = -553/4096 (explores past the minimum).
        (4.0, 0.125, -3.0, 0.75, 0.5, [7 / 8, 39 / 64, 127 / 512, -553 / 4096]),
    ],
)
def test_sgd_on_a_quadratic_follows_the_hand_computed_trajectory(
    h, lr, alpha, beta, momentum, expected, device
):
    theta = torch.ones((), dtype=F64, device=device, requires_grad=True)
    optimizer = E(torch.optim.SGD([theta], lr=lr, momentum=momentum), alpha, beta)
    trajectory = []
    for _ in expected:
        optimizer.zero_grad()
        (0.5 * h * theta * theta).backward()
        optimizer.step()
        trajectory.append(theta.item())
    assert trajectory == pytest.approx(expected, rel=1e-14, abs=1e-15)


def test_per_group_alpha_zero_is_its_base_bit_for_bit(device):
    """A group with α = 0 moves exactly as the base alone; the other group explores."""
    params = _params(device, dtype=torch.float32)
    twin = _clone(params)
    groups = [{"params": params[:2], "explore_alpha": 0.0}, {"params": params[2:]}]
    optimizer = E(torch.optim.SGD(groups, lr=0.05, momentum=0.9), -5.0, 0.99)
    base = torch.optim.SGD(twin, lr=0.05, momentum=0.9)
    for step in range(6):
        _backward(optimizer, params, step)
        optimizer.step()
        _backward(base, twin, step)
        base.step()
    _assert_equal(params[:2], twin[:2])
    assert not torch.equal(params[2], twin[2]), "the exploring group must differ"


def _run_sgd_lr1(params, optimizer, steps, edit=None):
    """SGD(lr=1) under E: returns the g̃ seen in p.grad after each step."""
    seen = []
    for step in range(steps):
        if edit is not None:
            edit(optimizer, step)
        shapes = [tuple(p.shape) for p in params]
        for p, g in zip(params, _grads(step, shapes, params[0].device)):
            p.grad = g.clone()
        optimizer.step()
        seen.append([p.grad.clone() for p in params])
    return seen


def test_alpha_schedule_takes_effect_between_steps(device):
    alphas = [-5.0, -5.0, 3.0, 0.0, -15.0, 10.0, -1.0, 0.5]
    params = _params(device)
    optimizer = E(torch.optim.SGD(params, lr=1.0), alpha=-5.0, beta=0.95)

    def edit(opt, step):
        opt.param_groups[0]["explore_alpha"] = alphas[step]

    seen = _run_sgd_lr1(params, optimizer, len(alphas), edit)
    references = [TwoBufferReference() for _ in SHAPES]
    for step, alpha in enumerate(alphas):
        for i, g in enumerate(_grads(step)):
            expected = references[i](g, alpha, 0.95)
            torch.testing.assert_close(seen[step][i].cpu(), expected, rtol=1e-12, atol=1e-12)
    # ...and the schedule mattered: a constant α gives another sequence.
    constant = _run_sgd_lr1(_params(device), E(torch.optim.SGD(_params(device), lr=1.0)), 3)
    assert not torch.allclose(constant[2][0], seen[2][0])


def test_beta_change_mid_run_acts_on_the_buffer_formed_under_the_old_beta(device):
    """Documented: a_k = β_{k-1}·a_{k-1} - (1-β_{k-1})·g_{k-1} + (1-β_k)·g_k at a change."""
    betas = [0.9, 0.9, 0.9, 0.5, 0.5, 0.99, 0.0, 0.0]
    alpha = -0.9
    params = _params(device)
    optimizer = E(torch.optim.SGD(params, lr=1.0), alpha=alpha, beta=0.9)

    def edit(opt, step):
        opt.param_groups[0]["explore_beta"] = betas[step]

    seen = _run_sgd_lr1(params, optimizer, len(betas), edit)
    documented = [TwoBufferReference() for _ in SHAPES]
    for step, beta in enumerate(betas):
        for i, g in enumerate(_grads(step)):
            expected = documented[i](g, alpha, beta)
            torch.testing.assert_close(seen[step][i].cpu(), expected, rtol=1e-12, atol=1e-12)

    # The other reading, a_k = β_k·a_{k-1} + (1-β_k)(g_k - g_{k-1}), differs at a change:
    # the test tells the two apart.
    a, previous = torch.zeros(SHAPES[0], dtype=F64), torch.zeros(SHAPES[0], dtype=F64)
    for step, beta in enumerate(betas[:4]):
        g = _grads(step)[0]
        a, previous = beta * a + (1 - beta) * (g - previous), g
    assert not torch.allclose(seen[3][0].cpu(), _grads(3)[0] + alpha * a, rtol=1e-6)


# -- bases it has never seen -----------------------------------------------------------------


class SignMomentum(torch.optim.Optimizer):
    """A tiny third-party-style optimizer: m ← μ·m + g, θ ← θ - lr·sign(m)·|m|^½."""

    def __init__(self, params, lr=0.01, mu=0.8):
        super().__init__(params, {"lr": lr, "mu": mu})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                m = state.setdefault("m", torch.zeros_like(p))
                m.mul_(group["mu"]).add_(p.grad)
                p.sub_(group["lr"] * m.sign() * m.abs().sqrt())


def _reference_run(base_factory, alpha, beta, device, steps=6):
    """The base alone, fed g̃ from the float64 reference instead of its gradients."""
    params = _params(device)
    base = base_factory(params)
    references = [TwoBufferReference() for _ in params]
    for step in range(steps):
        base.zero_grad()
        _loss(params, step).backward()
        for p, reference in zip(params, references):
            p.grad = reference(p.grad, alpha, beta).to(device)
        base.step()
    return params


@pytest.mark.parametrize(
    "base_factory",
    [
        lambda params: torch.optim.Adagrad(params, lr=0.1, lr_decay=0.01),
        lambda params: torch.optim.RMSprop(params, lr=0.01, alpha=0.9, momentum=0.5),
        lambda params: SignMomentum(params, lr=0.05),
        lambda params: torch.optim.Adam(params, lr=0.01, foreach=False),
        lambda params: torch.optim.NAdam(params, lr=0.01),
    ],
    ids=["Adagrad", "RMSprop", "custom", "Adam-forloop", "NAdam"],
)
def test_wraps_optimizers_it_has_never_seen(base_factory, device):
    alpha, beta = -2.0, 0.8
    params = _params(device)
    optimizer = E(base_factory(params), alpha, beta)
    for step in range(6):
        _backward(optimizer, params, step)
        optimizer.step()
    expected = _reference_run(base_factory, alpha, beta, device)
    for p, q in zip(params, expected):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    # The base's own state (e.g. RMSprop's square average) lives in the base.
    assert all("explore_buffer" not in s for s in optimizer.base.state.values())
    assert all("explore_buffer" in optimizer.state[p] for p in params)


# -- checkpoints -----------------------------------------------------------------------------

BASES = {
    "SGD-momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "Adam": lambda params: torch.optim.Adam(params, lr=0.01),
    "AdamW": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1),
}


def _trained(name, device, steps=3, **kwargs):
    params = _params(device)
    optimizer = E(BASES[name](params), **kwargs)
    for step in range(steps):
        _backward(optimizer, params, step)
        optimizer.step()
    return params, optimizer


@pytest.mark.parametrize("name", BASES)
def test_state_dict_layout_is_torchs_with_the_buffer(name, device):
    params, optimizer = _trained(name, device, alpha=-5.0, beta=0.99)
    state_dict = optimizer.state_dict()
    assert set(state_dict) >= {"state", "param_groups"}
    assert sorted(state_dict["state"]) == list(range(len(params)))
    for index, p in enumerate(params):
        entry = state_dict["state"][index]
        buffer = entry["explore_buffer"]
        assert buffer.shape == p.shape and buffer.device == p.device
        assert buffer is optimizer.state[p]["explore_buffer"]  # as torch: live tensors
        assert set(entry) - {"explore_buffer"} == set(optimizer.base.state[p])
    (group,) = state_dict["param_groups"]
    assert group["params"] == list(range(len(params)))
    assert group["explore_alpha"] == -5.0 and group["explore_beta"] == 0.99
    # state_dict() must not inject the buffer into the base's live state.
    assert all("explore_buffer" not in optimizer.base.state[p] for p in params)
    assert all(
        "explore_buffer" not in entry for entry in optimizer.base.state_dict()["state"].values()
    )


@pytest.mark.parametrize("name", BASES)
def test_resume_into_a_fresh_optimizer_and_share_groups(name, device):
    params, optimizer = _trained(name, device, alpha=-3.0, beta=0.9)
    saved = copy.deepcopy(optimizer.state_dict())
    resumed_params = _clone(params)
    resumed = E(BASES[name](resumed_params), alpha=0.7, beta=0.1)  # α/β come from the dict
    resumed.load_state_dict(saved)
    assert resumed.param_groups is resumed.base.param_groups
    assert resumed.param_groups[0]["explore_alpha"] == -3.0
    for step in range(3, 6):
        for opt, ps in ((optimizer, params), (resumed, resumed_params)):
            _backward(opt, ps, step)
            opt.step()
    _assert_equal(resumed_params, params)
    # the loaded buffers are the optimizer's own copies
    assert all(
        resumed.state[p]["explore_buffer"].data_ptr()
        != saved["state"][i]["explore_buffer"].data_ptr()
        for i, p in enumerate(resumed_params)
    )


def _another_state_dict(optimizer):
    """A loadable state dict that differs from the optimizer's (lr, step, every tensor)."""
    state_dict = copy.deepcopy(optimizer.state_dict())
    for group in state_dict["param_groups"]:
        group["lr"] = 0.123
    for entry in state_dict["state"].values():
        for key, value in entry.items():
            entry[key] = value * 2 + 1
    return state_dict


def _bad_state_dicts(optimizer, params):
    good = _another_state_dict(optimizer)

    def edited(edit):
        state_dict = copy.deepcopy(good)
        edit(state_dict)
        return state_dict

    def wrong_shape(sd):
        sd["state"][1]["explore_buffer"] = torch.zeros(7, dtype=F64)

    def not_a_tensor(sd):
        sd["state"][0]["explore_buffer"] = [0.0] * 12

    def bad_index(sd):
        sd["state"][99] = {"explore_buffer": torch.zeros(3)}

    def negative_index(sd):
        sd["state"][-1] = {"explore_buffer": torch.zeros(5, dtype=F64)}

    def string_index(sd):
        sd["state"]["0"] = sd["state"].pop(0)

    def bad_alpha(sd):
        sd["param_groups"][0]["explore_alpha"] = 1000.0

    def bad_beta(sd):
        sd["param_groups"][0]["explore_beta"] = 1.5

    def group_size(sd):
        sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]

    return [
        (edited(wrong_shape), ValueError, r"explore buffer of parameter 1 has shape"),
        (edited(not_a_tensor), ValueError, r"explore buffer of parameter 0"),
        (edited(bad_index), ValueError, r"parameter index 99.*3 parameters"),
        (edited(negative_index), ValueError, r"parameter index -1"),
        (edited(string_index), ValueError, r"parameter index '0'"),
        (edited(bad_alpha), ValueError, r"\|alpha\| < 1/\(1-beta\)"),
        (edited(bad_beta), ValueError, r"0 <= beta < 1"),
        (edited(group_size), ValueError, r"size"),
        ([("state", {})], ValueError, r"state_dict must be a dict"),
        ({**good, "explore_estimator": {"seed": 3}}, ValueError, r"keeps no state"),
    ]


def test_mismatched_state_dict_raises_and_leaves_the_optimizer_unchanged(device):
    params, optimizer = _trained("Adam", device, alpha=-5.0, beta=0.99)
    twin_params, twin = _trained("Adam", device, alpha=-5.0, beta=0.99)
    # The check can fail: loading the unedited other state dict changes the snapshot.
    _, probe = _trained("Adam", device, alpha=-5.0, beta=0.99)
    probe_before = _state_snapshot(probe)
    probe.load_state_dict(_another_state_dict(probe))
    with pytest.raises(AssertionError):
        _assert_same_snapshot(_state_snapshot(probe), probe_before)

    for bad, exc, match in _bad_state_dicts(optimizer, params):
        before = _state_snapshot(optimizer)
        values = [p.detach().clone() for p in params]
        with pytest.raises(exc, match=match):
            optimizer.load_state_dict(bad)
        _assert_same_snapshot(_state_snapshot(optimizer), before)
        _assert_equal(params, values)
        assert optimizer.param_groups is optimizer.base.param_groups
    # ...and it continues exactly as an optimizer that never saw the bad dicts.
    for step in range(3, 5):
        for opt, ps in ((optimizer, params), (twin, twin_params)):
            _backward(opt, ps, step)
            opt.step()
    _assert_equal(params, twin_params)


def test_a_plain_base_state_dict_loads(device):
    """The base's own checkpoint: base state restored, α/β from E, the buffer restarts (a_0=0)."""
    alpha, beta, lr, mu = -2.0, 0.9, 0.1, 0.9
    params = _params(device)
    base = torch.optim.SGD(params, lr=lr, momentum=mu)
    for step in range(3):
        _backward(base, params, step)
        base.step()
    saved = copy.deepcopy(base.state_dict())
    momentum = [base.state[p]["momentum_buffer"].clone() for p in params]

    resumed_params = _clone(params)
    resumed = E(torch.optim.SGD(resumed_params, lr=lr, momentum=mu), alpha, beta)
    resumed.load_state_dict(saved)
    group = resumed.param_groups[0]
    assert (group["explore_alpha"], group["explore_beta"]) == (alpha, beta)
    # the buffers restart; resumed.state shows the base's momentum merged in
    assert not any("explore_buffer" in resumed.state[p] for p in resumed_params)
    _backward(resumed, resumed_params, 3)
    grads = [p.grad.clone() for p in resumed_params]
    start = [p.detach().clone() for p in resumed_params]
    resumed.step()
    for p, p0, g, m in zip(resumed_params, start, grads, momentum):
        g_tilde = TwoBufferReference()(g, alpha, beta)  # first step of a fresh buffer
        expected = p0 - lr * (mu * m + g_tilde)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-12)


# -- schedulers and groups -------------------------------------------------------------------


def test_lr_scheduler_drives_the_base_learning_rate(device):
    params = _params(device)
    optimizer = E(torch.optim.SGD(params, lr=1.0), alpha=0.0, beta=0.5)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for step in range(4):
            for p, g in zip(params, _grads(step, device=device)):
                p.grad = g.clone()
            before = [p.detach().clone() for p in params]
            optimizer.step()
            lr = 0.5**step
            assert optimizer.base.param_groups[0]["lr"] == lr
            for p, p0, g in zip(params, before, _grads(step, device=device)):
                torch.testing.assert_close(p.detach(), p0 - lr * g, rtol=1e-14, atol=1e-14)
            scheduler.step()
    assert optimizer.base.param_groups[0]["lr"] == 0.5**4
    assert scheduler.get_last_lr() == [0.5**4]


def test_add_param_group_reaches_the_base_with_the_adaptor_defaults(device):
    first, second, third = _params(device), _params(device, seed=1), _params(device, seed=2)
    base = torch.optim.SGD(first, lr=1.0)
    optimizer = E(base, alpha=-3.0, beta=0.9)
    optimizer.add_param_group({"params": second, "lr": 1.0})
    optimizer.add_param_group({"params": third, "lr": 1.0, "explore_alpha": 0.25})
    assert len(base.param_groups) == 3 and optimizer.param_groups is base.param_groups
    assert base.param_groups[1]["explore_alpha"] == -3.0
    assert base.param_groups[1]["explore_beta"] == 0.9
    assert base.param_groups[2]["explore_alpha"] == 0.25
    assert base.param_groups[2]["explore_beta"] == 0.9
    assert base.param_groups[1]["momentum"] == 0  # the base's own defaults are filled in
    with pytest.raises(ValueError, match=r"\|alpha\| < 1/\(1-beta\).*new param group"):
        optimizer.add_param_group({"params": _params(device, seed=3), "explore_alpha": 10.5})
    assert len(base.param_groups) == 3

    seen = _run_sgd_lr1(first + second + third, optimizer, 3)
    shapes = SHAPES * 3
    references = [TwoBufferReference() for _ in shapes]
    for step in range(3):
        grads = _grads(step, shapes)
        for i, g in enumerate(grads):
            alpha = 0.25 if i >= 6 else -3.0
            expected = references[i](g, alpha, 0.9)
            torch.testing.assert_close(seen[step][i].cpu(), expected, rtol=1e-12, atol=1e-12)


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"alpha": -100.0, "beta": 0.99}, ValueError, r"\|alpha\| < 1/\(1-beta\) = 100"),
        ({"alpha": 1.0, "beta": 0.0}, ValueError, r"\|alpha\| < 1/\(1-beta\) = 1"),
        ({"alpha": 0.0, "beta": 1.0}, ValueError, r"0 <= beta < 1"),
        ({"alpha": 0.0, "beta": -0.5}, ValueError, r"0 <= beta < 1"),
        ({"alpha": torch.tensor(-5.0)}, TypeError, r"alpha must be a real number"),
        ({"beta": None}, TypeError, r"beta must be a real number"),
        ({"fused": "yes"}, TypeError, r"fused must be True, False or None"),
    ],
)
def test_invalid_construction_raises_and_leaves_the_base_alone(kwargs, exc, match):
    params = _params("cpu")
    base = torch.optim.Adam(params)
    groups_before = copy.deepcopy(
        [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]
    )
    with pytest.raises(exc, match=match):
        E(base, **kwargs)
    assert [
        {k: v for k, v in g.items() if k != "params"} for g in base.param_groups
    ] == groups_before


def test_bases_that_need_their_own_closure_are_rejected():
    params = _params("cpu")
    with pytest.raises(TypeError, match=r"LBFGS needs a closure.*not supported"):
        E(torch.optim.LBFGS(params))

    class NeedsClosure(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"lr": 0.1})

        def step(self, closure):
            return closure()

    with pytest.raises(TypeError, match=r"NeedsClosure needs a closure"):
        E(NeedsClosure(params))
    with pytest.raises(TypeError, match=r"already explores"):
        E(E(torch.optim.SGD(params, lr=0.1)))


@pytest.mark.parametrize(
    ("key", "value", "exc", "match"),
    [
        ("explore_alpha", 200.0, ValueError, r"\|alpha\| < 1/\(1-beta\) = 100.*param group 1"),
        ("explore_alpha", float("nan"), ValueError, r"\|alpha\| < 1/\(1-beta\).*param group 1"),
        ("explore_beta", 1.0, ValueError, r"0 <= beta < 1.*param group 1"),
        ("explore_beta", 0.5, ValueError, r"\|alpha\| < 1/\(1-beta\) = 2.*param group 1"),
        ("explore_alpha", torch.tensor(1.0), TypeError, r"alpha must be a real number.*group 1"),
    ],
)
def test_group_edited_to_an_inadmissible_value_fails_before_anything_changes(
    key, value, exc, match, device
):
    params = _params(device)
    groups = [{"params": params[:1]}, {"params": params[1:], "explore_alpha": -50.0}]
    optimizer = E(torch.optim.Adam(groups, lr=0.01), alpha=-5.0, beta=0.99)
    for step in range(2):
        _backward(optimizer, params, step)
        optimizer.step()
    optimizer.param_groups[1][key] = value
    _backward(optimizer, params, 2)
    before = _state_snapshot(optimizer)
    values = [p.detach().clone() for p in params]
    grads = [p.grad.clone() for p in params]
    calls = []

    def closure():
        calls.append(1)
        return _loss(params, 2)

    for call in (optimizer.step, lambda: optimizer.step(closure)):
        with pytest.raises(exc, match=match):
            call()
        _assert_equal(params, values)
        _assert_equal([p.grad for p in params], grads)
        _assert_same_snapshot(_state_snapshot(optimizer), before)
    assert calls == [], "the closure must not run when the hyperparameters are invalid"


def test_sparse_gradients_raise_before_anything_changes(device):
    embedding = nn.Embedding(10, 3, sparse=True).to(device=device, dtype=F64)
    dense = torch.randn(4, dtype=F64, device=device, requires_grad=True)
    optimizer = E(torch.optim.SGD([dense, embedding.weight], lr=0.1), -5.0, 0.99)
    dense.grad = torch.ones_like(dense)
    optimizer.step()  # creates the dense parameter's buffer
    index = torch.tensor([1, 3], device=device)
    optimizer.zero_grad()
    (embedding(index).sum() + dense.sum()).backward()
    assert embedding.weight.grad.is_sparse
    before = _state_snapshot(optimizer)
    values = [dense.detach().clone(), embedding.weight.detach().clone()]
    dense_grad = dense.grad.clone()
    with pytest.raises(ValueError, match=r"sparse gradients \(param group 0\)"):
        optimizer.step()
    _assert_equal([dense, embedding.weight], values)
    assert torch.equal(dense.grad, dense_grad), "the dense gradient must not be replaced"
    _assert_same_snapshot(_state_snapshot(optimizer), before)


# -- grad=None, closures, zero_grad ----------------------------------------------------------


def test_parameter_without_grad_keeps_its_buffer_and_resumes_its_own_sequence(device):
    """A skipped step is no step for that parameter: its a and g_{k-1} are those of before."""
    alpha, beta = -3.0, 0.8
    params = _params(device)
    optimizer = E(torch.optim.SGD(params, lr=1.0), alpha, beta)
    references = [TwoBufferReference() for _ in SHAPES]
    skipped_at = 2
    for step in range(5):
        grads = _grads(step, device=device)
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = None if (i == 1 and step == skipped_at) else g.clone()
        if step == skipped_at:
            buffer = optimizer.state[params[1]]["explore_buffer"]
            buffer_before, value_before = buffer.clone(), params[1].detach().clone()
        optimizer.step()
        for i, (p, g) in enumerate(zip(params, grads)):
            if i == 1 and step == skipped_at:
                assert p.grad is None
                assert optimizer.state[p]["explore_buffer"] is buffer
                assert torch.equal(buffer, buffer_before)
                assert torch.equal(p.detach(), value_before)
                continue
            expected = references[i](g.cpu(), alpha, beta)
            torch.testing.assert_close(p.grad.cpu(), expected, rtol=1e-12, atol=1e-12)


def test_closure_step_replaces_the_closures_gradients(device):
    """The closure's gradients get α·a (the reference E passes the closure on and drops it)."""
    alpha, beta = -5.0, 0.9
    by_closure, by_hand, plain = _params(device), _params(device), _params(device)
    opt_closure = E(torch.optim.Adam(by_closure, lr=0.01), alpha, beta)
    opt_hand = E(torch.optim.Adam(by_hand, lr=0.01), alpha, beta)
    opt_plain = torch.optim.Adam(plain, lr=0.01)
    calls = []
    for step in range(5):

        def closure(step=step):
            calls.append(step)
            opt_closure.zero_grad()
            loss = _loss(by_closure, step)
            loss.backward()
            return loss

        loss = opt_closure.step(closure)
        assert torch.equal(loss.detach(), _loss(by_hand, step).detach())
        _backward(opt_hand, by_hand, step)
        opt_hand.step()
        opt_plain.zero_grad()
        _loss(plain, step).backward()
        opt_plain.step()
    assert calls == list(range(5)), "the closure runs exactly once per step"
    _assert_equal(by_closure, by_hand)
    assert not any(torch.equal(a, b) for a, b in zip(by_closure, plain)), "α·a must not be dropped"


def test_closure_step_matches_the_float64_reference(device):
    alpha, beta = 0.5, 0.3
    params = _params(device)
    optimizer = E(torch.optim.SGD(params, lr=1.0), alpha, beta)
    references = [TwoBufferReference() for _ in params]
    for step in range(5):
        twins = _clone(params)
        _loss(twins, step).backward()  # the gradient the closure will compute

        def closure(step=step):
            optimizer.zero_grad()
            loss = _loss(params, step)
            loss.backward()
            return loss

        returned = optimizer.step(closure)
        assert isinstance(returned, torch.Tensor) and returned.requires_grad
        for p, twin, reference in zip(params, twins, references):
            expected_grad = reference(twin.grad, alpha, beta)
            torch.testing.assert_close(p.grad, expected_grad, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(
                p.detach(), twin.detach() - expected_grad, rtol=1e-12, atol=1e-12
            )


@pytest.mark.parametrize("set_to_none", [True, False, None])
def test_zero_grad_behaves_as_torch(set_to_none, device):
    params = _params(device)
    optimizer = E(torch.optim.SGD(params, lr=0.1), -5.0, 0.99)
    _loss(params, 0).backward()
    optimizer.step()
    grads = [p.grad for p in params]
    if set_to_none is None:
        optimizer.zero_grad()  # torch's default: None
    else:
        optimizer.zero_grad(set_to_none=set_to_none)
    if set_to_none is False:
        assert all(
            p.grad is g and torch.equal(g, torch.zeros_like(g)) for p, g in zip(params, grads)
        )
    else:
        assert all(p.grad is None for p in params)
    assert all("explore_buffer" in optimizer.state[p] for p in params), "buffers stay"


# -- telemetry -------------------------------------------------------------------------------


def test_telemetry_is_off_by_default(device):
    params = _params(device)
    optimizer = E(torch.optim.SGD(params, lr=0.1))
    _loss(params, 0).backward()
    optimizer.step()
    assert optimizer.telemetry is None


def test_telemetry_values_equal_independent_norms(device):
    alphas, beta = (-5.0, 2.0), 0.9
    params = _params(device)
    frozen = torch.zeros(7, dtype=F64, device=device, requires_grad=True)  # never has a grad
    groups = [
        {"params": [*params[:2], frozen], "explore_alpha": alphas[0]},
        {"params": params[2:], "explore_alpha": alphas[1]},
    ]
    optimizer = E(torch.optim.SGD(groups, lr=0.01), beta=beta, telemetry=True)
    assert optimizer.telemetry is None  # nothing recorded before the first step
    references = [TwoBufferReference() for _ in params]
    for step in range(4):
        _backward(optimizer, params, step)
        grads = [p.grad.detach().cpu().clone() for p in params]
        optimizer.step()
        accels = []
        for g, reference in zip(grads, references):
            reference(g, 0.0, beta)
            accels.append(reference.accel)
        g_norm = torch.sqrt(sum((g**2).sum() for g in grads))
        a_norm = torch.sqrt(sum((a**2).sum() for a in accels))
        scaled = torch.sqrt(
            sum(
                ((alphas[0] if i < 2 else alphas[1]) * a).pow(2).sum() for i, a in enumerate(accels)
            )
        )
        telemetry = optimizer.telemetry
        assert set(telemetry) == {"grad_norm", "accel_norm", "ratio"}
        for key, expected in (
            ("grad_norm", g_norm),
            ("accel_norm", a_norm),
            ("ratio", scaled / g_norm),
        ):
            value = telemetry[key]
            assert isinstance(value, torch.Tensor) and value.dim() == 0, key
            assert value.device == params[0].device, key
            torch.testing.assert_close(value.to("cpu", F64), expected, rtol=1e-12, atol=0, msg=key)


def test_telemetry_reads_nothing_on_the_host():
    params = _params("cpu", dtype=torch.float32)
    optimizer = E(torch.optim.Adam(params, lr=0.01), -5.0, 0.99, telemetry=True)
    for step in range(2):
        _backward(optimizer, params, step)
        optimizer.step()
    _backward(optimizer, params, 2)
    with host_read_probe() as reads:
        optimizer.step()
    assert reads == []
    assert optimizer.telemetry["ratio"].dtype == torch.float32
