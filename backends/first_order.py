r"""First-order base updates: Lamb, AdaBelief and ALTO (the paper's adapted Lamb).

    from backends import Lamb, AdaBelief, ALTO, param_groups_for, SGD, Adam, AdamW

All three are ``torch.optim.Optimizer`` subclasses written like ``torch/optim/adamw.py``:
hyperparameters are validated when a group is added (messages name the argument and its
range), there is a multi-tensor implementation (``torch._foreach_*`` on tensors grouped by
device and dtype, the default) and a single-tensor one (``foreach=False``), and ``step``
never reads a device value on the host: step counters are 0-d tensors on the parameter's
device, bias corrections and trust ratios are computed as tensors. Every step runs on
``meta`` parameters. Complex parameters are updated as their real views
(``torch.view_as_real``); sparse gradients raise ``RuntimeError``.

Lamb and ALTO also have a compiled path (``fused=True``; the default on CUDA, opt-in on CPU
because the first step compiles for tens of seconds): two ``torch.compile``\d passes per
large tensor (moments, replacement and the two squared norms in the first; the update in the
second) instead of some fifteen foreach passes, up to eight tensors per compiled call. The
small contiguous tensors of a device/dtype bucket that has a large one (biases, norm weights)
ride along in the same calls; a bucket without a large tensor takes the foreach path.
ALTO's compiled pass keeps ``g̃`` in registers: ``p.grad`` of a tensor it takes keeps the raw
gradient (the foreach and single-tensor paths leave ``g̃`` there, as the adaptor does).

Precision, non-finite steps, GradScaler and compile (every path of all three classes):

* ``state_dtype=None``: float32 moments (and ALTO's buffer) for bf16/fp16 parameters, the
  parameter's dtype otherwise; any floating dtype may be given.
* Arithmetic on bf16/fp16 parameters is done in float32 and each parameter is written once
  per step (one rounding); ``kahan=True`` keeps that rounding error in
  ``state["kahan_comp"]`` (parameter dtype, +2 bytes per bf16 element) and adds it back at
  the next step, so updates below half an ulp are not lost. No effect on float32/float64.
* ``skip_nonfinite=True`` skips a step whose gradients hold a NaN or Inf, decided on the
  device: parameters and every state tensor stay bit-identical (``torch.where`` inside the
  compiled kernels; a snapshot and masked restore around the foreach/single-tensor step,
  which costs one temporary copy of parameters and state), ``state["nonfinite_skips"]``
  counts it and ``optimizer.skipped_steps`` returns the count. Off by default, like torch.
* ``_step_supports_amp_scaling = True``: ``torch.amp.GradScaler.step`` hands over its scale
  and ``found_inf``; the step unscales on the device and skips where ``found_inf`` is set
  (no host read in ``scaler.step(opt)``).
* ``torch.compile`` of a function that calls ``opt.step()`` works with default arguments
  (the fused kernels are not nested into an outer compile: the traced step takes the foreach
  path).

Distributed (DDP, FSDP2/HSDP) and checkpoints:

* Under DDP nothing changes (whole parameters, averaged gradients).
* Under FSDP2 (``fully_shard``: DTensor parameters, gradients and state) the kernels run on
  each DTensor's local shard (``to_local()``: no DTensor dispatch per op; state stays
  DTensor). Lamb/ALTO's trust ratio needs ‖θ‖ and ‖r‖ of the whole parameter: the shards'
  squared norms are all-reduced (sum) over the mesh dimensions the parameter is sharded
  over — one ``all_reduce`` of 2 scalars per parameter tensor per bucket and step — giving
  one process's numbers up to the order of the sums. A skip flag (``skip_nonfinite``,
  GradScaler) is all-reduced (max) over the shard groups, so a NaN in one shard skips the
  step on every rank. ``fused=True`` falls back to the foreach path for sharded tensors.
* ``torch.distributed.checkpoint``: ``load_state_dict`` takes state keyed by any ids the
  saved groups list (FQNs from ``get_optimizer_state_dict``), as torch's does, and a group's
  ``state_dtype`` is saved by name (DCP refuses ``torch.dtype`` values).

``SGD``, ``Adam`` and ``AdamW`` are torch's own, re-exported so that one import gives every
first-order base.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import SGD, Adam, AdamW, Optimizer

from adaptor import shards
from adaptor.explore import ALPHA_KEY, BETA_KEY, BUFFER_KEY
from adaptor.precision import (
    LOW_PRECISION,
    SKIPS_KEY,
    count_skip_,
    kahan_add_,
    prepare_step,
    resolve_state_dtype,
    restore_where_,
    skip_count,
    snapshot,
)
from adaptor.replacement import (
    FUSED_GROUP,
    FUSED_MIN_NUMEL,
    WELL_CONDITIONED_K1,
    check_alpha_beta,
    chunks,
    compile_variant,
    flat,
    fused_supported,
    pack_scalars,
    replace_foreach_,
    replacement_coefficients,
    scalar,
)
from backends._common import step_dtype
from backends._state import name_dtypes
from backends._validation import (
    check_betas,
    check_choice,
    check_flag,
    check_lr,
    check_nonneg,
    check_optional_positive,
    check_pair,
    check_positive,
    check_precision,
)
from backends._validation import dtype_from_name as _dtype_from_name

__all__ = ["ALTO", "SGD", "AdaBelief", "Adam", "AdamW", "Lamb", "param_groups_for"]

Closure = Callable[[], Any]
KAHAN_KEY = "kahan_comp"  # Kahan compensation of bf16/fp16 parameter writes


# -- shared machinery ------------------------------------------------------------------------


def _real_view(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _scale(values: Tensor, lr: float | Tensor) -> Tensor:
    return values * (-lr)


def _trust_ratio(
    w_norm: Tensor,
    r_norm: Tensor,
    trust_eps: float,
    norm_eps: float,
    trust_clip: tuple[float, float] | None,
    zero_norm_trust: str,
) -> Tensor:
    """``φ(‖θ‖)/(‖r‖ + ε₂φ(‖θ‖))``, φ(x) = x + ε₃; 1 where a norm is 0 unless ``"paper"``."""
    phi = w_norm + norm_eps
    ratio = phi / (r_norm + trust_eps * phi)
    if zero_norm_trust == "one":  # LAMB's reference, timm, pytorch-optimizer: no sync
        ratio = torch.where((w_norm > 0) & (r_norm > 0), ratio, torch.ones_like(ratio))
    if trust_clip is not None:
        ratio = ratio.clamp(trust_clip[0], trust_clip[1])
    return ratio


def _divide_into(
    numerators: list[Tensor], denominators: list[Tensor], *, in_place: bool
) -> list[Tensor]:
    """``numerators / denominators``: written over the (temporary) denominators when
    ``in_place``, else a new list (``torch._foreach_div``).

    Callers pass ``in_place=_on_cpu(denominators)``: on CPU a fresh large tensor costs page
    faults that take longer than the division itself; on other devices the caching
    allocator makes a new list free and the foreach kernel is one launch.
    """
    if not in_place:
        return torch._foreach_div(numerators, denominators)
    for n, d in zip(numerators, denominators):
        torch.div(n, d, out=d)
    return denominators


def _on_cpu(tensors: list[Tensor]) -> bool:
    return tensors[0].device.type == "cpu"


_is_dtensor = shards.is_dtensor
_shard_groups = shards.shard_groups
_local = shards.local


class _Shards:
    """For each tensor of a bucket, the process groups of its shards (``()``: not sharded).

    Lamb's trust ratio needs ‖θ‖ and ‖r‖ of the *whole* parameter; a rank holds one shard.
    :meth:`norms` forms the local squared norms and all-reduces them (sum) over each
    tensor's shard groups, then takes the square roots: the same numbers as one process up
    to the order of the sum. Communication: one ``all_reduce`` of ``2·n`` scalars per bucket
    and step (``n`` tensors; 16 bytes per float64 parameter tensor, 8 per float32).
    """

    def __init__(self, groups: list[tuple[Any, ...]]):
        self.groups = groups

    def pick(self, index: list[int]) -> _Shards:
        return _Shards([self.groups[i] for i in index])

    def sum_(self, values: Tensor) -> Tensor:
        """All-reduce (sum) the last axis of ``values`` (one column per tensor) in place
        over each column's shard groups."""
        by_groups: dict[tuple[int, ...], list[int]] = {}
        for i, groups in enumerate(self.groups):
            if groups:
                by_groups.setdefault(tuple(map(id, groups)), []).append(i)
        for index in by_groups.values():
            groups = self.groups[index[0]]
            whole = len(index) == values.shape[-1]
            part = values if whole else values[..., index]
            for group in groups:
                torch.distributed.all_reduce(part, group=group)
            if not whole:
                values[..., index] = part
        return values

    def norms(self, a: list[Tensor], b: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Whole-tensor 2-norms of the shards ``a`` and ``b`` (stacked, one per tensor)."""
        sq = torch.stack(torch._foreach_norm([*a, *b])).square_()
        sq = self.sum_(sq.view(2, len(a)))
        return sq[0].sqrt(), sq[1].sqrt()


def _norms(
    a: list[Tensor], b: list[Tensor], shards: _Shards | None
) -> tuple[Tensor, Tensor]:
    """Stacked 2-norms of each tensor of ``a`` and of ``b``; whole-parameter norms of
    sharded tensors (:class:`_Shards`)."""
    if shards is None:
        return torch.stack(torch._foreach_norm(a)), torch.stack(torch._foreach_norm(b))
    return shards.norms(a, b)


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Arithmetic dtype of a bucket: float32 at least (bf16/fp16 tensors are computed in
    float32 and rounded once when written), float64 when any tensor is float64."""
    out = torch.float32
    for dtype in dtypes:
        out = torch.promote_types(out, dtype)
    return out


def _work(tensors: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """``tensors`` themselves when already in ``dtype``, else temporary copies in ``dtype``."""
    if not tensors or tensors[0].dtype == dtype:
        return tensors
    return [t.to(dtype) for t in tensors]


def _axpy_(ys: list[Tensor], xs: list[Tensor], a: float | Tensor) -> None:
    """``y += a·x`` for a float or a 0-d tensor ``a`` (``alpha=`` takes numbers only)."""
    if isinstance(a, Tensor):
        torch._foreach_add_(ys, torch._foreach_mul(xs, a))
    else:
        torch._foreach_add_(ys, xs, alpha=a)


class _Writer:
    """The one write of each parameter per step: ``θ ← round(θ + s·u)``.

    ``targets`` are the parameters (real views, their own dtype); ``work`` the same values in
    the compute dtype (the parameters themselves when that is their dtype). ``direct``: the
    parameters are written in place by foreach ops (float32/float64, no compensation).
    Otherwise the sum is formed in the compute dtype and rounded once on the write, or
    Kahan-compensated with ``comps`` (:func:`adaptor.precision.kahan_add_`).
    """

    def __init__(self, targets: list[Tensor], work: list[Tensor], comps: list[Tensor] | None):
        self.targets, self.work, self.comps = targets, work, comps
        self.direct = work is targets and comps is None

    def add_(
        self, updates: list[Tensor], scales: list[Tensor] | tuple[Tensor, ...] | float | Tensor
    ) -> None:
        """``θᵢ += scalesᵢ·updatesᵢ`` (``updates`` may be overwritten)."""
        if self.direct:
            if isinstance(scales, (list, tuple)):
                torch._foreach_addcmul_(self.targets, updates, list(scales))
            elif isinstance(scales, Tensor):
                torch._foreach_addcmul_(self.targets, updates, [scales] * len(updates))
            else:
                torch._foreach_add_(self.targets, updates, alpha=scales)
            return
        if isinstance(scales, (list, tuple, Tensor)) or scales != 1.0:
            torch._foreach_mul_(updates, scales)
        if self.comps is None:
            torch._foreach_add_(self.work, updates)
            torch._foreach_copy_(self.targets, self.work)  # the one rounding
        else:
            for target, update, comp in zip(self.targets, updates, self.comps):
                kahan_add_(target, update, comp)

    def add_one_(self, i: int, update: Tensor, scale: float | Tensor) -> None:
        """``θᵢ += scale·update`` for one tensor (the single-tensor path)."""
        if self.direct:
            if isinstance(scale, Tensor):
                self.targets[i].add_(update.mul_(scale))
            else:
                self.targets[i].add_(update, alpha=scale)
            return
        update = update.mul_(scale)
        if self.comps is None:
            self.targets[i].copy_(self.work[i].add_(update))
        else:
            kahan_add_(self.targets[i], update, self.comps[i])


class _Bucket:
    """One group's tensors on one device with one parameter dtype (real views)."""

    def __init__(self, device, params, grads, states, steps, comps, shards=None):
        self.device: torch.device = device
        self.params: list[Tensor] = params
        self.grads: list[Tensor] = grads
        self.states: list[list[Tensor]] = states
        self.steps: list[Tensor] = steps
        self.comps: list[Tensor] | None = comps
        # FSDP2: the lists hold the DTensors' local shards; ``shards`` says where to reduce
        self.shards: _Shards | None = shards

    def pick(self, index: list[int]) -> _Bucket:
        take = lambda xs: [xs[i] for i in index]  # noqa: E731
        return _Bucket(
            self.device, take(self.params), take(self.grads), [take(s) for s in self.states],
            take(self.steps), None if self.comps is None else take(self.comps),
            None if self.shards is None else self.shards.pick(index),
        )

    def tensors(self) -> list[Tensor]:
        """Everything a skipped step must leave bit-identical."""
        out = [*self.params, *(t for s in self.states for t in s), *self.steps]
        return out + (self.comps or [])


def _run_bucket(
    kernel: Callable[..., None],
    bucket: _Bucket,
    skip: Tensor | None,
    *,
    grad_out: bool = False,
    **hp: Any,
) -> None:
    """Run a foreach/single-tensor ``kernel`` on ``bucket`` in its compute dtype.

    ``kernel(params, grads, *states, steps, write=writer, **hp)`` receives work lists in the
    compute dtype; state lists held in another dtype are written back once afterwards, and
    the replaced gradient (ALTO) is written back into ``p.grad``. With a skip flag, every
    tensor the step may change is snapshotted and restored where the flag is set
    (``precision.snapshot``/``restore_where_``: one temporary copy of params and state).
    """
    dtype = _compute_dtype(bucket.params[0].dtype, *(s[0].dtype for s in bucket.states))
    params = _work(bucket.params, dtype)
    grads = _work(bucket.grads, dtype)
    states = [_work(s, dtype) for s in bucket.states]
    guarded = bucket.tensors() if skip is not None else []
    saved = snapshot(guarded) if skip is not None else None
    writer = _Writer(bucket.params, params, bucket.comps)
    kernel(params, grads, *states, bucket.steps, write=writer, **hp)
    for held, work in zip(bucket.states, states):
        if work is not held:
            torch._foreach_copy_(held, work)
    if grad_out and grads is not bucket.grads:  # ALTO leaves g̃ in p.grad
        torch._foreach_copy_(bucket.grads, grads)
    if saved is not None:
        restore_where_(guarded, saved, skip)


class _FirstOrder(Optimizer):
    """What Lamb, ALTO and AdaBelief share: validation, state, closure, grouping."""

    _state_keys: tuple[str, ...] = ()
    _optional_state_keys: tuple[str, ...] = ()
    explores = False  # whether the optimizer already does the adaptor's replacement
    _step_supports_amp_scaling = True  # GradScaler hands over grad_scale/found_inf

    def _validate(self, group: dict[str, Any]) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its hyperparameters (merged with the defaults) are validated first."""
        if isinstance(param_group, dict):
            self._validate({**self.defaults, **param_group})
        super().add_param_group(param_group)

    def _check_grads(self) -> None:
        name = type(self).__name__
        for index, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError(
                        f"{name} does not support sparse gradients (param group {index}); "
                        "use a dense gradient or torch.optim.SparseAdam"
                    )

    def _run_closure(self, closure: Closure | None) -> Any:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def _gather(self, group: dict[str, Any]) -> list[_Bucket]:
        """The group's parameters with a gradient, bucketed by device and dtype (real views),
        creating state lazily: moments in the group's state dtype, a Kahan compensation
        (parameter dtype) for bf16/fp16 parameters of a ``kahan=True`` group."""
        count = len(self._state_keys)
        lists: list[list[Any]] = [[] for _ in range(5 + count)]
        kahan = group["kahan"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=step_dtype(p), device=p.device)
            dtype = resolve_state_dtype(p.dtype, group["state_dtype"])
            for key in self._state_keys:
                if key not in state:  # new, or loaded from a state dict without it
                    state[key] = torch.zeros_like(
                        p, dtype=dtype, memory_format=torch.preserve_format
                    )
            comp = None
            if kahan and p.dtype in LOW_PRECISION:
                comp = state.get(KAHAN_KEY)
                if comp is None:
                    comp = state[KAHAN_KEY] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
            # FSDP2 (DTensor parameters, gradients and state): the kernels work on the local
            # shards, element-wise as on any tensor; only Lamb's norms need the shard groups.
            groups = _shard_groups(p)
            if groups:
                lists[0].append(_real_view(_local(p)))
                lists[1].append(_real_view(_local(p.grad)))
                for i, key in enumerate(self._state_keys):
                    lists[2 + i].append(_real_view(_local(state[key])))
                comp = None if comp is None else _local(comp)
            else:
                lists[0].append(_real_view(p))
                lists[1].append(_real_view(p.grad))
                for i, key in enumerate(self._state_keys):
                    lists[2 + i].append(_real_view(state[key]))
            lists[2 + count].append(state["step"])
            lists[3 + count].append(comp)
            lists[4 + count].append(groups)
        if not lists[0]:
            return []
        shard_groups = lists.pop()
        sharded = any(shard_groups)
        grouped = Optimizer._group_tensors_by_device_and_dtype(
            lists, with_indices=sharded  # type: ignore[arg-type]
        )
        buckets = []
        # Under torch.compile the keys are (None, None): the device comes from a tensor.
        for tensors, indices in grouped.values():
            params, grads, *states, steps, comps = tensors
            full = all(c is not None for c in comps)
            shards = _Shards([shard_groups[i] for i in indices]) if sharded else None
            buckets.append(
                _Bucket(
                    params[0].device, params, grads, states, steps, comps if full else None,
                    shards,
                )
            )
        return buckets

    def _prepare(self) -> Tensor | None:
        """GradScaler's unscale and the step's skip flag (``None``: no flag, no masking), on
        the local shards under FSDP2, the flag then common to every rank
        (:mod:`adaptor.shards`)."""
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        check = bool(grads) and any(group["skip_nonfinite"] for group in self.param_groups)
        flag = prepare_step(self, [_real_view(_local(g)) for g in grads], skip_nonfinite=check)
        return shards.reduce_skip_flag(flag, grads)

    def _count_skips(self, skip: Tensor | None) -> None:
        """Add the flag to every stepped parameter's ``nonfinite_skips`` (one foreach add
        per device; :func:`adaptor.precision.count_skip_` creates a missing counter)."""
        if skip is None:
            return
        counters: dict[torch.device, list[Tensor]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if SKIPS_KEY not in state:
                    count_skip_(state, skip, p)
                else:
                    counters.setdefault(state[SKIPS_KEY].device, []).append(state[SKIPS_KEY])
        for device, tensors in counters.items():
            flag = skip.to(device, non_blocking=True)
            torch._foreach_add_(tensors, [flag] * len(tensors))  # 0-d operands: no host read

    @property
    def skipped_steps(self) -> Tensor | None:
        """Steps skipped for a non-finite gradient or GradScaler's ``found_inf``: a 0-d
        float32 tensor on the first parameter's device, ``None`` before any check ran."""
        return skip_count(self)

    def _validate_precision(self, group: dict[str, Any]) -> None:
        check_precision(self._owner, group)

    def _upgrade_group(self, group: dict[str, Any]) -> None:
        """Rewrite a loaded group saved by an earlier version (nothing to do by default)."""

    def _state_dtype(self, p: Tensor, key: str) -> torch.dtype:
        """The dtype a state tensor of ``p`` is kept in (see :mod:`adaptor.precision`)."""
        if key == "step":
            return step_dtype(p)
        if key == SKIPS_KEY:
            return torch.float32
        if key == KAHAN_KEY:
            return p.dtype
        group = self._group_of(p)
        return resolve_state_dtype(p.dtype, group.get("state_dtype") if group else None)

    def _group_of(self, p: Tensor) -> dict[str, Any] | None:
        for group in self.param_groups:
            if any(p is q for q in group["params"]):
                return group
        return None

    def _check_state_dict(self, state_dict: Any) -> list[tuple[Tensor, dict[str, Any]]]:
        """Raise ``ValueError`` naming parameter index, key and shapes for a state dict that
        does not fit; return ``(param, saved entry)`` pairs. Reads nothing but Python values
        and tensor metadata, and changes nothing."""
        where = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError(f"{where}: expected a dict with 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"{where}: the state dict has {len(saved_groups)} param groups, the optimizer "
                f"{len(self.param_groups)}"
            )
        for g, saved in enumerate(saved_groups):
            _dtype_from_name(saved.get("state_dtype"), f"{where}: param group {g}: state_dtype")
        id_map: dict[Any, Tensor] = {}
        for g, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"{where}: param group {g} has {len(saved['params'])} parameters in the "
                    f"state dict, {len(group['params'])} in the optimizer"
                )
            id_map.update(zip(saved["params"], group["params"]))
        sized = set(self._state_keys) | {KAHAN_KEY}
        required = {"step", *self._state_keys} - set(self._optional_state_keys)
        allowed = {"step", SKIPS_KEY} | sized
        pairs = []
        for index, entry in state_dict["state"].items():
            if index not in id_map:
                if isinstance(index, int):
                    raise ValueError(
                        f"{where}: state for parameter index {index}, but the optimizer has "
                        f"{len(id_map)} parameters (indices {min(id_map, default=0)}.."
                        f"{max(id_map, default=-1)})"
                    )
                continue  # not a parameter's state: torch keeps it as it is
            if not isinstance(entry, dict) or not entry:
                continue
            p = id_map[index]
            unknown = sorted(map(str, set(entry) - allowed))
            if unknown:
                raise ValueError(
                    f"{where}: parameter {index}: unknown state key(s) {unknown}; "
                    f"{type(self).__name__} keeps {sorted(allowed)}"
                )
            missing = sorted(required - set(entry))
            if missing:
                raise ValueError(f"{where}: parameter {index}: missing state key(s) {missing}")
            for key, value in entry.items():
                if key in sized:
                    if not isinstance(value, Tensor) or value.shape != p.shape:
                        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value)
                        raise ValueError(
                            f"{where}: parameter {index}: state {key!r} has shape {shape}, "
                            f"the parameter has shape {tuple(p.shape)}"
                        )
                elif isinstance(value, Tensor) and value.numel() != 1:
                    raise ValueError(
                        f"{where}: parameter {index}: state {key!r} must have one element, "
                        f"got shape {tuple(value.shape)}"
                    )
            pairs.append((p, entry))
        return pairs

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """torch's state dict, with a group's ``state_dtype`` saved by name (``"float32"``):
        ``torch.distributed.checkpoint`` refuses ``torch.dtype`` values
        (``full_state_dict=True`` raises "Unexpected value type <class 'torch.dtype'>")."""
        return name_dtypes(super().state_dict(), ("state_dtype",))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loading, after checking that the state fits (``ValueError`` naming the
        parameter index, key and shapes otherwise, with the optimizer left as it was).

        As torch's, the saved groups' ``params`` are matched to the current parameters in
        order, so ``state`` may be keyed by any ids the saved groups list (parameter names,
        as ``torch.distributed.checkpoint`` writes them). A ``state_dtype`` saved by name
        (:meth:`state_dict`) or as a ``torch.dtype`` both load.

        State tensors are copied in the dtype this optimizer keeps them in (torch's loading
        casts them to the parameter's dtype, which would round float32 state of bf16
        parameters), on the parameter's device; step counters in :func:`step_dtype`.
        """
        pairs = self._check_state_dict(state_dict)
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            self._upgrade_group(group)
            if isinstance(group.get("state_dtype"), str):
                group["state_dtype"] = _dtype_from_name(group["state_dtype"], "state_dtype")
            for key, value in self.defaults.items():  # keys newer than the state dict
                group.setdefault(key, value)
        for p, saved in pairs:
            state = self.state.get(p)
            # A load post-hook may have put anything into ``self.state`` (torch accepts it).
            if not isinstance(state, dict):
                continue
            for key, value in saved.items():
                if key not in state:
                    continue
                dtype = self._state_dtype(p, key)
                if isinstance(value, Tensor):
                    if value.is_complex() and not dtype.is_complex:
                        dtype = value.dtype
                    state[key] = value.to(device=p.device, dtype=dtype, copy=True)
                elif isinstance(value, numbers.Real):
                    state[key] = torch.tensor(float(value), dtype=dtype, device=p.device)


# -- Lamb and ALTO ---------------------------------------------------------------------------


def _lamb_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *more: list[Tensor],
    write: _Writer,
    lr: float | Tensor,
    beta2: float,
    beta3: float,
    eps: float,
    trust_eps: float,
    norm_eps: float,
    weight_decay: float,
    bias_correction: bool,
    layer_adaptation: bool,
    trust_clip: tuple[float, float] | None,
    zero_norm_trust: str,
    alpha: float,
    beta: float,
    shards: _Shards | None = None,
) -> None:
    buffers, steps = more if len(more) == 2 else (None, more[0])
    if buffers is not None:
        replace_foreach_(grads, buffers, alpha, beta)
    torch._foreach_add_(steps, 1)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta2)
    torch._foreach_mul_(exp_avg_sqs, beta3)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta3)
    # With b₂ = 1-β₂^k, b₃ = 1-β₃^k and s = √b₃/b₂:
    #   m̂/(√v̂ + ε₁) = s·u,  u = m/(√v + ε₁√b₃),  r = s·(u + (λ/s)·θ),  ‖r‖ = s·‖u + (λ/s)·θ‖
    # so the corrections cost no full pass of their own (s = 1 without bias correction).
    denom = torch._foreach_sqrt(exp_avg_sqs)
    if bias_correction:
        k = torch.stack(steps).to(denom[0].dtype)
        bias3_sqrt = (1.0 - torch.pow(beta3, k)).sqrt_()
        scale: Tensor | None = bias3_sqrt / (1.0 - torch.pow(beta2, k))
        torch._foreach_add_(denom, (bias3_sqrt * eps).unbind(0))
    else:
        scale = None
        torch._foreach_add_(denom, eps)
    updates = _divide_into(exp_avgs, denom, in_place=_on_cpu(denom))
    if weight_decay != 0:
        if scale is None:
            torch._foreach_add_(updates, params, alpha=weight_decay)
        else:
            torch._foreach_addcmul_(updates, params, (weight_decay / scale).unbind(0))
    if layer_adaptation:
        w_norm, r_norm = _norms(params, updates, shards)  # whole-parameter norms
        if scale is not None:
            r_norm = r_norm.mul_(scale)
        ratio = _trust_ratio(w_norm, r_norm, trust_eps, norm_eps, trust_clip, zero_norm_trust)
        write.add_(updates, _scale(ratio if scale is None else ratio.mul_(scale), lr).unbind(0))
    elif scale is not None:
        write.add_(updates, _scale(scale, lr).unbind(0))
    else:
        write.add_(updates, -lr)


def _lamb_single(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *more: list[Tensor],
    write: _Writer,
    lr: float | Tensor,
    beta2: float,
    beta3: float,
    eps: float,
    trust_eps: float,
    norm_eps: float,
    weight_decay: float,
    bias_correction: bool,
    layer_adaptation: bool,
    trust_clip: tuple[float, float] | None,
    zero_norm_trust: str,
    alpha: float,
    beta: float,
    shards: _Shards | None = None,
) -> None:
    buffers, steps = more if len(more) == 2 else (None, more[0])
    for i, (p, g, m, v, step) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps)):
        if buffers is not None:
            # The adaptor's own replacement (one tensor), near-bound precision branch included.
            replace_foreach_([g], [buffers[i]], alpha, beta)
        step.add_(1)
        m.lerp_(g, 1.0 - beta2)
        v.mul_(beta3).addcmul_(g, g, value=1.0 - beta3)
        denom = v.sqrt()
        if bias_correction:
            k = step.to(denom.dtype)
            denom.div_((1.0 - torch.pow(beta3, k)).sqrt_()).add_(eps)
            denom.mul_(1.0 - torch.pow(beta2, k))
        else:
            denom.add_(eps)
        update = torch.div(m, denom)
        if weight_decay != 0:
            update.add_(p, alpha=weight_decay)
        if layer_adaptation:
            if shards is None:
                w_norm, r_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
            else:  # a shard: the whole parameter's norms (one all-reduce of 2 scalars)
                w_norm, r_norm = (x[0] for x in shards.pick([i]).norms([p], [update]))
            ratio = _trust_ratio(
                w_norm, r_norm, trust_eps, norm_eps, trust_clip, zero_norm_trust,
            )
            write.add_one_(i, update, _scale(ratio, lr))
        else:
            write.add_one_(i, update, -lr)


# The compiled path: pass 1 updates the moments (and the replacement), reduces ‖r‖² and ‖θ‖²
# and turns them into the step's coefficient -η·ratio (a 0-d epilogue); pass 2 recomputes r
# from the new moments and applies the step. Each reads and writes every tensor once, where
# the foreach chain needs some fifteen passes. Arithmetic is in float32 at least (bf16/fp16
# parameters are rounded once, on the write), and ``comp`` (Kahan compensation, or None)
# keeps the rounding error of the write.
#
# As in adaptor.fastpath, each call takes a group of tensors (LAMB_GROUPS: eight, four or
# one; dynamo's per-call cost is paid per call), one loop (pass 1: one loop and its
# reductions) per tensor; the numbers come in packed in one tensor on CPU (pack_scalars;
# inductor's C++ kernels would convert a Python float inside the loop, per element), derived
# outside in double, and the bias corrections as one 0-d tensor per tensor (from the step
# counters, on their device, once per bucket); a term or mask that is off (no skip flag,
# λ = 0, no bias correction, no clip) is left out of the compiled variant instead of being
# computed with neutral values.


def _cdtype(p: Tensor, m: Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(p.dtype, m.dtype), torch.float32)


def _write(target: Tensor, new: Tensor, skip: Tensor | None) -> None:
    """``target ← new``, or ``where(skip == 0, new, target)``: a skipped step keeps the bits
    (the old value is exact in the compute dtype)."""
    target.copy_(new if skip is None else torch.where(skip == 0, new, target))


def _direction(p, m, v, scale, eps, decay):
    # r = m̂/(√v̂ + ε₁) + λθ written as s·m/(√v + ε₁√b₃) + λθ with b₂ = 1-β₂^k, b₃ = 1-β₃^k
    # and s = √b₃/b₂ (``scale``, None without bias correction; ``eps`` is then ε₁): one
    # division and one square root per element instead of three divisions.
    r = (m if scale is None else m * scale) / (torch.sqrt(v) + eps)
    return r if decay is None else r + decay * p


_NAMES = ("k1", "alpha", "persist", "inject", "lerp_weight", "beta3", "one_minus_beta3", "eps",
          "decay", "neg_lr", "trust_eps", "norm_eps", "low", "high")


def _moments(ps, gs, cs, ms, vs, skip, scales, epsilons, lr, values, *, layout, low_weight: bool,
             paper_trust: bool):  # fmt: skip
    """Pass 1 over a group of tensors; returns each one's step coefficient ``-η·ratio``.

    ``cs`` (ALTO's buffers, None for Lamb): ``g̃ = k₁·g + α·c`` stays in registers (``p.grad``
    keeps the raw gradient) and ``c ← persist·c + inject·g̃``. ``m ← lerp(m, g̃, 1-β₂)`` is
    written out as ATen computes it (for a weight w < 0.5: ``m + w·(g̃ - m)``, else
    ``g̃ - (g̃ - m)·β₂``; ``lerp_weight`` is w or β₂): inductor's lerp specialises on the
    weight, a recompile for every new β₂. ``scales``/``epsilons``: per tensor ``s`` and
    ``ε₁√b₃`` (None without bias correction: ``eps`` is then ε₁); ``lr`` a tensor lr, or
    None (``neg_lr`` is in ``values``).
    """
    (k1, alpha, persist, inject, lerp_weight, beta3, one_minus_beta3, eps, decay, neg_lr,
     trust_eps, norm_eps, low, high) = (
        scalar(values, layout, name) for name in _NAMES
    )  # fmt: skip
    if lr is not None:
        neg_lr = -lr
    coefficients = []
    for i in range(len(ps)):
        p, m, v = ps[i], ms[i], vs[i]
        dtype = _cdtype(p, m)
        p32, g32, m32, v32 = p.to(dtype), gs[i].to(dtype), m.to(dtype), v.to(dtype)
        if cs is not None:
            c = cs[i]
            c32 = c.to(dtype)
            g32 = g32 * k1 + c32 * alpha
            _write(c, c32 * persist + g32 * inject, skip)
        m_new = (
            m32 + lerp_weight * (g32 - m32) if low_weight else g32 - (g32 - m32) * lerp_weight
        )
        v_new = v32 * beta3 + (g32 * g32) * one_minus_beta3
        scale, eps_i = (None, eps) if scales is None else (scales[i], epsilons[i])
        r = _direction(p32, m_new, v_new, scale, eps_i, decay)
        _write(m, m_new, skip)
        _write(v, v_new, skip)
        r_sq, w_sq = (r * r).sum(), (p32 * p32).sum()
        phi = torch.sqrt(w_sq) + norm_eps
        ratio = phi / (torch.sqrt(r_sq) + trust_eps * phi)
        if not paper_trust:
            ratio = torch.where((w_sq > 0) & (r_sq > 0), ratio, 1.0)
        if low is not None:
            ratio = torch.clamp(ratio, low, high)
        coefficients.append(neg_lr * ratio)
    return coefficients


def _apply(ps, ms, vs, skip, comps, coefficients, scales, epsilons, values, *, layout):
    """Pass 2: ``θ ← θ + coefficient·r`` for each tensor of the group (Kahan-compensated
    with ``comps``)."""
    eps, decay = scalar(values, layout, "eps"), scalar(values, layout, "decay")
    for i in range(len(ps)):
        p, m = ps[i], ms[i]
        dtype = _cdtype(p, m)
        p32 = p.to(dtype)
        scale, eps_i = (None, eps) if scales is None else (scales[i], epsilons[i])
        delta = coefficients[i] * _direction(p32, m.to(dtype), vs[i].to(dtype), scale, eps_i,
                                             decay)
        if comps is None:
            _write(p, (p32 + delta).to(p.dtype), skip)
            continue
        y = delta + comps[i].to(dtype)
        new = (p32 + y).to(p.dtype)
        _write(comps[i], (y - (new.to(dtype) - p32)).to(comps[i].dtype), skip)
        _write(p, new, skip)


_FUNCTIONS = {"moments": _moments, "apply": _apply}
_compiled: dict[tuple[Any, ...], Callable[..., Any]] = {}


def _kernel(name: str, variant: tuple[Any, ...], device: torch.device) -> Callable[..., Any]:
    """The compiled pass ``name`` for one ``variant`` (which arguments are None, the flags).

    Each variant compiles from its own copy of the function's code object
    (:func:`adaptor.replacement.compile_variant`): it only recompiles for a new dtype.
    """
    cpu = device.type == "cpu"
    key = (name, variant, cpu)
    kernel = _compiled.get(key)
    if kernel is None:
        function = _FUNCTIONS[name]
        # emulate_precision_casts: round bf16/fp16 casts inside the kernel (Kahan needs the
        # rounded value; inductor otherwise keeps the float32 intermediate).
        options: dict[str, Any] = {"emulate_precision_casts": True}
        if cpu:
            # Keep every value used twice (the new m and v: written, and read by ‖r‖²) in
            # a buffer: by default inductor recomputes Lamb's cheap m and v inside the
            # reduction and writes them in a second loop over g, m and v (1.5× the time).
            options["realize_reads_threshold"] = 1
        kernel = _compiled[key] = compile_variant(function, str(len(_compiled)), options)
    return kernel


def _bias_scalars(
    steps: list[Tensor], beta2: float, beta3: float, eps: float, dtype: torch.dtype
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Per tensor ``s = √b₃/b₂`` and ``ε₁√b₃`` (b = 1-β^k from the advanced counters ``k``):
    0-d tensors of ``dtype`` on the counters' device, formed in float64 for the whole bucket
    at once (a few small ops, no host read) and rounded once."""
    k = torch.stack(steps).to(torch.float64)
    bias2 = torch.pow(beta2, k).neg_().add_(1.0)
    bias3_sqrt = torch.pow(beta3, k).neg_().add_(1.0).sqrt_()
    scale = (bias3_sqrt / bias2).to(dtype)
    return scale.unbind(0), bias3_sqrt.mul_(eps).to(dtype).unbind(0)


# Tensors per compiled call of Lamb/ALTO's passes: groups of twice FUSED_GROUP, then of
# FUSED_GROUP, then single ones (at most three graphs per variant), so that the small
# tensors riding along (biases, norms' weights) add loops to the large ones' calls instead
# of calls (dynamo's cost is per call, ~0.1-0.3 ms on CPU).
LAMB_GROUPS = (2 * FUSED_GROUP, FUSED_GROUP)


def _members(bucket: _Bucket, i: int) -> list[Tensor]:
    """Tensor ``i``'s arrays: parameter, gradient, m, v[, buffer][, compensation]."""
    return [bucket.params[i], bucket.grads[i], *(state[i] for state in bucket.states)] + (
        [] if bucket.comps is None else [bucket.comps[i]]
    )


def _lamb_fused(
    bucket: _Bucket, skip: Tensor | None, *, fallback: Callable[..., None], **hp: Any
) -> None:
    """A bucket with a large tensor through the two compiled passes (but for its small
    tensors that cannot be flattened or have fewer than 2 elements: ``fallback``); a bucket
    without one, all through ``fallback``."""
    explores = len(bucket.states) == 3
    is_large = [p.numel() >= FUSED_MIN_NUMEL for p in bucket.params]
    k1 = alpha = persist = inject = None
    if explores:
        alpha = hp["alpha"]
        k1, persist, inject = replacement_coefficients(alpha, hp["beta"])
    # Near the α bound the fused replacement's division by k₁ loses digits (see
    # adaptor.replacement.WELL_CONDITIONED_K1): the foreach form then does everything.
    if not hp["layer_adaptation"] or not any(is_large) or (explores and k1 < WELL_CONDITIONED_K1):
        _run_bucket(fallback, bucket, skip, grad_out=explores, **hp)
        return
    # Small tensors ride along in the large ones' compiled calls, flattened (a loop each in
    # a call that is paid anyway: on the 16M-parameter MLP with 2 threads this saves ~0.6 ms
    # of an ~18 ms step against the four biases' own foreach step).
    # Small ones that cannot be flattened (a non-contiguous member) take the foreach path,
    # and so do those of fewer than 2 elements: dynamo specialises sizes 0 and 1 (a
    # recompile per pattern).
    members = [_members(bucket, i) for i in range(len(bucket.params))]
    flat_ok = [
        all(t.is_contiguous() for t in tensors) and tensors[0].numel() > 1 for tensors in members
    ]
    small = [i for i, ok in enumerate(flat_ok) if not (ok or is_large[i])]
    if small:
        _run_bucket(fallback, bucket.pick(small), skip, grad_out=explores, **hp)
        taken = [i for i, ok in enumerate(flat_ok) if ok or is_large[i]]
        bucket = bucket.pick(taken)
        members, flat_ok, is_large = (
            [xs[i] for i in taken] for xs in (members, flat_ok, is_large)
        )
    dtype = _cdtype(bucket.params[0], bucket.states[0][0])
    # Counters outside the graph; a skipped step adds 0 (bit-identical counter).
    if skip is None:
        torch._foreach_add_(bucket.steps, 1)
    else:
        torch._foreach_add_(bucket.steps, [1.0 - skip] * len(bucket.steps))
    beta2, beta3, lr, corrected = hp["beta2"], hp["beta3"], hp["lr"], hp["bias_correction"]
    low_weight = 1.0 - beta2 < 0.5
    clip = hp["trust_clip"]
    # Python floats derived here in double, then rounded once by pack_scalars; None: the
    # term is left out of the kernel (λ = 0, no clip, ...) or comes as a tensor below.
    named = {
        "k1": k1, "alpha": alpha, "persist": persist, "inject": inject,
        "lerp_weight": 1.0 - beta2 if low_weight else beta2, "beta3": beta3,
        "one_minus_beta3": 1.0 - beta3, "eps": None if corrected else hp["eps"],
        "decay": hp["weight_decay"] or None,
        "neg_lr": None if isinstance(lr, Tensor) else -lr, "trust_eps": hp["trust_eps"],
        "norm_eps": hp["norm_eps"], "low": None if clip is None else float(clip[0]),
        "high": None if clip is None else float(clip[1]),
    }  # fmt: skip
    values, layout = pack_scalars(bucket.device, dtype, named)
    tensor_lr = lr if isinstance(lr, Tensor) else None
    if corrected:
        scales, epsilons = _bias_scalars(bucket.steps, beta2, hp["beta3"], hp["eps"], dtype)
    flags = {"low_weight": low_weight, "paper_trust": hp["zero_norm_trust"] == "paper"}
    shape = (explores, skip is None, layout, tensor_lr is None)
    # Flattened, a group's graph depends only on how many tensors it has (not on their
    # ranks: a conv net's mix of 4-d and 2-d weights would be a graph per pattern); groups
    # of LAMB_GROUPS, large tensors first. A large tensor with a non-contiguous member goes
    # alone, as it is.
    order = sorted((i for i, ok in enumerate(flat_ok) if ok), key=lambda i: not is_large[i])
    calls = [(chunk, True) for chunk in chunks(order, LAMB_GROUPS)]
    calls += [([i], False) for i, ok in enumerate(flat_ok) if not ok]
    for chunk, flattened in calls:
        moments = _kernel("moments", (*shape, *flags.values(), len(chunk)), bucket.device)
        apply = _kernel("apply", (*shape, bucket.comps is None, len(chunk)), bucket.device)
        columns = [[flat(t) if flattened else t for t in members[i]] for i in chunk]
        ps, gs, ms, vs = ([tensors[k] for tensors in columns] for k in range(4))
        cs = [tensors[4] for tensors in columns] if explores else None
        comps = None if bucket.comps is None else [tensors[-1] for tensors in columns]
        group_scales = [scales[i] for i in chunk] if corrected else None
        group_epsilons = [epsilons[i] for i in chunk] if corrected else None
        coefficients = moments(
            ps, gs, cs, ms, vs, skip, group_scales, group_epsilons, tensor_lr, values,
            layout=layout, **flags,
        )  # fmt: skip
        apply(ps, ms, vs, skip, comps, coefficients, group_scales, group_epsilons, values,
              layout=layout)


class Lamb(_FirstOrder):
    r"""Lamb as in the paper's Algorithm 2 without the replacement (layer-wise adaptive Adam).

    Per parameter tensor θ with gradient g, at step k (β₂, β₃ = ``betas``, λ = ``weight_decay``,
    ε₁ = ``eps``, ε₂ = ``trust_eps``, ε₃ = ``norm_eps``):

    .. math::
        m_k = β_2 m_{k-1} + (1-β_2) g,\qquad v_k = β_3 v_{k-1} + (1-β_3) g^2 \\
        \hat m_k = m_k/(1-β_2^k),\qquad \hat v_k = v_k/(1-β_3^k) \\
        r_k = \hat m_k/(\sqrt{\hat v_k} + ε_1) + λθ_k \\
        θ_{k+1} = θ_k - η\,\frac{φ(‖θ_k‖)}{‖r_k‖ + ε_2 φ(‖θ_k‖)}\, r_k,\qquad φ(x) = x + ε_3

    ``bias_correction=False`` drops the two divisions (the paper's "Vanilla" form, the one
    its theorems cover). Where ‖θ‖ = 0 or ‖r‖ = 0 the trust ratio is 1 by default
    (``zero_norm_trust="one"``, as LAMB's reference code, timm and pytorch-optimizer: a
    zero-initialised bias moves at the first step); ``zero_norm_trust="paper"`` keeps the
    formula's literal value there, φ(0)/‖r‖ ≈ ε₃/‖r‖, which freezes zero tensors. A group
    with ``layer_adaptation=False`` uses ratio 1 everywhere (see :func:`param_groups_for`).
    ``trust_clip=(low, high)`` clamps the ratio (the LAMB paper's clipping; the ALTO paper
    has none).

    Args:
        params: parameters or param-group dicts.
        lr: η (a float, or a 0-d tensor).
        betas: (β₂, β₃), the moment decay rates, each in [0, 1).
        eps: ε₁, added to √v̂ (outside the square root).
        weight_decay: λ ≥ 0, decoupled: added to ``r`` so the trust ratio scales it too.
        trust_eps: ε₂ > 0 in the trust ratio's denominator.
        norm_eps: ε₃ > 0 in φ.
        bias_correction: divide by (1-β^k) (default) or not (the "Vanilla" form).
        layer_adaptation: apply the trust ratio (default) or use ratio 1.
        trust_clip: ``None`` (default) or ``(low, high)`` with ``0 <= low <= high``.
        zero_norm_trust: ``"one"`` (default): ratio 1 where ‖θ‖ = 0 or ‖r‖ = 0 (decided on
            the device with ``torch.where``); ``"paper"``: the formula everywhere.
        state_dtype: dtype of ``exp_avg``/``exp_avg_sq`` (and ALTO's buffer); ``None``:
            float32 for bf16/fp16 parameters, the parameter's dtype otherwise.
        kahan: Kahan-compensated parameter writes for bf16/fp16 parameters (see above).
        skip_nonfinite: skip (bit-identically) a step whose gradients hold NaN/Inf.
        max_grad_norm: ``None`` (default, as in the paper's algorithm) or a positive float:
            first clip the gradients in place to this 2-norm, measured over all gradients
            of the optimizer (``clip_grad_norm_`` over the whole model; the reference code
            always clips at 1.0). A group key like the others (kept by ``deepcopy``,
            ``pickle`` and ``state_dict``); a group with ``None`` is left unclipped.
        foreach: multi-tensor implementation (``None``/``True``, default) or a Python loop
            over tensors (``False``).
        fused: two compiled passes (``torch.compile``; the first step compiles) for the
            tensors of every device/dtype bucket holding one of at least 65536 elements
            (the small contiguous ones ride along), up to eight per compiled call; ALTO
            then leaves the raw gradient in ``p.grad`` of those tensors.
            ``None`` (default): on CUDA only.

    State per parameter: ``step`` (0-d tensor on the parameter's device), ``exp_avg`` (m),
    ``exp_avg_sq`` (v); ``kahan_comp`` and ``nonfinite_skips`` when those options are on.
    """

    _owner = "Lamb"
    _state_keys = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        trust_eps: float = 1e-6,
        norm_eps: float = 1e-10,
        bias_correction: bool = True,
        layer_adaptation: bool = True,
        trust_clip: tuple[float, float] | None = None,
        zero_norm_trust: str = "one",
        max_grad_norm: float | None = None,
        state_dtype: torch.dtype | None = None,
        kahan: bool = False,
        skip_nonfinite: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
            weight_decay=weight_decay, trust_eps=trust_eps, norm_eps=norm_eps,
            bias_correction=bias_correction, layer_adaptation=layer_adaptation,
            trust_clip=trust_clip, zero_norm_trust=zero_norm_trust, max_grad_norm=max_grad_norm,
            state_dtype=state_dtype, kahan=kahan, skip_nonfinite=skip_nonfinite,
            foreach=foreach, fused=fused, **self._more_defaults(),
        )
        self._validate(defaults)
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        owner = self._owner
        check_lr(owner, group["lr"])
        check_betas(owner, group["betas"], 2, names=("β₂", "β₃"))
        check_nonneg(owner, "eps", group["eps"])
        check_nonneg(owner, "weight_decay", group["weight_decay"])
        check_positive(owner, "trust_eps", group["trust_eps"])
        check_positive(owner, "norm_eps", group["norm_eps"])
        check_flag(owner, "bias_correction", group["bias_correction"])
        check_flag(owner, "layer_adaptation", group["layer_adaptation"])
        check_pair(owner, "trust_clip", group["trust_clip"])
        check_choice(owner, "zero_norm_trust", group["zero_norm_trust"], ("one", "paper"))
        check_optional_positive(owner, "max_grad_norm", group["max_grad_norm"])
        self._validate_precision(group)
        check_flag(owner, "foreach", group["foreach"], allow_none=True)
        check_flag(owner, "fused", group["fused"], allow_none=True)

    def _more_defaults(self) -> dict[str, Any]:
        return {}

    def _explore_hparams(self) -> list[tuple[float, float] | None]:
        return [None for _ in self.param_groups]

    def _clip_grads(self) -> None:
        """Scale each group's gradients by ``min(1, max_grad_norm/(‖g‖ + 1e-6))``.

        ``‖g‖`` is the 2-norm of all gradients of the optimizer (every group), so with one
        ``max_grad_norm`` for all groups this is ``clip_grad_norm_`` over the whole model
        (the reference code's clipping); a group with ``max_grad_norm=None`` is not scaled.
        """
        clipped = [g for g in self.param_groups if g["max_grad_norm"] is not None]
        if not clipped:
            return
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return
        total = torch.nn.utils.get_total_norm(grads)
        for group in clipped:
            mine = [p for p in group["params"] if p.grad is not None]  # params, not grads
            if mine:
                torch.nn.utils.clip_grads_with_norm_(mine, group["max_grad_norm"], total)

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Any:  # type: ignore[override]
        """One Lamb step; ``closure`` (optional) is run under ``torch.enable_grad()``."""
        loss = self._run_closure(closure)
        self._check_grads()
        explore = self._explore_hparams()  # validated before anything is modified
        skip = self._prepare()  # unscales for GradScaler first: clipping sees true norms
        self._clip_grads()
        for group, alpha_beta in zip(self.param_groups, explore):
            alpha, beta = alpha_beta if alpha_beta is not None else (0.0, 0.0)
            beta2, beta3 = group["betas"]
            hp = dict(
                lr=group["lr"], beta2=beta2, beta3=beta3, eps=group["eps"],
                trust_eps=group["trust_eps"], norm_eps=group["norm_eps"],
                weight_decay=group["weight_decay"], bias_correction=group["bias_correction"],
                layer_adaptation=group["layer_adaptation"], trust_clip=group["trust_clip"],
                zero_norm_trust=group["zero_norm_trust"], alpha=alpha, beta=beta,
            )
            fallback = _lamb_single if group["foreach"] is False else _lamb_foreach
            for bucket in self._gather(group):
                fused = group["fused"] if group["fused"] is not None else (
                    bucket.device.type == "cuda"
                )
                # Sharded buckets (FSDP2) take the foreach/single-tensor path: the compiled
                # passes would need the norms' all-reduce between them.
                if fused and bucket.shards is None and fused_supported(bucket.device):
                    _lamb_fused(bucket, skip, fallback=fallback, **hp)
                else:
                    _run_bucket(
                        fallback, bucket, skip, grad_out=self.explores, shards=bucket.shards,
                        **hp,
                    )
        self._count_skips(skip)
        return loss


class ALTO(Lamb):
    r"""ALTO, the paper's adapted Lamb (Algorithm 2): Lamb fed ``g̃ = g + α·a``.

    .. math::
        a_k = β_1 a_{k-1} + (1-β_1)(g_k - g_{k-1}),\qquad \tilde g_k = g_k + α a_k,
        \qquad a_0 = g_0 = 0

    then exactly :class:`Lamb` on ``g̃`` (``m`` and ``v`` of ``g̃`` with rates β₂, β₃, bias
    correction, the trust ratio). The paper's notation and this class's arguments:

    ============  ======================  ===========================================
    paper         argument                group key
    ============  ======================  ===========================================
    α             ``alpha`` (-5)          ``explore_alpha`` (the adaptor's key)
    β₁            ``beta`` (0.99)         ``explore_beta`` (the adaptor's key)
    β₂, β₃        ``betas`` (0.9, 0.99)   ``betas``, exactly as in :class:`Lamb`
    ε₁, ε₂, ε₃    ``eps``, ``trust_eps``, ``norm_eps``
    ============  ======================  ===========================================

    so ``ALTO(params, lr, betas, alpha=α, beta=β, ...)`` has the same param groups as
    ``E(Lamb(params, lr, betas, ...), alpha=α, beta=β)`` and follows the same trajectory;
    schedulers that cycle ``betas[0]`` (``OneCycleLR``, ``CyclicLR``) change β₂ as they
    change Adam's β₁, never the adaptor's β. ``alpha=0`` is :class:`Lamb`.

    The replacement is the adaptor's one-buffer form (:mod:`adaptor.replacement`), so the
    state per parameter is ``step`` and three parameter-sized buffers: ``exp_avg`` (m),
    ``exp_avg_sq`` (v) and ``explore_buffer`` (c). After ``step()``, ``p.grad`` holds ``g̃``
    (the replacement is in place, as in the adaptor), except for the tensors the compiled
    path takes (``fused=True``: the tensors of a device/dtype bucket holding one of at least
    65536 elements, but for small non-contiguous ones and those of one element): there
    ``g̃`` is never written out and ``p.grad`` keeps the raw gradient. ``ALTO.explores`` is
    ``True``: the adaptor refuses to wrap an optimizer that already explores.

    Defaults are the paper's for batches ≥ 1K: ``alpha=-5``, ``beta=0.99``,
    ``betas=(0.9, 0.99)``, ``weight_decay=1e-4``, ε₁ = ε₂ = 1e-6, ε₃ = 1e-10, no gradient
    clipping (``max_grad_norm=1.0`` reproduces the reference code's clipping, which happens
    before the replacement, so ``a`` is built from clipped gradients; ``E(Lamb(...,
    max_grad_norm=1.0))`` clips ``g̃`` instead). For batches < 1K the paper uses
    ``alpha=0.5``, ``beta=0.01``. Changing β mid-run applies to the buffer formed under the
    old β, as in the adaptor.

    Unlike the reference package's ``ALTO``: the trust ratio has ε₂ and ε₃ (1 where
    ‖θ‖ = 0 or ‖r‖ = 0, as there, by default), it is applied to every group (the reference
    applies it only where weight decay ≠ 0; use :func:`param_groups_for` with
    ``exclude_from_layer_adaptation=True`` for that), no clipping unless asked, no host
    reads, and 3 buffers instead of 6.

    Args:
        betas: (β₂, β₃), Lamb's moment rates, each in [0, 1). The three-number layout of
            earlier versions, ``betas=(β, β₂, β₃)``, is refused with a message: write
            ``betas=(β₂, β₃), beta=β``.
        alpha: α, with ``|α| < 1/(1-β)``; negative explores, positive exploits.
        beta: β (the paper's β₁), the persistence of the gradient-difference EMA, in [0, 1).
            Each group may have its own ``explore_alpha``/``explore_beta``; both are checked
            at every step before anything is modified.

    The other arguments are :class:`Lamb`'s.
    """

    _owner = "ALTO"
    _state_keys = ("exp_avg", "exp_avg_sq", BUFFER_KEY)
    _optional_state_keys = (BUFFER_KEY,)  # a Lamb state dict loads: the buffer starts at 0
    explores = True

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.99),
        alpha: float = -5.0,
        beta: float = 0.99,
        eps: float = 1e-6,
        weight_decay: float = 1e-4,
        *,
        trust_eps: float = 1e-6,
        norm_eps: float = 1e-10,
        bias_correction: bool = True,
        layer_adaptation: bool = True,
        trust_clip: tuple[float, float] | None = None,
        zero_norm_trust: str = "one",
        max_grad_norm: float | None = None,
        state_dtype: torch.dtype | None = None,
        kahan: bool = False,
        skip_nonfinite: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        check_alpha_beta(alpha, beta, where="ALTO: alpha and beta")
        self._alpha_beta = (float(alpha), float(beta))
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
            trust_eps=trust_eps, norm_eps=norm_eps, bias_correction=bias_correction,
            layer_adaptation=layer_adaptation, trust_clip=trust_clip,
            zero_norm_trust=zero_norm_trust, max_grad_norm=max_grad_norm,
            state_dtype=state_dtype, kahan=kahan, skip_nonfinite=skip_nonfinite,
            foreach=foreach, fused=fused,
        )
        del self._alpha_beta  # only defaults and param groups travel (deepcopy, pickle)

    def _upgrade_group(self, group: dict[str, Any]) -> None:
        # Earlier ALTO saved betas=(β, β₂, β₃) and "alpha"; today's keys are the adaptor's.
        betas = group.get("betas")
        if isinstance(betas, (tuple, list)) and len(betas) == 3:
            group.setdefault(BETA_KEY, float(betas[0]))
            group["betas"] = tuple(betas[1:])
        if "alpha" in group:
            group.setdefault(ALPHA_KEY, group.pop("alpha"))

    def _more_defaults(self) -> dict[str, Any]:
        alpha, beta = self._alpha_beta
        return {ALPHA_KEY: alpha, BETA_KEY: beta}

    def _validate(self, group: dict[str, Any]) -> None:
        betas = group["betas"]
        if isinstance(betas, (tuple, list)) and len(betas) == 3:
            raise ValueError(
                f"ALTO: betas={tuple(betas)!r} has the old layout (β, β₂, β₃); betas is now "
                f"Lamb's (β₂, β₃) and the adaptor's β is its own argument: write "
                f"ALTO(..., betas=({betas[1]}, {betas[2]}), beta={betas[0]})"
            )
        super()._validate(group)
        check_alpha_beta(group[ALPHA_KEY], group[BETA_KEY], where="ALTO")

    def _explore_hparams(self) -> list[tuple[float, float] | None]:
        return [
            check_alpha_beta(g[ALPHA_KEY], g[BETA_KEY], where=f"ALTO param group {i}")
            for i, g in enumerate(self.param_groups)
        ]


# -- AdaBelief -------------------------------------------------------------------------------


def _adabelief_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_vars: list[Tensor],
    steps: list[Tensor],
    *,
    write: _Writer,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
) -> None:
    decay = weight_decay != 0 and decoupled
    if weight_decay != 0 and not decoupled:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_add_(steps, 1)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    residual = torch._foreach_sub(grads, exp_avgs)
    torch._foreach_mul_(exp_avg_vars, beta2)
    torch._foreach_addcmul_(exp_avg_vars, residual, residual, value=1.0 - beta2)
    torch._foreach_add_(exp_avg_vars, eps)
    del residual
    k = torch.stack(steps).to(exp_avgs[0].dtype)
    bias2_sqrt = (1.0 - torch.pow(beta2, k)).sqrt_()
    # θ ← θ − η·m̂/(√ŝ + ε) = θ + (−η·√b₂/b₁)·m/(√s + ε√b₂),  b₁ = 1-β₁^k, b₂ = 1-β₂^k
    step_size = _scale(bias2_sqrt / (1.0 - torch.pow(beta1, k)), lr)
    denom = torch._foreach_sqrt(exp_avg_vars)
    torch._foreach_add_(denom, (bias2_sqrt * eps).unbind(0))
    updates = _divide_into(exp_avgs, denom, in_place=_on_cpu(denom))
    if decay and write.direct:
        # float32/float64: θ ← (1-ηλ)θ, then the update (as torch's AdamW)
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)  # type: ignore[arg-type]
        write.add_(updates, step_size.unbind(0))
        return
    if decay:
        # bf16/fp16: both terms in float32, one rounding: θ ← round(θ + s·u − ηλθ)
        torch._foreach_mul_(updates, step_size.unbind(0))
        _axpy_(updates, params, -lr * weight_decay)
        write.add_(updates, 1.0)
        return
    write.add_(updates, step_size.unbind(0))


def _adabelief_single(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_vars: list[Tensor],
    steps: list[Tensor],
    *,
    write: _Writer,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
) -> None:
    for i, (p, g, m, s, step) in enumerate(zip(params, grads, exp_avgs, exp_avg_vars, steps)):
        if weight_decay != 0 and not decoupled:
            g = g.add(p, alpha=weight_decay)
        step.add_(1)
        m.lerp_(g, 1.0 - beta1)
        residual = g - m
        s.mul_(beta2).addcmul_(residual, residual, value=1.0 - beta2).add_(eps)
        k = step.to(m.dtype)
        step_size = (-lr) / (1.0 - torch.pow(beta1, k))
        denom = s.sqrt().div_((1.0 - torch.pow(beta2, k)).sqrt_()).add_(eps)
        update = torch.div(m, denom).mul_(step_size)
        if weight_decay != 0 and decoupled:
            if write.direct:
                p.mul_(1.0 - lr * weight_decay)
            else:
                update.add_(p * (-lr * weight_decay))
        write.add_one_(i, update, 1.0)


class AdaBelief(_FirstOrder):
    r"""AdaBelief (Zhuang et al., 2020): Adam whose second moment tracks the "belief" (g − m)².

    .. math::
        m_k = β_1 m_{k-1} + (1-β_1) g,\qquad s_k = β_2 s_{k-1} + (1-β_2)(g - m_k)^2 + ε \\
        θ_{k+1} = θ_k - η\,\frac{m_k/(1-β_1^k)}{\sqrt{s_k/(1-β_2^k)} + ε}

    Weight decay λ is decoupled by default (``θ ← (1-ηλ)θ`` before the update, as AdamW and
    the official AdaBelief ≥ 0.1); ``decoupled_weight_decay=False`` adds λθ to g instead
    (without touching ``p.grad``). No rectification and no AMSGrad variant.

    Args:
        params: parameters or param-group dicts.
        lr: η (a float, or a 0-d tensor).
        betas: (β₁, β₂), each in [0, 1).
        eps: ε ≥ 0, added inside s at every step and to √ŝ (default 1e-16 as in the
            official implementation).
        weight_decay: λ ≥ 0.
        decoupled_weight_decay: see above.
        state_dtype, kahan, skip_nonfinite: as in :class:`Lamb` (the decoupled decay and the
            update are one write: ``θ ← round(θ − ηλθ − η·m̂/(√ŝ + ε))``).
        foreach: multi-tensor implementation (``None``/``True``, default) or a loop (``False``).

    State per parameter: ``step`` (0-d tensor on the parameter's device), ``exp_avg`` (m),
    ``exp_avg_var`` (s); ``kahan_comp`` and ``nonfinite_skips`` when those options are on.
    """

    _owner = "AdaBelief"
    _state_keys = ("exp_avg", "exp_avg_var")

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-16,
        weight_decay: float = 0.0,
        *,
        decoupled_weight_decay: bool = True,
        state_dtype: torch.dtype | None = None,
        kahan: bool = False,
        skip_nonfinite: bool = False,
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
            weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
            state_dtype=state_dtype, kahan=kahan, skip_nonfinite=skip_nonfinite,
            foreach=foreach,
        )
        self._validate(defaults)
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        owner = self._owner
        check_lr(owner, group["lr"])
        check_betas(owner, group["betas"], 2)
        check_nonneg(owner, "eps", group["eps"])
        check_nonneg(owner, "weight_decay", group["weight_decay"])
        check_flag(owner, "decoupled_weight_decay", group["decoupled_weight_decay"])
        self._validate_precision(group)
        check_flag(owner, "foreach", group["foreach"], allow_none=True)

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Any:  # type: ignore[override]
        """One AdaBelief step; ``closure`` (optional) is run under ``torch.enable_grad()``."""
        loss = self._run_closure(closure)
        self._check_grads()
        skip = self._prepare()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            hp = dict(
                lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"],
                decoupled=group["decoupled_weight_decay"],
            )
            update = _adabelief_single if group["foreach"] is False else _adabelief_foreach
            for bucket in self._gather(group):
                _run_bucket(update, bucket, skip, **hp)
        self._count_skips(skip)
        return loss


# -- param groups ----------------------------------------------------------------------------

_NORM_TYPES: tuple[type[nn.Module], ...] = tuple(
    t
    for t in (
        nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm
        nn.LayerNorm,
        nn.GroupNorm,
        getattr(nn, "RMSNorm", None),
        nn.LocalResponseNorm,
    )
    if t is not None
)


def param_groups_for(
    model: nn.Module,
    weight_decay: float = 1e-4,
    *,
    exclude_bias: bool = True,
    exclude_norm: bool = True,
    exclude_from_layer_adaptation: bool = False,
    exclude: Callable[[str, nn.Parameter], bool] | None = None,
) -> list[dict[str, Any]]:
    """The usual two param groups: weight decay for weights, none for biases and norms.

    Returns ``[{"params": decayed, "weight_decay": weight_decay},
    {"params": excluded, "weight_decay": 0.0}]`` (an empty group is left out), ready for any
    optimizer of this library or torch's. Excluded are parameters named ``bias`` (when
    ``exclude_bias``), every parameter of a normalisation layer (BatchNorm, InstanceNorm,
    LayerNorm, GroupNorm, RMSNorm; when ``exclude_norm``) and those for which
    ``exclude(name, param)`` is true. With ``exclude_from_layer_adaptation=True`` the
    excluded group also gets ``layer_adaptation=False`` (Lamb/ALTO then use trust ratio 1
    there, as the reference code does for groups without weight decay; with
    ``zero_norm_trust="paper"`` this also keeps zero-initialised biases from being frozen by
    φ(0)/‖r‖ ≈ 0); torch's optimizers ignore that key. This is the job of the reference
    package's ``create_ALTO_optimizer``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups_for: model must be an nn.Module, got {type(model).__name__}")
    check_nonneg("param_groups_for", "weight_decay", weight_decay)
    if exclude is not None and not callable(exclude):
        raise TypeError("param_groups_for: exclude must be a callable (name, param) -> bool")
    norm_params: set[int] = set()
    if exclude_norm:
        for module in model.modules():
            if isinstance(module, _NORM_TYPES):
                norm_params.update(id(p) for p in module.parameters(recurse=False))
    decayed: list[nn.Parameter] = []
    excluded: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        skip = (
            (exclude_bias and name.rsplit(".", 1)[-1] == "bias")
            or id(p) in norm_params
            or (exclude is not None and exclude(name, p))
        )
        (excluded if skip else decayed).append(p)
    groups: list[dict[str, Any]] = []
    if decayed:
        groups.append({"params": decayed, "weight_decay": float(weight_decay)})
    if excluded:
        group: dict[str, Any] = {"params": excluded, "weight_decay": 0.0}
        if exclude_from_layer_adaptation:
            group["layer_adaptation"] = False
        groups.append(group)
    if not groups:
        raise ValueError("param_groups_for: the model has no parameters")
    return groups
