"""Precision, non-finite steps and GradScaler: the pieces every optimizer of the library shares.

**State precision.** ``state_dtype=None`` (every optimizer's default) keeps float32 state for
bfloat16/float16 parameters and the parameter's own dtype otherwise
(:func:`resolve_state_dtype`). Low-precision state is biased: the adaptor's one-buffer form
has a fixed point ``-(1-β)·EMA(g)`` that a bf16 buffer cannot track, and a bf16 Adam second
moment loses most of its increments.

**One rounding per step.** Arithmetic on a bf16/fp16 parameter happens in float32 and is
rounded once when written back (:func:`add_to_param_`). ``torch._foreach_mul_(bf16_list,
0.998)`` would first round the scalar to bf16 (0.99609), a 0.2 % error per step.

**Sub-ulp updates.** An update smaller than half an ulp of a bf16 parameter rounds away.
``kahan=True`` keeps the rounding error of every write in a compensation buffer of the
parameter's dtype and adds it back at the next step (:func:`kahan_add_`), as the optimi
library does: memory +1 parameter-sized buffer in the parameter's dtype (2 bytes/element
for bf16).

**Non-finite steps.** :func:`prepare_step` returns the step's *skip flag*, a 0-d float32
device tensor (1.0 = skip), built from GradScaler's ``found_inf`` and, with
``skip_nonfinite=True``, from a check of the gradients themselves; it never reads the flag on
the host. Optimizers apply it with masked updates (``torch.where`` in compiled kernels,
:func:`restore_where_` after a foreach step) so that a skipped step leaves parameters and
state bit-identical, and count skipped steps in ``state[p]["nonfinite_skips"]``
(:func:`count_skip_`).

**GradScaler.** ``torch.amp.GradScaler.step(opt)`` hands an optimizer whose class sets
``_step_supports_amp_scaling = True`` two attributes, ``opt.grad_scale`` (the scale, or
``None`` when the user already called ``scaler.unscale_``) and ``opt.found_inf``, and calls
``opt.step()`` without reading ``found_inf`` on the host. :func:`prepare_step` unscales the
gradients with the scaler's own reciprocal (``scale.double().reciprocal().float()``, so the
result is bit-identical to the scaler's generic path) and folds ``found_inf`` into the flag.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

LOW_PRECISION = (torch.bfloat16, torch.float16)
SKIPS_KEY = "nonfinite_skips"

__all__ = [
    "LOW_PRECISION",
    "SKIPS_KEY",
    "add_to_param_",
    "check_state_dtype",
    "count_skip_",
    "found_nonfinite",
    "kahan_add_",
    "prepare_step",
    "resolve_state_dtype",
    "restore_where_",
    "skip_count",
    "snapshot",
]


# -- state precision ----------------------------------------------------------------------


def check_state_dtype(state_dtype: object, owner: str = "optimizer") -> torch.dtype | None:
    """``None`` or a real floating ``torch.dtype``; anything else is a ``TypeError``."""
    if state_dtype is None:
        return None
    if not isinstance(state_dtype, torch.dtype) or not state_dtype.is_floating_point:
        raise TypeError(
            f"{owner}: state_dtype must be None or a floating torch.dtype (torch.float32, "
            f"torch.float64, torch.bfloat16, torch.float16), got {state_dtype!r}"
        )
    return state_dtype


def resolve_state_dtype(param_dtype: torch.dtype, state_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of a parameter's state: float32 for bf16/fp16 parameters by default.

    Complex parameters keep their own dtype (their state is complex; ``state_dtype`` names
    a real dtype).
    """
    if param_dtype.is_complex:
        return param_dtype
    if state_dtype is not None:
        return state_dtype
    return torch.float32 if param_dtype in LOW_PRECISION else param_dtype


def check_flag(owner: str, name: str, value: object) -> bool:
    """``True`` or ``False``, else a ``TypeError`` naming the argument."""
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be True or False, got {value!r}")
    return value


# -- parameter updates rounded once ---------------------------------------------------------


def add_to_param_(param: Tensor, update: Tensor) -> None:
    """``param += update`` with one rounding to the parameter's dtype.

    ``update`` may be float32 for a bf16/fp16 parameter: the sum is formed in the update's
    dtype and rounded once on the write.
    """
    if param.dtype == update.dtype:
        param.add_(update)
    else:
        param.copy_(param.to(update.dtype).add_(update))


def kahan_add_(param: Tensor, update: Tensor, compensation: Tensor) -> None:
    """Compensated ``param += update``: the rounding error is kept in ``compensation``.

    In float32 (or the update's dtype): ``y = update + comp``, ``new = round(θ + y)``,
    ``comp = y - (new - θ)``. The compensation has the parameter's dtype: it holds a residual
    below half an ulp of θ, which the low-precision format represents to its own 8 (bf16) or
    11 (fp16) significant bits.
    """
    work = update.dtype if update.dtype.itemsize >= 4 else torch.float32
    theta = param.to(work)
    y = update.to(work) + compensation.to(work)
    new = (theta + y).to(param.dtype)
    compensation.copy_(y - (new.to(work) - theta))
    param.copy_(new)


# -- non-finite steps and GradScaler --------------------------------------------------------


def found_nonfinite(tensors: Sequence[Tensor], out: Tensor | None = None) -> Tensor:
    """A 0-d float32 tensor on ``tensors[0]``'s device: 1.0 if any element is NaN or ±Inf.

    One multi-tensor 2-norm pass per (device, dtype) — a NaN or Inf element makes the norm
    non-finite — with no host read. fp16 norms are accumulated and returned in float32 (an
    fp16 norm above 65504 would overflow and flag a finite gradient); bf16/float32 norms
    overflow only for squares beyond float32's range (|g| ≳ 1e19), which would put Inf into
    any second moment anyway. On CPU this is about 9× cheaper than torch's AMP
    check-and-unscale kernel (10 ms vs 86 ms for 16.8M float32 gradients). Sparse tensors
    are checked through their values.
    """
    if not tensors:
        raise ValueError("found_nonfinite needs at least one tensor")
    first = tensors[0].device
    buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        t = t._values() if t.is_sparse else t
        buckets.setdefault((t.device, t.dtype), []).append(t)
    total = out if out is not None else torch.zeros((), dtype=torch.float32, device=first)
    for (_, dtype), group in buckets.items():
        if dtype == torch.float16:
            norms = torch._foreach_norm(group, 2, dtype=torch.float32)
        else:
            norms = torch._foreach_norm(group)
        bad = torch.isfinite(torch.stack(norms).sum()).logical_not()
        total.add_(bad.to(device=first, dtype=torch.float32, non_blocking=True))
    return total.clamp_(max=1.0)


def prepare_step(
    optimizer: Any, grads: Sequence[Tensor], *, skip_nonfinite: bool
) -> Tensor | None:
    """Unscale ``grads`` for GradScaler and return this step's skip flag (or ``None``).

    * ``optimizer.grad_scale`` (set by ``GradScaler.step``): the gradients are multiplied in
      place by ``scale.double().reciprocal().float()``, exactly as the scaler's generic path.
    * ``optimizer.found_inf`` (set by the scaler) and, with ``skip_nonfinite``, a check of
      the (unscaled) gradients give the flag: a 0-d float32 tensor on ``grads[0]``'s device,
      1.0 when the step must be skipped.

    Returns ``None`` when no flag exists (no scaler and ``skip_nonfinite=False``): the caller
    then takes its unmasked fast path. Never reads a tensor on the host.
    """
    grad_scale = getattr(optimizer, "grad_scale", None)
    found_inf = getattr(optimizer, "found_inf", None)
    if not grads:
        return None
    device = grads[0].device
    if grad_scale is not None:
        inv_scale = grad_scale.double().reciprocal().float()
        by_device: dict[torch.device, list[Tensor]] = {}
        for g in grads:
            by_device.setdefault(g.device, []).append(g)
        for dev, group in by_device.items():
            torch._foreach_mul_(group, inv_scale.to(dev, non_blocking=True))
    flag: Tensor | None = None
    if found_inf is not None:
        flag = found_inf.to(device=device, dtype=torch.float32, non_blocking=True).clamp(max=1.0)
    if skip_nonfinite:
        own = found_nonfinite(grads)
        flag = own if flag is None else torch.maximum(flag, own)
    return flag


def snapshot(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Copies of ``tensors`` taken before a step that may have to be undone (temporaries)."""
    return [t.clone() for t in tensors]


def restore_where_(tensors: Sequence[Tensor], saved: Sequence[Tensor], skip: Tensor) -> None:
    """``t ← where(skip, saved, t)``: bit-identical to before the step when ``skip`` is 1."""
    keep = skip.bool()
    for t, old in zip(tensors, saved):
        t.copy_(torch.where(keep.to(t.device, non_blocking=True), old, t))


@torch.compiler.disable
def _new_counter(device: torch.device) -> Tensor:
    # Outside any compiled graph: inside one, the identical ``zeros()`` of every parameter's
    # counter are merged into one output and all counters alias one storage (a skip is then
    # counted once per parameter). A graph break on the first flagged step only.
    return torch.zeros((), dtype=torch.float32, device=device)


def count_skip_(state: dict[str, Any], skip: Tensor, like: Tensor) -> None:
    """Add the flag to ``state["nonfinite_skips"]`` (a 0-d float32 tensor on ``like``'s device)."""
    counter = state.get(SKIPS_KEY)
    if counter is None:
        counter = state[SKIPS_KEY] = _new_counter(like.device)
    counter.add_(skip.to(counter.device, non_blocking=True))


def skip_count(optimizer: torch.optim.Optimizer) -> Tensor | None:
    """The number of skipped steps (a 0-d device tensor), or ``None`` before any check ran.

    Every parameter's counter holds the same count (the decision is per step, not per
    parameter); the first one found is returned.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            counter = optimizer.state.get(p, {}).get(SKIPS_KEY)
            if counter is not None:
                return counter
    return None
