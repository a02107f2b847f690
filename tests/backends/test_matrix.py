"""Muon (``backends.matrix``): Newton–Schulz, float64 references, torch.optim.Muon, batching."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import backends.matrix as matrix
from adaptor import E
from backends import Muon
from backends._state import KAHAN_KEY
from backends.matrix import newton_schulz
from tests.amp import amp_run
from tests.probes import host_read_probe

# -- independent float64 references, written from the formulas -------------------------------

# Keller Jordan's quintic (a, b, c), typed here: reading the implementation's constant would
# let a wrong coefficient pass (a 2.0315 → 2.0415 mutation survived that way).
QUINTIC = (3.4445, -4.7750, 2.0315)


def reference_newton_schulz(g, steps=5, coefficients=QUINTIC, eps=1e-7):
    """X₀ = G/max(‖G‖_F, ε) (Gᵀ when tall); X ← aX + (bA + cA²)X with A = XXᵀ."""
    a, b, c = coefficients
    x = g.to(torch.float64)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / torch.clamp(torch.sqrt((x * x).sum()), min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def reference_run(params, grads_per_step, *, lr, momentum, nesterov, weight_decay,
                  adjust_lr_fn, adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay):
    """Muon for ndim >= 2, AdamW for the rest, in float64, one parameter at a time."""
    params = [p.detach().to(torch.float64).clone() for p in params]
    buffers = [torch.zeros_like(p) for p in params]
    first = [torch.zeros_like(p) for p in params]
    second = [torch.zeros_like(p) for p in params]
    beta1, beta2 = adamw_betas
    for t, grads in enumerate(grads_per_step, start=1):
        for i, (p, g) in enumerate(zip(params, grads)):
            g = g.to(torch.float64)
            if p.dim() >= 2:
                rows, cols = p.shape[0], math.prod(p.shape[1:])
                buffers[i] = momentum * buffers[i] + (1 - momentum) * g
                u = (1 - momentum) * g + momentum * buffers[i] if nesterov else buffers[i]
                o = reference_newton_schulz(u.reshape(rows, cols)).reshape(p.shape)
                if adjust_lr_fn == "original":
                    scale = math.sqrt(max(1.0, rows / cols))
                else:
                    scale = 0.2 * math.sqrt(max(rows, cols))
                params[i] = p * (1 - lr * weight_decay) - lr * scale * o
            else:
                first[i] = beta1 * first[i] + (1 - beta1) * g
                second[i] = beta2 * second[i] + (1 - beta2) * g * g
                m_hat = first[i] / (1 - beta1**t)
                v_hat = second[i] / (1 - beta2**t)
                params[i] = p * (1 - adamw_lr * adamw_weight_decay) - adamw_lr * m_hat / (
                    torch.sqrt(v_hat) + adamw_eps
                )
    return params


def random_params(shapes, dtype=torch.float32, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(s, generator=generator, dtype=dtype).to(device).requires_grad_()
        for s in shapes
    ]


def random_grads(shapes, steps, dtype=torch.float32, seed=1, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(s, generator=generator, dtype=dtype).to(device) for s in shapes]
        for _ in range(steps)
    ]


def run(optimizer, params, grads_per_step):
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()


# -- Newton–Schulz -----------------------------------------------------------------------------

RECTANGULAR = [(32, 64), (64, 32), (16, 128), (200, 50), (8, 36), (96, 40)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", RECTANGULAR, ids=str)
def test_newton_schulz_maps_singular_values_near_one_and_keeps_singular_vectors(
    shape, dtype, device
):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(device)
    o = newton_schulz(g, dtype=dtype)
    assert o.dtype == dtype and o.shape == g.shape
    o64 = o.to(torch.float64).cpu()
    singular_values = torch.linalg.svdvals(o64)
    assert singular_values.min() > 0.6 and singular_values.max() < 1.3, singular_values
    # same singular vectors as g: Uᵀ O V is diagonal
    u, _, vh = torch.linalg.svd(g.to(torch.float64).cpu(), full_matrices=False)
    core = u.T @ o64 @ vh.T
    off_diagonal = core - torch.diag(torch.diagonal(core))
    tolerance = 0.05 if dtype == torch.bfloat16 else 1e-4
    assert off_diagonal.abs().max() < tolerance


def test_newton_schulz_matches_the_float64_reference_and_batches_per_matrix(device):
    """Default coefficients against the typed quintic (mutation: 2.0315 → 2.0415 fails here)."""
    shapes = [(12, 20), (30, 7)]
    for shape in shapes:
        batch = torch.randn((4, *shape), generator=torch.Generator().manual_seed(3)).to(device)
        batch[1] *= 1e3  # each matrix is normalised by its own norm
        expected = torch.stack([reference_newton_schulz(m) for m in batch])
        batched = newton_schulz(batch, dtype=torch.float64)
        torch.testing.assert_close(batched, expected, rtol=1e-10, atol=1e-12)
        for m, e in zip(batch, expected):
            torch.testing.assert_close(newton_schulz(m, dtype=torch.float64), e,
                                       rtol=1e-10, atol=1e-12)


def test_newton_schulz_leaves_its_input_alone():
    g = torch.randn(8, 5, dtype=torch.bfloat16)
    before = g.clone()
    newton_schulz(g, dtype=torch.bfloat16)
    assert torch.equal(g, before)
    with pytest.raises(ValueError, match="matrix or a batch"):
        newton_schulz(torch.randn(5))


# -- the optimizer against float64 references --------------------------------------------------

MIXED = [(6, 5), (6,), (4, 6), (4,), (3, 2, 2, 2), (5, 5), (5, 5), (9, 3)]


@pytest.mark.parametrize(
    ("nesterov", "adjust_lr_fn", "weight_decay"),
    [(True, "original", 0.0), (False, "match_rms_adamw", 0.1), (True, "match_rms_adamw", 0.05)],
)
def test_step_matches_the_float64_reference(nesterov, adjust_lr_fn, weight_decay, device):
    settings = dict(lr=0.03, momentum=0.9, nesterov=nesterov, weight_decay=weight_decay,
                    adjust_lr_fn=adjust_lr_fn, adamw_lr=1e-2, adamw_betas=(0.8, 0.9),
                    adamw_eps=1e-6, adamw_weight_decay=0.01)
    params = random_params(MIXED, torch.float64, device=device)
    grads = random_grads(MIXED, 6, torch.float64, device=device)
    expected = reference_run(params, grads, **settings)
    optimizer = Muon(params, ns_dtype=torch.float64, **settings)
    run(optimizer, params, grads)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("nesterov", "adjust_lr_fn", "weight_decay"),
    [(True, "original", 0.1), (False, "original", 0.0), (True, "match_rms_adamw", 0.02)],
)
def test_agrees_with_torch_optim_muon(nesterov, adjust_lr_fn, weight_decay):
    """torch.optim.Muon runs Newton–Schulz in bfloat16 only: compare with the same dtype."""
    shapes = [(16, 16), (16, 16), (16, 16), (8, 24), (24, 8), (1, 10)]
    settings = dict(lr=0.02, momentum=0.95, nesterov=nesterov, weight_decay=weight_decay,
                    adjust_lr_fn=adjust_lr_fn)
    ours_params = random_params(shapes)
    torch_params = [p.detach().clone().requires_grad_() for p in ours_params]
    grads = random_grads(shapes, 5)
    run(Muon(ours_params, ns_dtype=torch.bfloat16, **settings), ours_params, grads)
    run(torch.optim.Muon(torch_params, **settings), torch_params, grads)
    # Batched and single-matrix bfloat16 matmuls may round differently: allow a few bfloat16
    # ulps of each step's update (lr·scale·|O| with |O| <= ~1.3).
    for a, b, start in zip(ours_params, torch_params, random_params(shapes)):
        scale = matrix.lr_adjustment(a.shape[0], a.shape[1], adjust_lr_fn)
        atol = len(grads) * 0.02 * scale * 1.3 * 4 * 2.0**-8
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=atol)
        assert (a - start).abs().max() > 10 * atol  # the comparison is not vacuous


@pytest.mark.parametrize("ns_dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_batched_and_unbatched_paths_agree(ns_dtype, device, monkeypatch):
    shapes = [(6, 9), (6, 9), (6, 9), (12, 4), (12, 4), (4, 3, 2, 2), (4, 3, 2, 2), (7,)]
    dtype = torch.float64 if ns_dtype == torch.float64 else torch.float32
    grads = random_grads(shapes, 4, dtype, device=device)
    results = []
    configurations = (  # (batched, elements per batch, elements per batched matrix)
        (True, matrix.MAX_BATCH_NUMEL, matrix.MAX_BATCHED_MATRIX_NUMEL),
        (True, 60, matrix.MAX_BATCHED_MATRIX_NUMEL),  # batches of one or two matrices
        (True, matrix.MAX_BATCH_NUMEL, 50),  # 6×9 one at a time, 4×12 batched
        (False, 0, 0),
    )
    for batched, max_numel, max_matrix_numel in configurations:
        monkeypatch.setattr(matrix, "MAX_BATCH_NUMEL", max_numel)
        monkeypatch.setattr(matrix, "MAX_BATCHED_MATRIX_NUMEL", max_matrix_numel)
        params = random_params(shapes, dtype, device=device)
        run(Muon(params, ns_dtype=ns_dtype, batched=batched), params, grads)
        results.append([p.detach() for p in params])
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 4 * 0.02 * 2.0**-7}
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=0, atol=tolerance[ns_dtype])


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
def test_bfloat16_momentum_buffer_is_not_normalised_in_place_without_nesterov(state_dtype):
    """torch 2.13's Muon divides a bfloat16 buffer by its norm in place when nesterov=False.

    The buffer is float32 by default for bfloat16 parameters; with ``state_dtype=bfloat16``
    it is the float32 lerp rounded once.
    """
    shapes = [(8, 4), (4, 8)]
    params = random_params(shapes, torch.bfloat16)
    grads = random_grads(shapes, 3, torch.bfloat16)
    optimizer = Muon(params, lr=0.01, momentum=0.9, nesterov=False, state_dtype=state_dtype)
    stored = torch.float32 if state_dtype is None else state_dtype
    expected = [torch.zeros(s, dtype=stored) for s in shapes]
    for step, step_grads in enumerate(grads):
        run(optimizer, params, [step_grads])
        for i, (p, g) in enumerate(zip(params, step_grads)):
            expected[i] = expected[i].float().lerp(g.float(), 0.1).to(stored)
            assert torch.equal(optimizer.state[p]["momentum_buffer"], expected[i]), (step, i)
    # and the update is the orthogonalised buffer (first step, from θ = 0 so that the update
    # is not lost below the resolution of θ: a step that does nothing fails by ~20 × atol)
    twin = [torch.zeros(s, dtype=torch.bfloat16, requires_grad=True) for s in shapes]
    run(Muon(twin, lr=0.01, momentum=0.9, nesterov=False), twin, grads[:1])
    for p, g in zip(twin, grads[0]):
        scale = 0.01 * math.sqrt(max(1, p.shape[0] / p.shape[1]))
        expected_p = -scale * reference_newton_schulz(g.to(torch.float64) * 0.1)
        atol = 0.05 * scale  # bfloat16 Newton–Schulz: a few % of the update (measured ≤ 2.5 %)
        assert expected_p.abs().max() > 10 * atol
        torch.testing.assert_close(p.detach().to(torch.float64), expected_p, rtol=0, atol=atol)


def test_gradients_are_left_as_they_are():
    params = random_params(MIXED)
    grads = random_grads(MIXED, 1)[0]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    Muon(params).step()
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, g)


# -- routing, state, errors ----------------------------------------------------------------------


def test_routing_by_ndim_and_by_group():
    embedding, hidden, bias = random_params([(10, 4), (4, 4), (4,)])
    optimizer = Muon([{"params": [embedding], "use_muon": False}, {"params": [hidden, bias]}],
                     adamw_lr=None, lr=0.05)
    run(optimizer, [embedding, hidden, bias], random_grads([(10, 4), (4, 4), (4,)], 2))
    assert set(optimizer.state[embedding]) == {"step", "exp_avg", "exp_avg_sq"}
    assert set(optimizer.state[hidden]) == {"momentum_buffer"}
    assert set(optimizer.state[bias]) == {"step", "exp_avg", "exp_avg_sq"}
    state = optimizer.state_dict()["state"]
    assert set(state) == {0, 1, 2} and set(state[1]) == {"momentum_buffer"}


def test_internal_adamw_equals_torch_adamw():
    """adamw_lr=None: the AdamW parameters step with the group's lr (Moonlight style)."""
    shapes = [(5,), (3, 4)]
    ours = random_params(shapes, torch.float64)
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    grads = random_grads(shapes, 5, torch.float64)
    run(Muon(ours, lr=0.01, use_muon=False, adamw_lr=None, adamw_betas=(0.9, 0.99),
             adamw_eps=1e-8, adamw_weight_decay=0.1), ours, grads)
    run(torch.optim.AdamW(theirs, lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1),
        theirs, grads)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-14)


def test_checkpoint_through_torch_save_weights_only_resumes_bit_exactly():
    params = random_params(MIXED)
    grads = random_grads(MIXED, 6)
    optimizer = Muon(params, weight_decay=0.01)
    run(optimizer, params, grads[:3])
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    run(optimizer, params, grads[3:])
    buffer.seek(0)
    resumed = Muon(resumed_params, weight_decay=0.01)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    run(resumed, resumed_params, grads[3:])
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)
    assert resumed.state[resumed_params[1]]["step"].dtype == torch.float32


def test_sparse_gradient_is_rejected_before_anything_moves():
    params = random_params([(4, 4), (3, 3)])
    before = [p.detach().clone() for p in params]
    params[0].grad = torch.randn(4, 4)
    params[1].grad = torch.eye(3).to_sparse()
    optimizer = Muon(params)
    with pytest.raises(RuntimeError, match="sparse gradients"):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and not optimizer.state


def test_complex_parameters_and_bad_groups_are_rejected_at_construction():
    with pytest.raises(TypeError, match="complex parameters"):
        Muon([torch.randn(3, 3, dtype=torch.complex64)])
    optimizer = Muon(random_params([(3, 3)]))
    with pytest.raises(ValueError, match=r"use_muon=True .*param group 1 has shape \(3,\)"):
        optimizer.add_param_group({"params": random_params([(3,)], seed=5), "use_muon": True})
    assert len(optimizer.param_groups) == 1  # nothing half-added


def test_explored_muon_shares_param_groups_and_checkpoints_both_states():
    params = random_params(MIXED)
    optimizer = E(Muon(params), alpha=0.5, beta=0.01)
    run(optimizer, params, random_grads(MIXED, 2))
    state = optimizer.state_dict()["state"]
    assert set(state[0]) == {"momentum_buffer", "explore_buffer"}
    assert set(state[1]) == {"step", "exp_avg", "exp_avg_sq", "explore_buffer"}
    optimizer.param_groups[0]["lr"] = 0.5
    assert optimizer.base.param_groups[0]["lr"] == 0.5
    copy.deepcopy(optimizer.state_dict())


# -- convergence on a small non-convex task --------------------------------------------------


def _teacher_student(seed):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(256, 8, generator=generator)
    teacher = torch.randn(8, 6, generator=generator)
    targets = torch.tanh(inputs @ teacher).sum(dim=1, keepdim=True)
    torch.manual_seed(seed)
    student = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                            nn.Linear(32, 1))
    return inputs, targets, student


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    "adaptor", [None, {"alpha": 0.5, "beta": 0.01}, {"alpha": -5.0, "beta": 0.99}], ids=str
)
def test_converges_on_a_small_non_convex_task(seed, adaptor):
    inputs, targets, student = _teacher_student(seed)
    optimizer = Muon(student.parameters(), lr=0.02, adamw_lr=3e-3, ns_dtype=torch.float32)
    if adaptor is not None:
        optimizer = E(optimizer, **adaptor)
    generator = torch.Generator().manual_seed(seed + 100)

    def loss_on(batch):
        return nn.functional.mse_loss(student(inputs[batch]), targets[batch])

    with torch.no_grad():
        initial = loss_on(slice(None)).item()
    for _ in range(300):
        batch = torch.randint(0, 256, (32,), generator=generator)
        optimizer.zero_grad()
        loss_on(batch).backward()
        optimizer.step()
    with torch.no_grad():
        final = loss_on(slice(None)).item()
    assert final < 0.1 * initial, (initial, final)


# -- behaving like a torch optimizer: copies, hooks, bad state dicts (issue 11) ---------------


def _all_params(optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]


def assert_same_state_dict(a, b):
    """Bit-identical state dicts: same keys, equal tensors (dtype too), equal groups."""
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for key, entry in a["state"].items():
        other = b["state"][key]
        if not isinstance(entry, dict):
            assert entry == other
            continue
        assert entry.keys() == other.keys(), key
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == other[name].dtype and torch.equal(value, other[name]), name
            else:
                assert value == other[name], name


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_after_a_scheduler_with_hooks_steps_its_own_parameters(how):
    """torch's pattern: StepLR wraps ``opt.step``; hooks are registered; then copy the optimizer."""
    import pickle

    params = random_params(MIXED)
    grads = random_grads(MIXED, 4)
    optimizer = Muon(params, lr=0.02, weight_decay=0.01)
    calls = []
    optimizer.register_step_pre_hook(lambda *_: calls.append("pre"))
    optimizer.register_step_post_hook(lambda *_: calls.append("post"))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    for step_grads in grads[:2]:
        run(optimizer, params, [step_grads])
        scheduler.step()
    assert calls == ["pre", "post"] * 2
    clone = copy.deepcopy(optimizer) if how == "deepcopy" else pickle.loads(pickle.dumps(optimizer))
    clone_params = _all_params(clone)
    assert all(c is not p for c, p in zip(clone_params, params))
    assert clone.param_groups[0]["lr"] == 0.02 * 0.25
    before = [p.detach().clone() for p in params]
    run(clone, clone_params, grads[2:])
    assert all(torch.equal(p, b) for p, b in zip(params, before)), "the copy moved the original"
    run(optimizer, params, grads[2:])
    for c, p in zip(clone_params, params):
        assert torch.equal(c, p)  # and the copy took exactly the original's steps


def _hooked(optimizer):
    """torch's own state-dict hook tests (test_optim.py), applied to ``optimizer``."""

    def state_dict_pre_hook(opt):
        opt.state["test"] = 1

    def state_dict_post_hook(opt, state_dict):
        state_dict["ran_state_dict_pre_hook"] = state_dict["state"].pop("test", None) == 1
        return state_dict

    def load_pre_hook(opt, state_dict):
        state_dict["param_groups"][0]["lr"] = 0.002

    def load_post_hook(opt):
        opt.state["ran_load_state_dict_pre_hook2"] = opt.param_groups[0]["lr"] == 0.002
        opt.state["ran_load_state_dict_post_hook"] = True

    optimizer.register_state_dict_pre_hook(state_dict_pre_hook)
    optimizer.register_state_dict_post_hook(state_dict_post_hook)
    optimizer.register_load_state_dict_pre_hook(load_pre_hook)
    optimizer.register_load_state_dict_post_hook(load_post_hook)
    return optimizer


def test_state_dict_hooks_and_non_dict_state_written_by_a_load_hook_behave_as_in_torch():
    """A load post-hook writes ``True`` into ``optimizer.state``: torch accepts it, Muon did not."""
    results = []
    for make in (lambda p: torch.optim.AdamW(p, lr=0.01), lambda p: Muon(p, lr=0.01)):
        params = random_params(MIXED)
        optimizer = _hooked(make(params))
        run(optimizer, params, random_grads(MIXED, 2))
        saved = optimizer.state_dict()
        assert saved["ran_state_dict_pre_hook"] is True and "test" not in saved["state"]
        optimizer.load_state_dict(saved)  # crashed here: 'bool' object has no attribute 'get'
        assert optimizer.state["ran_load_state_dict_pre_hook2"] is True
        assert optimizer.state["ran_load_state_dict_post_hook"] is True
        assert optimizer.param_groups[0]["lr"] == 0.002
        run(optimizer, params, random_grads(MIXED, 1, seed=5))  # and it still steps
        again = optimizer.state_dict()  # the hook's entries travel, as in torch
        optimizer.load_state_dict(again)
        results.append(sorted(str(k) for k in again["state"]))
    assert results[0] == results[1]


def _case(name, corrupt, match):
    return pytest.param(corrupt, match, id=name)


def _bad_state_dicts():
    """(how to break a saved Muon state dict, the message it must raise), by name."""

    def shape(sd):
        sd["state"][0]["momentum_buffer"] = torch.zeros(5, 6)

    def unknown(sd):
        sd["state"][1]["exp_avgs"] = sd["state"][1].pop("exp_avg")

    def missing(sd):
        del sd["state"][1]["exp_avg_sq"]

    def not_a_tensor(sd):
        sd["state"][1]["step"] = 3

    def too_many(sd):
        sd["state"][8] = {"momentum_buffer": torch.zeros(6, 5)}

    def param_count(sd):
        sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]

    def group_count(sd):
        sd["param_groups"].append({**sd["param_groups"][0], "params": []})

    def not_a_dict(sd):
        sd["state"][2] = torch.zeros(4, 6)

    def group_value(sd):
        sd["param_groups"][0]["ns_steps"] = 0

    return [
        _case("shape", shape, r"parameter 0 \(shape \(6, 5\)\): state 'momentum_buffer' has "
              r"shape \(5, 6\), expected \(6, 5\)"),
        _case("unknown", unknown, r"parameter 1 \(shape \(6,\)\) has unknown state keys "
              r"\['exp_avgs'\]"),
        _case("missing", missing, r"parameter 1 \(shape \(6,\)\) lacks state keys "
              r"\['exp_avg_sq'\]"),
        _case("not-a-tensor", not_a_tensor, r"parameter 1 .*state 'step' has shape int, "
              r"expected \(\)"),
        _case("too-many", too_many, r"state for parameter index 8, but its param groups list 8"),
        _case("param-count", param_count, r"param group 0 has 7 parameters, the optimizer's has 8"),
        _case("group-count", group_count, r"state_dict has 2 param groups, the optimizer has 1"),
        _case("not-a-dict", not_a_dict, r"parameter 2 \(shape \(4, 6\)\): its state must be a "
              r"dict"),
        _case("group-value", group_value, r"^Muon \(state_dict param group 0\): invalid "
              r"ns_steps=0, must be an int with 1 <= ns_steps <= 100$"),
    ]


@pytest.mark.parametrize(("corrupt", "match"), _bad_state_dicts())
def test_a_bad_state_dict_raises_a_clear_error_and_changes_nothing(corrupt, match):
    params = random_params(MIXED)
    grads = random_grads(MIXED, 3)
    source = Muon(params, weight_decay=0.01)
    run(source, params, grads[:2])
    broken = copy.deepcopy(source.state_dict())
    corrupt(broken)
    target_params = random_params(MIXED, seed=3)
    target = Muon(target_params, lr=0.05)
    run(target, target_params, grads[:1])
    before = copy.deepcopy(target.state_dict())
    values = [p.detach().clone() for p in target_params]
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(broken)
    assert_same_state_dict(target.state_dict(), before)
    assert all(torch.equal(p, v) for p, v in zip(target_params, values))
    # the intact state dict loads into the same optimizer afterwards
    target.load_state_dict(copy.deepcopy(source.state_dict()))
    assert target.param_groups[0]["lr"] == source.param_groups[0]["lr"]


# -- precision, non-finite steps, GradScaler (issue 10) ----------------------------------------

BF16_RESOLUTION = 2.0**-8  # relative spacing of bfloat16 numbers (8 significant bits)


@pytest.mark.parametrize("path", ["muon", "adamw"])
def test_weight_decay_on_bf16_parameters_with_kahan_is_exact_to_one_percent(path):
    """100 steps, zero gradient, lr 0.02, weight decay 0.1: θ/θ₀ = (1 − 0.002)^100 = 0.8186.

    Before: 0.585 on both paths (0.998 rounded to bf16 0.996 first). Rounded once without
    compensation each 0.2 % decrement is below half an ulp: θ/θ₀ stays in [0.98, 1.0].
    Mutations caught: Kahan's compensation dropped; the decay factor rounded to bf16.
    """
    exact = (1.0 - 0.02 * 0.1) ** 100
    shape = (8, 8) if path == "muon" else (8,)
    start = (torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 1.5 + 0.5)
    start = start.to(torch.bfloat16)
    ratios = {}
    for kahan in (False, True):
        p = start.clone().requires_grad_()
        optimizer = Muon([p], lr=0.02, weight_decay=0.1, adamw_lr=0.02, adamw_weight_decay=0.1,
                         kahan=kahan, ns_dtype=torch.float32)
        for _ in range(100):
            p.grad = torch.zeros_like(p)
            optimizer.step()
        ratios[kahan] = p.detach().double() / start.double()
        assert (KAHAN_KEY in optimizer.state[p]) == kahan
    torch.testing.assert_close(ratios[True], torch.full_like(ratios[True], exact), rtol=0.01,
                               atol=0)
    assert ratios[False].min() >= 0.98  # sub-ulp decrements round away without compensation


def _tracking_run(dtype, steps=500, **options):
    """A noisy quadratic pulled towards fixed targets; the same gradients in every dtype."""
    shapes = [(6, 5), (5,), (4, 6)]
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=generator).to(dtype).requires_grad_() for s in shapes]
    targets = [torch.randn(s, generator=generator) for s in shapes]
    optimizer = Muon(params, lr=0.01, adamw_lr=0.01, weight_decay=0.01, adamw_weight_decay=0.01,
                     ns_dtype=torch.float32, **options)
    noise = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p, t in zip(params, targets):
            g = p.detach().float() - t + 0.5 * torch.randn(p.shape, generator=noise)
            p.grad = g.to(dtype)
        optimizer.step()
    return [p.detach().double() for p in params]


def test_bf16_parameters_with_float32_state_track_a_float32_twin():
    """Relative error ‖θ_bf16 − θ_fp32‖/‖θ_fp32‖ per tensor after 500 steps.

    Measured: kahan=True ≤ 0.0024 (≈ 0.6 × bf16's 2^-8); bound 2 × 2^-8. Without Kahan
    (float32 state, one rounding per write) 0.008–0.10: Muon's per-element update,
    lr·s·|O_ij| ~ lr/√n, is below half an ulp of |θ| ≥ 1, so it is lost. Mutation caught:
    Kahan compensation dropped (error → 0.10).
    """
    twin = _tracking_run(torch.float32)
    errors = {}
    for kahan in (False, True):
        run_bf16 = _tracking_run(torch.bfloat16, kahan=kahan)
        errors[kahan] = [((a - b).norm() / b.norm()).item() for a, b in zip(run_bf16, twin)]
    assert max(errors[True]) < 2 * BF16_RESOLUTION, errors
    assert max(errors[False]) > 3 * max(errors[True]), errors  # what compensation buys


def _inject(grads, k, value):
    grads = [list(step) for step in grads]
    grads[k][0] = grads[k][0].clone()
    grads[k][0][1, 2] = value
    return grads


def _all_state_tensors(optimizer):
    return {
        (i, key): value.clone()
        for i, p in enumerate(_all_params(optimizer))
        for key, value in optimizer.state.get(p, {}).items()
        if isinstance(value, torch.Tensor) and key != "nonfinite_skips"
    }


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_nonfinite_gradient_skips_the_step_bit_identically(value, dtype):
    """NaN/Inf at step k: params and all state equal step k−1's; later steps = a run without k."""
    k = 3
    grads = _inject(random_grads(MIXED, 6, dtype), k, value)
    options = dict(weight_decay=0.01, adamw_weight_decay=0.01, skip_nonfinite=True,
                   kahan=dtype == torch.bfloat16)
    params = random_params(MIXED, dtype)
    optimizer = Muon(params, **options)
    run(optimizer, params, grads[:k])
    before = [p.detach().clone() for p in params]
    state_before = _all_state_tensors(optimizer)
    assert optimizer.skipped_steps == 0
    run(optimizer, params, grads[k : k + 1])
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    after = _all_state_tensors(optimizer)
    assert after.keys() == state_before.keys()
    for key, tensor in state_before.items():
        assert torch.equal(after[key], tensor), key  # incl. AdamW's step and kahan_comp
    assert optimizer.skipped_steps.item() == 1
    assert optimizer.skipped_steps.device == params[0].device
    run(optimizer, params, grads[k + 1 :])
    # the same run with step k left out
    twin = random_params(MIXED, dtype)
    reference = Muon(twin, **{**options, "skip_nonfinite": False})
    run(reference, twin, grads[:k] + grads[k + 1 :])
    assert all(torch.equal(p, q) for p, q in zip(params, twin))
    assert all(torch.isfinite(p).all() for p in params)


def _amp_run(make, dtype, inject_at, steps=5, generic=False):
    return amp_run(make, dtype, inject_at, steps=steps, generic=generic)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grad_scaler_skips_on_the_device_like_its_generic_path(dtype):
    """An Inf at step 2: our device-side skip equals torch's generic path, which never calls
    step() for that iteration; no host read inside ``scaler.step(opt)``."""

    def make(params):
        return Muon(params, lr=0.02, adamw_lr=1e-2, weight_decay=0.01, ns_dtype=torch.float32)

    ours, optimizer, reads, scale = _amp_run(make, dtype, inject_at=2)
    generic, _, _, generic_scale = _amp_run(make, dtype, inject_at=2, generic=True)
    assert reads == []
    assert scale == generic_scale == 2.0**9  # one backoff
    assert all(torch.equal(a, b) for a, b in zip(ours, generic))
    assert optimizer.skipped_steps.item() == 1
    unskipped, _, _, _ = _amp_run(make, dtype, inject_at=-1)
    assert not torch.equal(unskipped[0], ours[0])


def test_skip_and_kahan_step_on_the_meta_device():
    params = [torch.empty(s, device="meta", dtype=torch.bfloat16).requires_grad_()
              for s in [(6, 5), (6,), (3, 2, 2)]]
    optimizer = Muon(params, weight_decay=0.1, adamw_weight_decay=0.1, kahan=True,
                     skip_nonfinite=True)
    for _ in range(2):
        for p in params:
            p.grad = torch.empty_like(p)
        optimizer.step()
    assert optimizer.skipped_steps.device.type == "meta"
    assert optimizer.state[params[0]]["momentum_buffer"].dtype == torch.float32
    assert optimizer.state[params[0]][KAHAN_KEY].dtype == torch.bfloat16


def test_skip_path_makes_no_host_read():
    params = random_params(MIXED, torch.bfloat16)
    optimizer = Muon(params, kahan=True, skip_nonfinite=True)
    grads = _inject(random_grads(MIXED, 3, torch.bfloat16), 2, float("nan"))
    run(optimizer, params, grads[:2])
    for p, g in zip(params, grads[2]):
        p.grad = g
    with host_read_probe() as reads:
        optimizer.step()
    assert reads == []


# -- torch.compile ------------------------------------------------------------------------------


def _compiled_vs_eager(make, steps, nan_at=None):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    shapes = [(6, 5), (5,), (4, 6), (4, 6)]
    eager_params, compiled_params = random_params(shapes), random_params(shapes)
    eager, compiled = make(eager_params), make(compiled_params)

    @torch.compile
    def compiled_step():
        compiled.step()

    for step, grads in enumerate(random_grads(shapes, steps)):
        if step == nan_at:
            grads[0][0, 0] = float("nan")
        for p, q, g in zip(eager_params, compiled_params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        eager.step()
        compiled_step()
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    if nan_at is not None:  # every parameter's own counter holds exactly one skip
        for p in compiled_params:
            assert compiled.state[p]["nonfinite_skips"].item() == 1.0
    return eager_params, compiled_params, graphs


def test_compiled_step_with_default_arguments_matches_eager():
    """``torch.compile`` of a function calling ``opt.step()``: Muon() as constructed by default
    (bfloat16 Newton–Schulz), and with float32 Newton–Schulz for a tight comparison.

    Tolerances: float32 NS 1e-5 absolute over 4 steps of 0.02·s; bfloat16 NS 10 % of one
    step's update (inductor fuses the bfloat16 matmul chain with float32 accumulation and
    rounds differently from eager: measured 7 % after 4 steps). The float32 run also skips
    a NaN step: each parameter's skip counter must hold 1 (created inside the graph, the
    identical ``zeros() + flag`` counters were merged into one storage and counted 4).
    """
    eager, compiled, _ = _compiled_vs_eager(
        lambda p: Muon(p, ns_dtype=torch.float32, skip_nonfinite=True), 4, nan_at=1
    )
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=0, atol=1e-5)
    eager, compiled, graphs = _compiled_vs_eager(Muon, 2)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=0, atol=0.1 * 0.02 * 1.2)
    assert graphs <= 2  # the first step (state creation) and the steady step; no break


def test_bf16_checkpoint_keeps_state_dtypes_resumes_bit_exactly_and_loads_older_state_dicts():
    """torch's loader would cast the float32 momentum/moments of bf16 parameters to bf16.

    Mutation caught: loading with torch's cast-to-parameter-dtype policy.
    """
    options = dict(kahan=True, skip_nonfinite=True, weight_decay=0.01, adamw_weight_decay=0.01)
    params = random_params(MIXED, torch.bfloat16)
    grads = random_grads(MIXED, 5, torch.bfloat16)
    optimizer = Muon(params, **options)
    run(optimizer, params, grads[:2])
    saved = copy.deepcopy(optimizer.state_dict())
    twins = [p.detach().clone().requires_grad_() for p in params]
    resumed = Muon(twins, **options)
    resumed.load_state_dict(copy.deepcopy(saved))
    matrix_state, vector_state = resumed.state[twins[0]], resumed.state[twins[1]]
    assert matrix_state["momentum_buffer"].dtype == torch.float32
    assert vector_state["exp_avg"].dtype == vector_state["exp_avg_sq"].dtype == torch.float32
    assert matrix_state[KAHAN_KEY].dtype == torch.bfloat16
    run(optimizer, params, grads[2:])
    run(resumed, twins, grads[2:])
    assert all(torch.equal(p, q) for p, q in zip(params, twins))
    # a state dict from before kahan/skip_nonfinite existed: the new keys are created lazily
    older = copy.deepcopy(saved)
    for entry in older["state"].values():
        entry.pop(KAHAN_KEY, None)
        entry.pop("nonfinite_skips", None)
    for group in older["param_groups"]:
        for key in ("state_dtype", "kahan", "skip_nonfinite"):
            group.pop(key)
    fresh = Muon(random_params(MIXED, torch.bfloat16), **options)
    fresh.load_state_dict(older)
    assert fresh.param_groups[0]["kahan"] is True  # the defaults fill the missing settings
    fresh_params = _all_params(fresh)
    run(fresh, fresh_params, grads[2:3])
    assert KAHAN_KEY in fresh.state[fresh_params[0]] and fresh.skipped_steps.item() == 0


def test_compiled_explored_muon_with_default_arguments_matches_eager():
    """E(Muon) compiled vs eager (float32 Newton–Schulz: 1e-5 over 2 steps)."""
    eager, compiled, _ = _compiled_vs_eager(lambda p: E(Muon(p, ns_dtype=torch.float32)), 2)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=0, atol=1e-5)
