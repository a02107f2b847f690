"""E with non-finite gradients and torch.amp.GradScaler: skipped on the device, no host read.

A skipped step must leave every parameter and every state tensor (E's buffer, the base's
moments and step counter) bit-identical to the previous step, count the skip on the
device, and let later steps continue exactly as if the step had never been attempted.
"""

from __future__ import annotations

import math

import pytest
import torch

from adaptor import E
from tests.probes import host_read_probe

SHAPES = [(16, 8), (8,), (3, 5)]

BASES = {
    # skip on the device (found_inf handed to the base)
    "AdamW-fused": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1,
                                                    fused=True),
    "SGD-fused": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9, fused=True),
    # the snapshot/restore fallback
    "AdamW-foreach": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1,
                                                      foreach=True),
    "SGD-momentum": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9),
    "RMSprop": lambda params: torch.optim.RMSprop(params, lr=1e-2, momentum=0.5),
}
FUSED_BASES = ("AdamW-fused", "SGD-fused")


def _params(seed=0, shapes=SHAPES, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=generator).to(device).requires_grad_() for s in shapes]


def _grads(step, shapes=SHAPES):
    generator = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=generator) for s in shapes]


def _everything(optimizer):
    """(name, tensor) for every parameter and every state tensor, in a fixed order."""
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            out.append(("param", p.detach().clone()))
            for owner, state in (("E", optimizer.state), ("base", optimizer.base.state)):
                for key, value in sorted(state.get(p, {}).items()):
                    if isinstance(value, torch.Tensor) and key != "nonfinite_skips":
                        out.append((f"{owner}.{key}", value.clone()))
    return out


def _assert_bit_identical(actual, expected):
    assert [n for n, _ in actual] == [n for n, _ in expected]
    for (name, a), (_, b) in zip(actual, expected):
        assert a.dtype == b.dtype and torch.equal(a, b), name


# One tensor above the adaptor's FUSED_MIN_NUMEL (2**16), so that fused=True runs the
# compiled masked kernel on it.
LARGE = [(260, 260), (8,), (3, 5)]


CASES = [
    (name, bad, fused, k)
    for name in BASES
    for bad, fused, k in [
        (math.nan, False, 3), (math.inf, False, 3), (-math.inf, False, 3), (math.nan, True, 3),
        (math.inf, False, 0),  # the first step: the base's state does not exist yet
    ]
    if not (fused and name not in FUSED_BASES)
    and not (k == 0 and name == "SGD-fused")  # torch's fused SGD: empty_like buffer at k=0
]


@pytest.mark.parametrize(("name", "bad", "fused", "k"), CASES)
def test_a_nonfinite_step_is_skipped_bit_identically(name, bad, fused, k):
    """NaN/±Inf injected at step k: everything equals step k-1, the count is 1, and steps
    k+1.. equal a twin that never attempted step k (foreach and compiled replacement; bases
    that skip on the device and bases restored by the snapshot fallback)."""
    steps = 6
    shapes = LARGE if fused else SHAPES
    params = _params(shapes=shapes)
    optimizer = E(BASES[name](params), -5.0, 0.99, skip_nonfinite=True, fused=fused)
    twin_params = _params(shapes=shapes)
    twin = E(BASES[name](twin_params), -5.0, 0.99, skip_nonfinite=True, fused=fused)
    assert optimizer._step_supports_amp_scaling
    assert optimizer._base_skips_on_device == (name in FUSED_BASES)
    for step in range(steps):
        grads = _grads(step, shapes)
        if step == k:
            before = _everything(optimizer)
            grads[1][2] = bad
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
        if step == k and k == 0:
            # Nothing existed before: parameters unchanged, the state the step created
            # holds zeros (torch's optimizers treat that as fresh; checked by the twin).
            after = _everything(optimizer)
            _assert_bit_identical([t for t in after if t[0] == "param"], before)
            assert all(torch.all(t == 0) for n, t in after if n != "param")
        elif step == k:
            _assert_bit_identical(_everything(optimizer), before)
        if step == k:
            assert optimizer.skipped_steps == 1
            assert not hasattr(optimizer.base, "found_inf"), "the base's attributes restored"
            continue
        for p, g in zip(twin_params, grads):
            p.grad = g.clone()
        twin.step()
    _assert_bit_identical(_everything(optimizer), _everything(twin))
    assert optimizer.skipped_steps == 1 and twin.skipped_steps == 0
    assert optimizer.skipped_steps.device == params[0].device
    assert not _everything(optimizer)[0][1].equal(_params(shapes=shapes)[0].detach())  # trained


def test_without_skip_nonfinite_nothing_is_counted_and_nan_flows_as_in_torch():
    """Default off, as torch: no flag, no counter; the base sees the NaN."""
    params = _params()
    optimizer = E(BASES["AdamW-fused"](params), -5.0, 0.99)
    for p, g in zip(params, _grads(0)):
        p.grad = g
    params[0].grad[0, 0] = math.nan
    optimizer.step()
    assert optimizer.skipped_steps is None
    assert torch.isnan(params[0]).any()


def test_skip_nonfinite_must_be_a_bool():
    with pytest.raises(TypeError, match=r"explore: skip_nonfinite must be True or False"):
        E(BASES["SGD-fused"](_params()), skip_nonfinite=1)


class MaskedSGD(torch.optim.Optimizer):
    """A minimal base that skips on the device: θ ← where(found_inf, θ, θ − lr·g)."""

    _step_supports_amp_scaling = True

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            for p in group["params"]:
                new = p - group["lr"] * p.grad
                p.copy_(new if found_inf is None else torch.where(found_inf > 0, p, new))


def test_skip_path_runs_on_meta_and_reads_nothing_on_the_host():
    """The skip path (flag, masked foreach and fused replacement, counters, the base told
    to skip or restored) on ``meta`` tensors (any host read fails there) and under the
    host-read probe on CPU."""
    for make in (MaskedSGD, BASES["AdamW-foreach"], BASES["SGD-momentum"]):
        meta = [torch.empty(s, device="meta", requires_grad=True) for s in SHAPES]
        optimizer = E(make(meta), -5.0, 0.99, skip_nonfinite=True)
        for _ in range(2):
            for p in meta:
                p.grad = torch.empty_like(p)
            optimizer.step()
        assert optimizer.skipped_steps.device.type == "meta"
    for fused, base_fused in ((False, True), (True, True), (False, False)):
        params = _params(shapes=[(300, 300), (7,)])
        base = torch.optim.AdamW(params, fused=base_fused, foreach=not base_fused)
        optimizer = E(base, -5.0, 0.99, fused=fused, skip_nonfinite=True)
        for step in range(4):
            for p, g in zip(params, _grads(step, [(300, 300), (7,)])):
                p.grad = g
            params[0].grad[0, 0] = math.inf if step == 3 else 0.0
            with host_read_probe() as reads:
                optimizer.step()
            # Steady state: compiled kernels (the fused replacement at step 0, E's fast path
            # at step 1) read values once while compiling, if no earlier test compiled them.
            if step >= 2:
                assert reads == [], reads
        assert optimizer.skipped_steps == 1


# -- GradScaler ------------------------------------------------------------------------------


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _batch(step):
    generator = torch.Generator().manual_seed(step)
    return torch.randn(32, 8, generator=generator), torch.randn(32, 4, generator=generator)


def _scaled_run(make_base, dtype, inject_at=None, skip_at=None, steps=5):
    """Train under autocast(cpu, dtype) and GradScaler. ``inject_at``: an inf in one
    gradient; ``skip_at``: no optimizer step at all, and the scale backed off by hand as
    the scaler does after an overflow (×0.5)."""
    model = _model()
    optimizer = E(make_base(list(model.parameters())), -5.0, 0.99)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    reads = []
    for step in range(steps):
        x, y = _batch(step)
        optimizer.zero_grad()
        if step == skip_at:
            scaler.update(new_scale=scaler.get_scale() * 0.5)
            continue
        with torch.autocast("cpu", dtype=dtype):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        if step == inject_at:
            model[0].weight.grad[0, 0] = math.inf
        with host_read_probe() as step_reads:
            scaler.step(optimizer)
        reads.extend(step_reads)
        scaler.update()
    return model, optimizer, scaler, reads


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["AdamW-fused", "AdamW-foreach"])
def test_grad_scaler_overflow_equals_a_skipped_step(dtype, name):
    """An inf at step 2 under GradScaler: the run equals one that skips step 2, bit for
    bit. E consumes the scaler's grad_scale/found_inf on the device (no host read inside
    scaler.step from library code, the skip is counted): the fused base skips on the
    device, the foreach base is restored by the snapshot fallback."""
    make = BASES[name]
    injected, opt_a, scaler_a, reads = _scaled_run(make, dtype, inject_at=2)
    _, opt_b, scaler_b, _ = _scaled_run(make, dtype, skip_at=2)
    assert scaler_a.get_scale() == scaler_b.get_scale() == 2.0**7
    _assert_bit_identical(_everything(opt_a), _everything(opt_b))
    assert opt_a._step_supports_amp_scaling
    assert reads == []
    assert opt_a.skipped_steps == 1
    untrained = _model()
    assert not torch.equal(injected[0].weight, untrained[0].weight)


def test_grad_scaler_unscales_like_its_generic_path():
    """Without overflow, E (which unscales) equals E with the scaler's generic path forced
    (the scaler unscales): same reciprocal, same bits."""
    runs = []
    for device_side in (True, False):
        model = _model()
        optimizer = E(BASES["AdamW-fused"](list(model.parameters())), -5.0, 0.99)
        optimizer._step_supports_amp_scaling = device_side
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        for step in range(3):
            x, y = _batch(step)
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = torch.nn.functional.mse_loss(model(x).float(), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        runs.append(_everything(optimizer))
    _assert_bit_identical(runs[0], runs[1])


@pytest.mark.parametrize("buffer_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("alpha", "beta"), [(-5.0, 0.99), (-99.0, 0.99)], ids=["mid", "bound"])
def test_masked_replacement_keeps_the_buffer_and_otherwise_equals_the_unmasked(
    alpha, beta, buffer_dtype
):
    """The replacement with a skip flag: flag 1 → buffers bit-identical (a NaN in g does
    not reach them); flag 0 → the same bits as the unmasked replacement (well-conditioned
    and near-bound forms, float32 and bf16 buffers)."""
    from adaptor.replacement import replace_foreach_

    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=generator) for s in SHAPES]
    buffers = [torch.randn(s, generator=generator).to(buffer_dtype) for s in SHAPES]
    bad = [g.clone() for g in grads]
    bad[0][0, 0] = math.nan
    kept = [c.clone() for c in buffers]
    replace_foreach_(bad, kept, alpha, beta, skip=torch.tensor(1.0))
    _assert_bit_identical([("c", c) for c in kept], [("c", c) for c in buffers])

    masked_g, masked_c = [g.clone() for g in grads], [c.clone() for c in buffers]
    replace_foreach_(masked_g, masked_c, alpha, beta, skip=torch.tensor(0.0))
    plain_g, plain_c = [g.clone() for g in grads], [c.clone() for c in buffers]
    replace_foreach_(plain_g, plain_c, alpha, beta)
    _assert_bit_identical([("g", g) for g in masked_g], [("g", g) for g in plain_g])
    _assert_bit_identical([("c", c) for c in masked_c], [("c", c) for c in plain_c])
    assert not torch.equal(plain_c[0], buffers[0])
