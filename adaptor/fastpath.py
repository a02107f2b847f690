"""Fast paths: the adaptor's replacement and torch's SGD / Adam / AdamW update in one pass.

With ``fused`` on (``E(..., fused=True)``, or the default on CUDA), a parameter whose base is
exactly ``torch.optim.SGD``, ``torch.optim.Adam`` or ``torch.optim.AdamW`` and whose settings
can be reproduced is updated by ONE compiled pointwise loop that reads ``g``, ``c`` (the
adaptor's buffer), ``θ`` and the base's moments once and writes ``c``, ``θ`` and the moments
once (``g`` is only read: see "p.grad" below)::

    g̃ = k₁·g + α·c                      c ← p·c + q·g̃          (adaptor.replacement)
    d = ±g̃ (maximize: −g̃)  [+ λ·θ for SGD and Adam's coupled weight decay]

    SGD:   b ← μ·b + (1−τ)·d;  u = d + μ·b (nesterov) or b (or u = d without momentum)
           θ ← θ − lr·u
    Adam:  θ ← θ·(1 − lr·λ)  (AdamW only);  amsgrad: v̂ ← max(v̂, v), √v̂ in place of √v
           m ← lerp(m, d, 1−β₁);  v ← β₂·v + (1−β₂)·d²;  t ← t + 1
           θ ← θ − (lr / (1−β₁ᵗ)) · m / (√v / √(1−β₂ᵗ) + ε)

the formulas of torch's ``_single_tensor_adam`` / ``_multi_tensor_adam`` / ``_fused_adam``
(bias corrections formed in float64 from the step count ``t``, divided as torch divides:
``lr / bc1`` and ``√v / √bc2``; formed once per tensor as 0-d float64 tensors on the
step's device, never read on the host). Equal to the generic path to float rounding, not bit
for bit (inductor reorders the arithmetic): see ``tests/adaptor/test_fastpath.py`` for the
tolerances. A term torch leaves out is left out here too (no ``λ·θ`` when λ = 0, no decay
for AdamW with λ = 0): each combination of such settings is its own compiled variant.

**p.grad.** The generic path hands ``g̃`` to the base through ``p.grad``, so ``g̃`` is there
after the step; the fast path keeps ``g̃`` in registers and leaves ``p.grad`` holding the
raw gradient ``g``, as torch's own optimizers leave it. Writing ``g̃`` back would be a tenth
array pass (10 vs torch AdamW's 7; 9 without it). Read gradients before ``step()``.

**Calls.** One compiled call updates FUSED_GROUP (4) large tensors of a device and dtype,
one loop each; the rest go one by one (``adaptor.replacement.chunks``). Each call costs
dynamo's guards and wrappers, about 0.1 ms on a CPU core whatever the sizes: a call per
tensor, the 48 large tensors of the benchmarks' ``blocks12`` ran at 2.1 × torch's fused
AdamW step; grouped, at 1.85–1.95 ×. The kernels take flat tensors that are not views
(``adaptor.replacement.flat``): dynamo guards a view's base, its rank included.

**Scalars.** On CPU the coefficients enter the kernel as one 1-d tensor of the parameter's
dtype (:func:`adaptor.replacement.pack_scalars`): inductor would otherwise convert each
Python float from float64 inside the loop, once per element.

**SPSA's last pass** (``run(..., pending)``). Under ``explore(SPSA(...), base)`` with one
sample, SPSA leaves its large whole-word parameters at ``θ − c·Δ`` with the gradient unwritten
(:class:`adaptor.estimators.DeferredRestore`); the kernel then forms ``θ + c·Δ`` and
``g = w·Δ`` from the packed words in registers (the arithmetic of SPSA's own kernel,
:mod:`adaptor.signs`: the same bits), writes ``g`` to ``p.grad`` and updates from them. SPSA's
restore pass (``θ`` read and written, ``g`` written) and this kernel's reads of ``θ`` and ``g``
become one pass: 5 arrays instead of 8 for SGD. Such tensors come in shaped
``(numel/64, 2, 32)``, as the unpacked words are.

Parameters of the same group that the fast path does not take still go through the base's
``step()``, with the fast parameters' gradients hidden (``None``) during it: hooks registered
on the base instance see only those.

Hyperparameters are read from the shared param groups at every step (LR schedulers keep
working). The base's OWN state is used in place (``step``, ``exp_avg``, ``exp_avg_sq``,
``momentum_buffer``, created by the base itself on the parameter's first step, with torch's
dtypes and devices for ``step``), so a state dict is identical with and without the fast
path and checkpoints move freely between them. The base's ``fused``/``foreach`` flag is
accepted either way: the fast path replaces whichever implementation the base would run.

A parameter takes the generic path (replacement, then ``base.step()``) when any of these
holds — the fast path never approximates:

* the base is not exactly ``torch.optim.SGD``/``Adam``/``AdamW`` (subclasses included);
* the group has ``capturable`` or ``differentiable`` set, or ``lr`` (or a beta)
  is a tensor;
* telemetry is on;
* the step has a skip flag (``skip_nonfinite=True`` or GradScaler's ``found_inf``) and the
  parameter (or Adam's ``step``, e.g. CPU-hosted for CUDA parameters) is on another device
  than the flag. Otherwise a flag is applied in the kernel: every write is
  ``torch.where(skip, old, new)`` (``p.grad`` still receives ``g̃``, as on the generic path)
  and Adam's ``step`` is advanced then decreased by the flag, as torch's fused Adam does;
* the parameter is not float32/float64 (bf16/fp16, complex), its gradient is sparse, of
  another dtype, or not contiguous, or the adaptor's buffer has another dtype
  (``state_dtype``);
* it has fewer than ``FUSED_MIN_NUMEL`` elements;
* it is a DTensor (FSDP2): the generic path works on its local shard;
* it has no adaptor buffer or no base state yet (its first step, and SGD's first momentum
  step, which copies the gradient into the buffer), or that state is not laid out as the
  base keeps it (dtype, device, shape, contiguity);
* ``k₁ = 1 + α(1−β) < WELL_CONDITIONED_K1`` (the replacement then avoids dividing by k₁);
* ``α = 0`` (so that E with α = 0 is the base bit for bit).

On ``meta`` and while ``torch.compile`` traces a step the same functions run uncompiled.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from adaptor import shards, signs
from adaptor.estimators import DeferredRestore
from adaptor.replacement import (
    FUSED_MIN_NUMEL,
    WELL_CONDITIONED_K1,
    chunks,
    compile_variant,
    flat,
    fused_supported,
    pack_scalars,
    replacement_coefficients,
    scalar,
)

_DTYPES = (torch.float32, torch.float64)
_ADAM_CLASSES = (torch.optim.Adam, torch.optim.AdamW)

# Counts of parameter updates taken by the fast path, and of those that also did an
# estimator's deferred restore (tests read them; cheap Python ints).
counters = {"fast": 0, "deferred": 0}


# -- the pointwise kernels (flat tensors; compiled once per variant, count, dtype, device) --
#
# Each kernel updates a group of tensors (FUSED_GROUP, or one): dynamo's per-call cost is
# paid once per group, and the graph holds one loop per tensor. The structural settings
# (maximize, weight decay on or off, nesterov, amsgrad, a skip flag) are keyword flags fixed
# per compiled variant (see _kernel), and so is ``layout``, the names of the coefficients
# present in ``values`` (adaptor.replacement.pack_scalars): a disabled term costs nothing per
# element, and torch's "no term when λ = 0" is kept exactly (0·θ would turn an infinite θ
# into NaN). The numbers are derived by the caller.


def _write(target: Tensor, new: Tensor, skip: Tensor | None) -> None:
    """``target ← new``, or ``where(skip, target, new)``: a skipped step keeps the bits."""
    target.copy_(new if skip is None else torch.where(skip > 0, target, new))


def _inputs(p: Tensor, g: Tensor, restore, i: int) -> tuple[Tensor, Tensor]:
    """``θ`` and ``g`` for the update: as stored, or, with ``restore`` (SPSA's deferred last
    pass: the words of each tensor, ``c``, ``w``), ``θ + c·Δ`` and ``w·Δ`` formed from the
    packed signs, with ``w·Δ`` written to ``p.grad`` as the estimator would write it (the
    same functions as its own kernel: the same bits). The tensors come viewed as
    ``(numel/64, 2, 32)``, the shape of the unpacked words."""
    if restore is None:
        return p, g
    words, shift, weight = restore
    positive = signs.positive(words[i])
    g_new = signs.signed(positive, weight, g.dtype)
    g.copy_(g_new)
    return signs.shift(p, positive, shift), g_new


def _direction(p: Tensor, g: Tensor, c: Tensor, skip: Tensor | None, k1, alpha, pc, qc, wd,
               maximize: bool) -> Tensor:
    """The replacement (``c`` written back), then the base's ``d = ±g̃ [+ λ·θ]``.

    ``g̃`` lives in registers only: ``p.grad`` keeps the raw gradient (one array write less
    than the generic path, which hands ``g̃`` to the base through ``p.grad``).
    """
    g_t = g * k1 + c * alpha
    _write(c, c * pc + g_t * qc, skip)
    d = -g_t if maximize else g_t
    return d if wd is None else d + p * wd


_SGD_NAMES = ("k1", "alpha", "pc", "qc", "neg_lr", "wd", "momentum", "damp1")
_ADAM_NAMES = ("k1", "alpha", "pc", "qc", "lerp_weight", "beta2", "one_minus_beta2", "eps",
               "wd", "decay")


def _sgd_(ps: list[Tensor], gs: list[Tensor], cs: list[Tensor], bufs: list[Tensor] | None,
          skip: Tensor | None, values, restore=None, *, layout: tuple[str, ...],
          maximize: bool, nesterov: bool) -> None:
    k1, alpha, pc, qc, neg_lr, wd, momentum, damp1 = (
        scalar(values, layout, name) for name in _SGD_NAMES
    )
    for i in range(len(ps)):
        p, g = _inputs(ps[i], gs[i], restore, i)
        d = _direction(p, g, cs[i], skip, k1, alpha, pc, qc, wd, maximize)
        if bufs is None:  # no momentum
            u = d
        else:
            buf = bufs[i]
            b = buf * momentum + d * damp1
            _write(buf, b, skip)
            u = d + b * momentum if nesterov else b
        _write(ps[i], p + u * neg_lr, skip)


def _adam_(ps: list[Tensor], gs: list[Tensor], cs: list[Tensor], ms: list[Tensor],
           vs: list[Tensor], vmaxs: list[Tensor] | None, skip: Tensor | None,
           step_sizes: list[Tensor], bias_corrections2_sqrt: list[Tensor], values,
           restore=None, *, layout: tuple[str, ...], maximize: bool,
           low_weight: bool) -> None:
    k1, alpha, pc, qc, lerp_weight, beta2, one_minus_beta2, eps, wd, decay = (
        scalar(values, layout, name) for name in _ADAM_NAMES
    )
    for i in range(len(ps)):
        (p, g), m, v = _inputs(ps[i], gs[i], restore, i), ms[i], vs[i]
        d = _direction(p, g, cs[i], skip, k1, alpha, pc, qc, wd, maximize)  # wd: coupled λ
        # torch.lerp(m, d, w) with w = 1 − β₁, written out as ATen computes it (for w < 0.5:
        # m + w·(d − m); else d − (d − m)·(1 − w)): inductor's lerp would specialise on w.
        # lerp_weight is w in the first form and β₁ = 1 − w in the second.
        m_new = m + lerp_weight * (d - m) if low_weight else d - (d - m) * lerp_weight
        v_new = v * beta2 + d * d * one_minus_beta2
        if vmaxs is not None:  # amsgrad: normalise by the running maximum of v
            v_max = torch.maximum(vmaxs[i], v_new)
            _write(vmaxs[i], v_max, skip)
            denom = torch.sqrt(v_max) / bias_corrections2_sqrt[i] + eps
        else:
            denom = torch.sqrt(v_new) / bias_corrections2_sqrt[i] + eps
        decayed = p if decay is None else p * decay  # AdamW: θ·(1 − lr·λ)
        _write(ps[i], decayed - step_sizes[i] * (m_new / denom), skip)
        _write(m, m_new, skip)
        _write(v, v_new, skip)


def _bias_corrections(
    steps: list[Tensor], lr: float, beta1: float, beta2: float, dtypes: list[torch.dtype]
) -> list[tuple[Tensor, Tensor]]:
    """Per tensor ``lr / (1 − β₁ᵗ)`` and ``√(1 − β₂ᵗ)``: 0-d tensors of its dtype on its
    ``step``'s device.

    As torch's Adam forms them in Python floats from the (already advanced) step count, but
    without reading it on the host. Computed outside the kernel (inside, the float64 ``pow``
    would run once per element), for all the group's tensors on one device and of one dtype
    at once: a dozen small ops per group instead of per tensor (they cost about 0.25 ms per
    tensor on CPU, a tenth of torch's fused AdamW step on a 4M-element tensor). The results
    are views into one vector; the kernels take them without recompiling.
    """
    out: list[tuple[Tensor, Tensor]] = [None] * len(steps)  # type: ignore[list-item]
    batches: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, (step, dtype) in enumerate(zip(steps, dtypes)):
        batches.setdefault((step.device, dtype), []).append(i)
    for (_, dtype), indices in batches.items():
        t = torch.stack([steps[i] for i in indices]).to(torch.float64)
        bias_correction1 = torch.pow(beta1, t).neg_().add_(1.0)
        bias_correction2 = torch.pow(beta2, t).neg_().add_(1.0)
        # lr / bc1 as a true division, as torch's Python-float ``lr / bias_correction1``.
        step_size = torch.full_like(t, lr).div_(bias_correction1)
        # Rounded to the parameter's dtype here, as torch's kernels round a scalar to their
        # compute dtype; a float64 0-d operand would make inductor compute every element in
        # float64 (unvectorised on CPU).
        pairs = zip(step_size.to(dtype).unbind(0), bias_correction2.sqrt_().to(dtype).unbind(0))
        for i, pair in zip(indices, pairs):
            out[i] = pair
    return out


_FUNCTIONS = {"sgd": _sgd_, "adam": _adam_}
_compiled: dict[tuple, Any] = {}


def _kernel(kind: str, device: torch.device, variant: tuple) -> Any:
    """The compiled kernel of one variant (``kind``, and the layout, flags, None-ness and
    tensor count in ``variant``; each from its own code object, see :func:`compile_variant`),
    or the plain function on meta and inside a torch.compile trace."""
    function = _FUNCTIONS[kind]
    if not fused_supported(device):  # meta, or inside a torch.compile trace: run as is
        return function
    key = (kind, variant)
    kernel = _compiled.get(key)
    if kernel is None:
        kernel = _compiled[key] = compile_variant(function, str(len(_compiled)))
    return kernel


# -- eligibility ---------------------------------------------------------------------------


def _group_kind(base: torch.optim.Optimizer, group: dict[str, Any]) -> str | None:
    """Which kernel reproduces this group of the base, or None (generic path)."""
    if group.get("capturable", False) or group.get("differentiable", False):
        return None
    if isinstance(group.get("lr"), Tensor):
        return None
    kind = type(base)
    if kind is torch.optim.SGD:
        if any(isinstance(group[k], Tensor) for k in ("momentum", "dampening", "weight_decay")):
            return None
        return "sgd_momentum" if group["momentum"] != 0 else "sgd"
    if kind in _ADAM_CLASSES:
        if any(isinstance(b, Tensor) for b in group["betas"]):
            return None
        if isinstance(group["weight_decay"], Tensor) or isinstance(group["eps"], Tensor):
            return None
        return "amsgrad" if group.get("amsgrad", False) else "adam"
    return None


def _same_layout(t: object, p: Tensor) -> bool:
    return (
        isinstance(t, Tensor)
        and t.dtype == p.dtype
        and t.device == p.device
        and t.shape == p.shape
        and t.is_contiguous()
        and not t.requires_grad
    )


def _param_ok(kind: str, p: Tensor, buffer: object, base_state: dict[str, Any],
              fused: bool | None) -> bool:
    grad = p.grad
    if p.dtype not in _DTYPES or p.numel() < max(FUSED_MIN_NUMEL, 2) or shards.is_dtensor(p):
        return False
    if grad.is_sparse or grad.dtype != p.dtype or not grad.is_contiguous():
        return False
    if not p.is_contiguous() or not _same_layout(buffer, p):
        return False
    if (fused if fused is not None else p.device.type == "cuda") is not True:
        return False
    if p.device.type not in ("cpu", "cuda", "meta"):
        return False
    if kind == "sgd":
        return True
    if kind == "sgd_momentum":
        return set(base_state) == {"momentum_buffer"} and _same_layout(
            base_state["momentum_buffer"], p
        )
    step = base_state.get("step")
    keys = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if kind == "amsgrad" else set())
    return (
        set(base_state) == keys
        and (kind != "amsgrad" or _same_layout(base_state["max_exp_avg_sq"], p))
        and isinstance(step, Tensor)
        and step.dim() == 0
        and step.dtype.is_floating_point
        and step.device in (p.device, torch.device("cpu"))
        and _same_layout(base_state["exp_avg"], p)
        and _same_layout(base_state["exp_avg_sq"], p)
    )


def _on_flag_device(kind: str, p: Tensor, entry: dict[str, Any], skip: Tensor) -> bool:
    """With a skip flag the parameter (and Adam's ``step``, which the skip must not
    advance) live on the flag's device: no device→host copy of the flag."""
    if p.device != skip.device:
        return False
    step = entry.get("step")
    return kind in ("sgd", "sgd_momentum") or not isinstance(step, Tensor) or (
        step.device == skip.device
    )


Chosen = list[tuple[str, dict[str, Any], float, float, list[Tensor]]]


def plan(optimizer: Any, hparams: Iterable[tuple[float, float]], buffer_key: str,
         skip: Tensor | None = None) -> Chosen:
    """Per group: ``(kind, group, α, β, params)`` of the parameters the fast path takes."""
    base = optimizer.base
    chosen = []
    for group, (alpha, beta) in zip(optimizer.param_groups, hparams):
        kind = _group_kind(base, group)
        # α = 0 leaves g unchanged: the base's own kernel then runs, so that E with α = 0 is
        # the base bit for bit (the fused kernel rounds the update in its own order).
        if (
            kind is None
            or alpha == 0.0
            or replacement_coefficients(alpha, beta)[0] < WELL_CONDITIONED_K1
        ):
            continue
        params = []
        for p in group["params"]:
            # Size first: most tensors of a model are small, and the state lookups below
            # hash the tensor in Python (about 1 µs each).
            if p.grad is None or p.numel() < FUSED_MIN_NUMEL:
                continue
            own = optimizer._own_state.get(p, {})  # the adaptor's own entry, not E.state's view
            entry = base.state.get(p, {})
            if skip is not None and not _on_flag_device(kind, p, entry, skip):
                continue
            if _param_ok(kind, p, own.get(buffer_key), entry, optimizer.fused):
                params.append(p)
        if params:
            chosen.append((kind, group, alpha, beta, params))
    return chosen


# -- running ---------------------------------------------------------------------------------


@torch.no_grad()
def run(optimizer: Any, chosen: list, buffer_key: str, skip: Tensor | None = None,
        pending: DeferredRestore | None = None) -> None:
    """Replacement and base update for every chosen parameter: one kernel call per
    FUSED_GROUP parameters of a device and dtype (``adaptor.replacement.chunks``).

    ``pending``: the estimator's deferred last pass (SPSA), never with a skip flag; its
    parameters get ``θ + c·Δ`` and ``g = w·Δ`` inside the same kernel (``_inputs``).
    """
    if pending is not None and skip is not None:
        raise ValueError("a deferred restore cannot be fused into a step with a skip flag")
    base_state = optimizer.base.state
    own_state = optimizer._own_state
    for kind, group, alpha, beta, params in chosen:
        k1, pc, qc = replacement_coefficients(alpha, beta)
        maximize = bool(group["maximize"])
        lr = group["lr"]
        wd = float(group["weight_decay"])
        sgd = kind in ("sgd", "sgd_momentum")
        # Every coefficient as a Python float (derived in double, as torch derives them),
        # packed for each device and dtype by pack_scalars; a term torch leaves out (λ = 0,
        # AdamW's decay, SGD's momentum) is None and absent from the kernel.
        if sgd:
            momentum = kind == "sgd_momentum"
            named = {"k1": k1, "alpha": alpha, "pc": pc, "qc": qc, "neg_lr": -lr,
                     "wd": wd if wd != 0 else None,
                     "momentum": float(group["momentum"]) if momentum else None,
                     "damp1": 1.0 - group["dampening"] if momentum else None}
            flags = {"maximize": maximize, "nesterov": bool(group["nesterov"])}
        else:
            steps = [base_state[p]["step"] for p in params]
            # As torch's foreach path: one tensor added to CPU-hosted steps (no host read).
            cpu = [s for s in steps if s.device.type == "cpu"]
            other = [s for s in steps if s.device.type != "cpu"]
            if cpu:
                torch._foreach_add_(cpu, torch.tensor(1.0, device="cpu"), alpha=1.0)
            if other:
                torch._foreach_add_(other, 1)
            beta1, beta2 = group["betas"]
            decoupled = bool(
                group.get("decoupled_weight_decay", type(optimizer.base) is torch.optim.AdamW)
            )
            low_weight = 1.0 - beta1 < 0.5
            named = {"k1": k1, "alpha": alpha, "pc": pc, "qc": qc,
                     "lerp_weight": 1.0 - beta1 if low_weight else beta1, "beta2": beta2,
                     "one_minus_beta2": 1.0 - beta2, "eps": group["eps"],
                     "wd": None if decoupled or wd == 0 else wd,
                     "decay": 1.0 - lr * wd if decoupled and wd != 0 else None}
            flags = {"maximize": maximize, "low_weight": low_weight}
            corrections = _bias_corrections(steps, lr, beta1, beta2, [p.dtype for p in params])
        buckets: dict[tuple[torch.device, torch.dtype, bool], list[int]] = {}
        for index, p in enumerate(params):
            deferred = pending is not None and pending.words(p) is not None
            buckets.setdefault((p.device, p.dtype, deferred), []).append(index)
        for (device, dtype, deferred), indices in buckets.items():
            values, layout = pack_scalars(device, dtype, named)
            # A deferred restore's tensors are shaped as its unpacked words (see _inputs)
            view = signs.blocks if deferred else flat
            for chunk in chunks(indices):
                variant = (kind, layout, tuple(flags.items()), skip is None, deferred,
                           len(chunk))
                kernel = _kernel("sgd" if sgd else "adam", device, variant)
                taken = [params[i] for i in chunk]
                ps = [view(p) for p in taken]
                gs = [view(p.grad) for p in taken]
                cs = [view(own_state[p][buffer_key]) for p in taken]
                entries = [base_state[p] for p in taken]
                restore = None
                if deferred:
                    restore = ([pending.words(p) for p in taken],
                               *pending.scalars(device, dtype))
                if sgd:
                    bufs = [view(e["momentum_buffer"]) for e in entries] if momentum else None
                    kernel(ps, gs, cs, bufs, skip, values, restore, layout=layout, **flags)
                else:
                    vmaxs = (
                        [view(e["max_exp_avg_sq"]) for e in entries]
                        if kind == "amsgrad"
                        else None
                    )
                    kernel(ps, gs, cs, [view(e["exp_avg"]) for e in entries],
                           [view(e["exp_avg_sq"]) for e in entries], vmaxs, skip,
                           [corrections[i][0] for i in chunk],
                           [corrections[i][1] for i in chunk], values, restore,
                           layout=layout, **flags)
                if deferred:
                    pending.done(taken)
                    counters["deferred"] += len(chunk)
                counters["fast"] += len(chunk)
        if not sgd and skip is not None:
            # As torch's fused Adam under found_inf: advanced, then taken back where skipped.
            torch._foreach_sub_(steps, [skip] * len(steps))
