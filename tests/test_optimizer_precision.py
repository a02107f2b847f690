"""Generic tests of the precision contract over every capability-table entry.

* ``skip_nonfinite=True``: a step whose gradient holds NaN or ±Inf is skipped on the device —
  parameters and every state tensor bit-identical, later steps those of a run that never saw
  it, ``optimizer.skipped_steps == 1`` — with no host read (probe, and the meta device).
* GradScaler (``torch.amp.GradScaler("cpu")``, fp16 and bf16 autocast): a step with an
  injected inf equals a run that skips it, and ``scaler.step(opt)`` makes no host read
  (the optimizer consumes ``grad_scale``/``found_inf`` on the device).
* ``state_dtype``: bf16 parameters get float32 state by default, bf16 state on request.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor

from adaptor.precision import (
    add_to_param_,
    check_state_dtype,
    count_skip_,
    prepare_step,
    resolve_state_dtype,
    restore_where_,
    skip_count,
    snapshot,
)
from tests.optim_db import (
    OptimizerInfo,
    all_params,
    assert_same,
    clone_params,
    entries,
    loss_fn,
    make_closure,
    make_params,
    run_steps,
    state_snapshot,
    step_with_empty_grads,
)
from tests.probes import GRAD_SCALER_FILE, LIBRARY_DIRS, host_read_probe

SKIPS_KEY = "nonfinite_skips"  # the contract's counter (adaptor.precision.SKIPS_KEY)
KAHAN_KEY = "kahan_comp"
BAD_STEP = 3
INIT_SCALE = 2.0**4


class ContractSGD(torch.optim.Optimizer):
    """Heavy-ball SGD written to the precision contract with ``adaptor.precision``'s helpers.

    Not a library optimizer: the reference entry that shows each generic test here can pass
    (and what it checks), before and independently of the backends' implementations.
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr=1e-2, momentum=0.9, *, state_dtype=None,
                 skip_nonfinite=False, kahan=False):
        check_state_dtype(state_dtype, "ContractSGD")
        defaults = dict(lr=lr, momentum=momentum, state_dtype=state_dtype,
                        skip_nonfinite=skip_nonfinite)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            skip = prepare_step(self, grads, skip_nonfinite=group["skip_nonfinite"])
            buffers = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    dtype = resolve_state_dtype(p.dtype, group["state_dtype"])
                    state["momentum_buffer"] = torch.zeros_like(p, dtype=dtype)
                buffers.append(state["momentum_buffer"])
            saved = snapshot(params + buffers) if skip is not None else None
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, [g.to(b.dtype) for g, b in zip(grads, buffers)])
            for p, b in zip(params, buffers):
                add_to_param_(p, b * -group["lr"])
            if skip is not None:
                restore_where_(params + buffers, saved, skip)
                for p in params:
                    count_skip_(self.state[p], skip, p)
        return loss

    @property
    def skipped_steps(self):
        return skip_count(self)


REFERENCE = [OptimizerInfo(name="ContractSGD (reference)", build=ContractSGD)]


def _assert_params_equal(actual, expected, what="parameter"):
    for i, (a, b) in enumerate(zip(actual, expected, strict=True)):
        assert_same(a.detach(), b.detach(), f"{what} {i}")


def _tensor_state(state_dict):
    """The state tensors of a state dict, without the skip counters (they must change).

    Host-side values (Python numbers in the state, the zero-order estimator's seed and step
    outside it) are not state tensors: they count ``step()`` calls and cannot see the
    device's decision to skip (e.g. Shampoo's ``host_step`` schedule), see ``_host_values``.
    """
    return {
        index: {k: v for k, v in entry.items() if isinstance(v, Tensor) and k != SKIPS_KEY}
        for index, entry in state_dict["state"].items()
    }


def _host_values(state_dict):
    """The host-side values of a state dict: non-tensor per-parameter entries and the
    top-level extras (``explore_estimator``)."""
    return {
        "state": {
            index: {k: v for k, v in entry.items() if not isinstance(v, Tensor)}
            for index, entry in state_dict["state"].items()
            if isinstance(entry, dict)
        },
        "extra": {k: v for k, v in state_dict.items() if k not in ("state", "param_groups")},
    }


def _adopt_host_values(optimizer, values):
    """Give ``optimizer`` the host-side values of another run (through its state dict), so
    that it differs from that run only by the tensors a skipped step must not touch."""
    state_dict = optimizer.state_dict()
    for index, entry in values["state"].items():
        if index in state_dict["state"]:
            state_dict["state"][index] = {**state_dict["state"][index], **entry}
    state_dict.update(values["extra"])
    optimizer.load_state_dict(copy.deepcopy(state_dict))


def _bad_step(info, optimizer, params, step, value):
    """Step ``step`` with ``value`` (NaN or ±Inf) in one element of one gradient.

    Zero-order entries see it in the loss (their gradient estimate is then non-finite).
    Returns the host reads the probe counted inside ``optimizer.step``.
    """
    if info.closure_kind == "loss":

        def closure():
            return loss_fn(params, step) + value

        with host_read_probe() as reads:
            optimizer.step(closure)
        return reads
    make_closure(info, optimizer, params, step)()  # zero_grad + backward, outside the probe
    params[1].grad.view(-1)[0] = value
    with host_read_probe() as reads:
        optimizer.step()
    return reads


@pytest.mark.parametrize("info", entries() + entries(REFERENCE))
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_nonfinite_step_is_skipped_on_device(info, value):
    """With ``skip_nonfinite=True`` the bad step changes no parameter and no state tensor
    (bit for bit), counts one skip, reads nothing on the host, and the next steps are those
    of a run that never saw it. Host-side counters (the zero-order estimator's step,
    Shampoo's ``host_step`` schedule) advance regardless, as they cannot see the device's
    decision: the twin takes them from the skipping optimizer."""
    params = make_params(info)
    optimizer = info.build(params, skip_nonfinite=True)
    twin_params = clone_params(params)
    twin = info.build(twin_params, skip_nonfinite=True)
    twin.load_state_dict(state_snapshot(optimizer))  # same estimator seed, empty state

    run_steps(info, optimizer, params, range(BAD_STEP))
    before_state = state_snapshot(optimizer)
    before = [p.detach().clone() for p in params]
    reads = _bad_step(info, optimizer, params, BAD_STEP, value)

    assert reads == [], f"host reads in a skipped step: {reads}"
    _assert_params_equal(params, before)
    after_state = state_snapshot(optimizer)
    assert_same(_tensor_state(after_state), _tensor_state(before_state), "state")
    assert isinstance(optimizer.skipped_steps, Tensor)
    assert optimizer.skipped_steps.item() == 1

    run_steps(info, twin, twin_params, range(BAD_STEP))
    _adopt_host_values(twin, _host_values(after_state))
    later = range(BAD_STEP + 1, BAD_STEP + 4)
    run_steps(info, optimizer, params, later)
    run_steps(info, twin, twin_params, later)
    _assert_params_equal(params, twin_params, "parameter vs the run without the bad step")
    assert optimizer.skipped_steps.item() == 1


@pytest.mark.parametrize("info", entries() + entries(REFERENCE))
def test_nonfinite_check_runs_on_the_meta_device(info):
    """The skip path (check, masked update, counter) makes no host read: it runs on meta."""
    params = make_params(info, device="meta")
    optimizer = info.build(params, skip_nonfinite=True)
    with host_read_probe(direct=True) as reads:
        step_with_empty_grads(info, optimizer, params, range(3))
    assert reads == []
    assert optimizer.skipped_steps.device.type == "meta"


# -- GradScaler -----------------------------------------------------------------------------


def _amp_loss(params, step):
    """``loss_fn`` plus a matmul term, which CPU autocast runs in the low-precision dtype."""
    generator = torch.Generator().manual_seed(2000 + step)
    total = loss_fn(params, step)
    for p in params:
        matrix = p.reshape(p.shape[0], -1) if p.dim() > 1 else p.reshape(1, -1)
        probe = torch.randn(matrix.shape[1], 3, generator=generator)
        total = total + (matrix @ probe).float().square().mean()
    return total


_TORCH_FUSED_ADAM = OptimizerInfo(
    name="torch.optim.Adam(fused=True) (reference)",
    build=lambda params, **kw: torch.optim.Adam(params, lr=1e-2, fused=True, **kw),
)


def _amp_run(info, params, dtype, steps, *, inject_at=None, scaled=True, host_values=None):
    """``steps`` autocast steps; with ``scaled=False`` (the reference) no GradScaler — the
    loss is scaled and the gradients unscaled by hand — and the step ``inject_at`` is not
    taken at all (the optimizer adopts ``host_values``, those
    of the scaled run after its skipped step: see ``_adopt_host_values``). Returns the
    optimizer, the scaler, the host reads inside ``scaler.step`` and the host values after
    step ``inject_at``."""
    optimizer = info.build(params)
    # A small power-of-two scale that never overflows fp16 by itself, and no growth within
    # the run: the only skipped step is the injected one.
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, growth_interval=10**6)
    reads = []
    for step in range(steps):
        if step == inject_at and not scaled:
            _adopt_host_values(optimizer, host_values)
            continue
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            loss = _amp_loss(params, step)
        if not scaled:
            # What a correct unscale computes: the same scaled backward (fp16 gradients are
            # not exact without it: small ones fall into fp16's subnormals), then an exact
            # division by the power-of-two scale, which halves after the skipped step.
            scale = INIT_SCALE if inject_at is None or step < inject_at else INIT_SCALE / 2
            (loss * scale).backward()
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(1.0 / scale)
            optimizer.step()
            continue
        scaler.scale(loss).backward()
        if step == inject_at:
            params[1].grad.view(-1)[0] = math.inf
        with host_read_probe((*LIBRARY_DIRS, GRAD_SCALER_FILE)) as step_reads:
            scaler.step(optimizer)
        # Steady state: the first two steps may compile kernels, and compiling reads values
        # once (E's fast path first runs at step 1, when the base's state exists; whether
        # that compile happens here depends on what ran before in this process).
        if step > 1:
            reads += step_reads
        scaler.update()
        if step == inject_at:
            host_values = _host_values(state_snapshot(optimizer))
    return optimizer, scaler, reads, host_values


@pytest.mark.parametrize(
    "info",
    entries(when=lambda info: info.closure_kind == "backward")
    + entries([*REFERENCE, _TORCH_FUSED_ADAM]),
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_grad_scaler_skips_an_inf_step_without_host_reads(info, dtype):
    """fp16/bf16 CPU autocast with ``GradScaler``: an inf injected at step 2 leaves the run
    equal (bit for bit) to one without a scaler that never takes step 2 and unscales the
    gradients by hand — so the optimizer both skips that step and unscales the others
    exactly — and ``scaler.step(opt)`` makes no
    host read: ``torch/amp/grad_scaler.py`` counts as library code here, so the scaler's
    generic path (``found_inf.item()``), taken when the optimizer lacks
    ``_step_supports_amp_scaling``, fails the test. Zero-order entries take no part: they
    have no backward to scale."""
    params = make_params(info)
    start = [p.detach().clone() for p in params]
    optimizer, scaler, reads, host_values = _amp_run(info, params, dtype, 5, inject_at=2)
    assert getattr(optimizer, "_step_supports_amp_scaling", False), (
        f"{type(optimizer).__name__} does not declare _step_supports_amp_scaling"
    )
    assert reads == [], f"host reads inside scaler.step(opt): {reads}"
    assert scaler.get_scale() == INIT_SCALE / 2

    reference_params = [p.clone().requires_grad_() for p in start]
    _amp_run(info, reference_params, dtype, 5, inject_at=2, scaled=False, host_values=host_values)
    if info.fused_compile:
        # The reference runs the unmasked compiled kernels, the scaled run the masked ones:
        # two compiled graphs may sum ‖r‖² and ‖θ‖² in different orders (1 ulp seen). A
        # step taken or lost, or a gradient left scaled, moves parameters by ~lr = 1e-2.
        for i, (p, q) in enumerate(zip(params, reference_params)):
            torch.testing.assert_close(
                p.detach(), q.detach(), rtol=1e-6, atol=1e-7, msg=lambda m, i=i: f"{i}: {m}"
            )
    else:
        _assert_params_equal(params, reference_params, "parameter vs the run without step 2")
    assert any(not torch.equal(p.detach(), s) for p, s in zip(params, start))


# -- state precision ------------------------------------------------------------------------


def _library_state(optimizer, *, adaptor_only=False):
    """``(index, key, tensor)`` for every floating state tensor the library creates.

    Over a torch base, ``E`` owns only its own keys (``explore_buffer``, the skip counter):
    torch's optimizer keeps its state in the parameter's dtype, which ``E`` cannot change.
    ``adaptor_only``: only E's own keys, whatever the base.
    """
    base = getattr(optimizer, "base", None)
    torch_base = base is not None and (
        adaptor_only or type(base).__module__.startswith("torch.")
    )
    # E.state[p] shows the base's entries beside E's own (torch's flattened DCP format needs
    # them there): E's own keys are those its base does not hold.
    own_keys = {
        key
        for p, state in optimizer.state.items()
        for key in state
        if base is None or key not in base.state.get(p, {})
    }
    found = []
    for index, entry in optimizer.state_dict()["state"].items():
        for key, value in entry.items():
            if torch_base and key not in own_keys:
                continue
            if isinstance(value, Tensor) and value.is_floating_point():
                found.append((index, key, value))
    assert found, "no state tensors after two steps"
    return found


@pytest.mark.parametrize("info", entries(fused=False) + entries(REFERENCE))
def test_bf16_parameters_get_float32_state_by_default(info):
    """Every floating state tensor of bf16 parameters is float32, except the Kahan
    compensation (the parameter's dtype by contract)."""
    params = make_params(info, dtype=torch.bfloat16)
    optimizer = info.build(params)
    run_steps(info, optimizer, params, range(2))
    wrong = [
        (index, key, value.dtype)
        for index, key, value in _library_state(optimizer)
        if value.dtype != (torch.bfloat16 if key == KAHAN_KEY else torch.float32)
    ]
    assert wrong == []


@pytest.mark.parametrize("info", entries(fused=False) + entries(REFERENCE))
def test_state_dtype_bf16_keeps_bf16_state(info):
    """``state_dtype=torch.bfloat16`` keeps the parameter-sized state (moments, buffers) in
    bf16. Other state keeps its documented dtype: 0-d step and skip counters (a bf16 counter
    stops counting at 256), Shampoo's preconditioner blocks (``preconditioner_dtype``)."""
    params = make_params(info, dtype=torch.bfloat16)
    optimizer = info.build(params, state_dtype=torch.bfloat16)
    run_steps(info, optimizer, params, range(2))
    shapes = [p.shape for p in all_params(optimizer)]
    wrong = [
        (index, key, value.dtype)
        # The table's contract routes state_dtype of an explored entry to E, not its base.
        for index, key, value in _library_state(optimizer, adaptor_only=True)
        if value.shape == shapes[index] and value.dim() >= 1 and value.dtype != torch.bfloat16
    ]
    assert wrong == []


@pytest.mark.parametrize("info", entries(fused=False) + entries(REFERENCE))
def test_state_dtype_rejects_a_non_floating_dtype(info):
    params = make_params(info)
    with pytest.raises(TypeError, match=r"state_dtype"):
        info.build(params, state_dtype=torch.int32)

