r"""Matrix-based base update: Muon, orthogonalised momentum (Keller Jordan, 2024).

For a weight matrix ``W ∈ R^{r×c}`` (convolution weights are flattened to
``r = out_channels``, ``c = in_channels·kh·kw``) with gradient ``G``:

.. math::
    B_t = μ B_{t-1} + (1-μ) G_t, \qquad
    U_t = \begin{cases} (1-μ) G_t + μ B_t & \text{nesterov} \\ B_t & \text{otherwise} \end{cases}

    O_t = \mathrm{NS}_5(U_t), \qquad
    W_t = (1 - ηλ) W_{t-1} - η·s(r, c)·O_t

``NS_k`` is the quintic Newton–Schulz iteration ``X ← aX + (bA + cA²)X`` with ``A = XXᵀ``,
``(a, b, c) = (3.4445, −4.7750, 2.0315)``, started from ``X_0 = U/max(‖U‖_F, ε)`` (on
``Uᵀ`` when ``r > c``, so that the Gram matrix is the smaller one): it maps every singular
value of ``U`` to roughly ``[0.7, 1.2]`` and keeps the singular vectors, an approximate
``UVᵀ``. ``s(r, c) = √max(1, r/c)`` ("original") or ``0.2·√max(r, c)``
("match_rms_adamw", Moonshot's, which lets Muon reuse AdamW's lr and weight decay).

Parameters that are not matrices (biases, norms; embeddings and heads when the user says
so) take an internal AdamW step with its own learning rate, so one :class:`Muon` serves a
whole model and one ``state_dict`` covers both kinds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from adaptor import precision, shards
from backends import _owners
from backends._common import adam_bias_corrections, step_dtype
from backends._state import (
    KAHAN_KEY,
    Spec,
    count_skips_,
    fill_later_defaults,
    load_checked,
    name_dtypes,
)
from backends._state import as_dtype as _as
from backends._state import compute_dtype as _compute_dtype
from backends._state import write_params_ as _write_
from backends._validation import (
    check_betas,
    check_choice,
    check_finite,
    check_flag,
    check_float_dtype,
    check_int,
    check_nonneg,
    check_positive,
    check_precision,
    check_tuple,
    check_unit,
)

__all__ = ["DEFAULT_NS_COEFFICIENTS", "Muon", "lr_adjustment", "newton_schulz"]

DEFAULT_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
ADJUST_LR_FNS = ("original", "match_rms_adamw")
# Group settings that hold a torch.dtype: saved by name (see Muon.state_dict).
_DTYPE_KEYS = ("ns_dtype", "state_dtype")
# Same-shaped matrices are orthogonalised together, at most this many elements per batch
# (the stacked copy is a temporary: 2**26 elements are 128 MiB in bfloat16).
MAX_BATCH_NUMEL = 1 << 26
# Larger matrices are orthogonalised one at a time: one matmul of theirs already keeps the
# device busy, and stacking them would only add a copy.
MAX_BATCHED_MATRIX_NUMEL = 1 << 20


# -- Newton–Schulz ---------------------------------------------------------------------------


def _newton_schulz_owned_(
    x: Tensor, steps: int, coefficients: tuple[float, float, float], eps: float
) -> Tensor:
    """The iteration on ``x`` of shape ``(m, n)`` or ``(B, m, n)`` with ``m <= n``.

    ``x`` is a contiguous buffer owned by the caller and is overwritten; the result may be
    ``x`` or a buffer of the same shape.
    """
    a, b, c = coefficients
    norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
    x.div_(norm.clamp_(min=eps))
    batched = x.dim() == 3
    gram_shape = (*x.shape[:-1], x.shape[-2])
    gram = torch.empty(gram_shape, dtype=x.dtype, device=x.device)
    poly = torch.empty_like(gram)
    out = torch.empty_like(x)
    for _ in range(steps):
        if batched:
            torch.bmm(x, x.mT, out=gram)
            torch.baddbmm(gram, gram, gram, beta=b, alpha=c, out=poly)
            torch.baddbmm(x, poly, x, beta=a, out=out)
        else:
            torch.mm(x, x.mT, out=gram)
            torch.addmm(gram, gram, gram, beta=b, alpha=c, out=poly)
            torch.addmm(x, poly, x, beta=a, out=out)
        x, out = out, x
    return x


def newton_schulz(
    matrix: Tensor,
    *,
    steps: int = 5,
    coefficients: tuple[float, float, float] = DEFAULT_NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    r"""Approximate orthogonalisation ``≈ UVᵀ`` of a matrix or a batch ``(B, m, n)`` of them.

    .. math::
        X_0 = G/\max(‖G‖_F, ε),\quad A = X_k X_kᵀ,\quad X_{k+1} = a X_k + (b A + c A^2) X_k

    run on ``Gᵀ`` when ``G`` is tall, in ``dtype``. Returns a new tensor of ``dtype`` with
    the shape of ``matrix`` (the input is never modified). Each matrix of a batch is
    normalised by its own Frobenius norm.
    """
    if matrix.dim() not in (2, 3):
        raise ValueError(
            f"newton_schulz takes a matrix or a batch (B, m, n), got shape {tuple(matrix.shape)}"
        )
    transpose = matrix.shape[-2] > matrix.shape[-1]
    x = matrix.mT if transpose else matrix
    x = x.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
    x = _newton_schulz_owned_(x, steps, coefficients, eps)
    return x.mT if transpose else x


def lr_adjustment(rows: int, cols: int, adjust_lr_fn: str) -> float:
    """``√max(1, rows/cols)`` ("original") or ``0.2·√max(rows, cols)`` ("match_rms_adamw")."""
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))


# -- validation ------------------------------------------------------------------------------


def _check_group(group: dict[str, Any], where: str) -> None:
    """Every hyperparameter of a group, with a message naming it, its range and ``where``."""
    owner = f"Muon ({where})" if where else "Muon"
    check_nonneg(owner, "lr", group["lr"])
    check_unit(owner, "momentum", group["momentum"])
    check_nonneg(owner, "weight_decay", group["weight_decay"])
    check_positive(owner, "eps", group["eps"])
    check_int(owner, "ns_steps", group["ns_steps"], low=1, high=100)
    coefficients = check_tuple(
        owner, "ns_coefficients", group["ns_coefficients"], 3, names=("a", "b", "c")
    )
    for i, value in enumerate(coefficients):
        check_finite(owner, f"ns_coefficients[{i}]", value)
    check_choice(owner, "adjust_lr_fn", group["adjust_lr_fn"], ADJUST_LR_FNS)
    check_float_dtype(owner, "ns_dtype", group["ns_dtype"])
    check_flag(owner, "nesterov", group["nesterov"])
    check_flag(owner, "batched", group["batched"])
    check_flag(owner, "use_muon", group["use_muon"], allow_none=True)
    if group["adamw_lr"] is not None:  # None: the AdamW parameters step with lr
        check_nonneg(owner, "adamw_lr", group["adamw_lr"])
    check_betas(owner, group["adamw_betas"], 2, names=("β₁", "β₂"), name="adamw_betas")
    check_nonneg(owner, "adamw_eps", group["adamw_eps"])
    check_nonneg(owner, "adamw_weight_decay", group["adamw_weight_decay"])
    check_precision(owner, group)


def _uses_muon(group: dict[str, Any], p: Tensor) -> bool:
    use_muon = group["use_muon"]
    return p.dim() >= 2 if use_muon is None else use_muon


def _matrix_shape(p: Tensor) -> tuple[int, int]:
    return p.shape[0], math.prod(p.shape[1:])


# -- the optimizer ---------------------------------------------------------------------------


class Muon(Optimizer):
    r"""Muon for the matrices of a model, AdamW for everything else, as one optimizer.

    Matrices (``use_muon``: by default every parameter with ``ndim >= 2``; convolution
    weights are flattened to ``(out, in·kh·kw)``):

    .. math::
        B_t = μ B_{t-1} + (1-μ) g_t,\quad
        U_t = \mathrm{lerp}(g_t, B_t, μ) \text{ (nesterov) or } B_t,\quad
        θ_t = (1 - ηλ)θ_{t-1} - η·s(r, c)·\mathrm{NS}_k(U_t)

    with ``s = √max(1, r/c)`` ("original") or ``0.2·√max(r, c)`` ("match_rms_adamw"); the
    update equals ``torch.optim.Muon``'s. ``NS_k`` runs in ``ns_dtype`` (bfloat16 by default,
    as in the reference) and never touches the momentum buffer (``torch.optim.Muon`` in torch
    2.13 normalises a bfloat16 buffer in place when ``nesterov=False``; this one does not).
    Same-shaped matrices of a (device, dtype), up to 2^20 elements each, are orthogonalised
    together in one batched matmul chain (``batched=True``).

    Other parameters (AdamW with decoupled weight decay, bias-corrected):

    .. math::
        m_t = β_1 m_{t-1} + (1-β_1) g_t,\quad v_t = β_2 v_{t-1} + (1-β_2) g_t^2,\quad
        θ_t = (1 - η_a λ_a)θ_{t-1} - η_a \frac{m_t/(1-β_1^t)}{\sqrt{v_t/(1-β_2^t)} + ε_a}

    Param groups may set any argument below. ``use_muon=None`` routes each parameter by its
    ``ndim``; ``use_muon=False`` sends a whole group (e.g. embeddings and the output head)
    to AdamW; ``use_muon=True`` insists that every parameter of the group is a matrix.
    LR schedulers scale ``lr`` only; set ``adamw_lr=None`` to step the AdamW parameters with
    ``lr`` too (natural with ``adjust_lr_fn="match_rms_adamw"``).

    Args:
        params: parameters or param-group dicts.
        lr: learning rate η of the matrices.
        momentum: momentum μ, ``0 <= μ < 1``.
        nesterov: Nesterov momentum.
        weight_decay: decoupled weight decay λ of the matrices (multiplied by ``lr``).
        ns_steps: Newton–Schulz iterations k.
        ns_coefficients: the quintic's ``(a, b, c)``.
        eps: floor ε of the Frobenius norm used to normalise the input of Newton–Schulz.
        adjust_lr_fn: ``"original"`` or ``"match_rms_adamw"``.
        ns_dtype: dtype of the Newton–Schulz iteration.
        use_muon: ``None`` (by ndim), ``True`` or ``False``, see above.
        adamw_lr: learning rate η_a of the AdamW parameters (``None``: ``lr``).
        adamw_betas: ``(β_1, β_2)`` of AdamW.
        adamw_eps: ε_a of AdamW.
        adamw_weight_decay: decoupled weight decay λ_a of AdamW (multiplied by ``adamw_lr``).
        batched: orthogonalise same-shaped matrices (up to 2^20 elements each) in one
            batched matmul chain.
        state_dtype: dtype of the momentum and AdamW moments. ``None`` (default): float32
            for bfloat16/float16 parameters, the parameter's dtype otherwise.
        kahan: Kahan-compensated parameter writes for bfloat16/float16 parameters (a
            ``kahan_comp`` buffer in the parameter's dtype keeps each write's rounding error
            and adds it back next step, so updates below half an ulp are not lost). No
            effect on float32/float64 parameters.
        skip_nonfinite: skip a step whose gradients hold NaN or Inf, decided on the device
            (see :meth:`step`; count in :attr:`skipped_steps`). Off by default, like torch.

    Precision: for bfloat16/float16 parameters every step's arithmetic (momentum, weight
    decay, the update) runs in float32 and each parameter is written once, rounded once
    (``(1 − ηλ)`` is never rounded to bfloat16 first). GradScaler: ``scaler.step(opt)``
    passes ``grad_scale``/``found_inf`` to :meth:`step`, which unscales on the device and
    skips where ``found_inf`` (``_step_supports_amp_scaling``), with no host read.

    Distributed: under DDP every rank orthogonalises every matrix (whole parameters). Under
    FSDP2 (DTensor parameters, ``Shard(0)``) momentum, weight decay and AdamW run on each
    rank's rows (state stays DTensor), and each matrix is orthogonalised by one owner rank:
    ``U`` goes to its owner in ``ns_dtype`` and the owner sends each rank its rows of
    ``NS_k(U)`` (two ``all_to_all_single`` per group and dtype, ``2·N·(W−1)/W`` elements of
    ``ns_dtype`` per step over all ranks; see :mod:`backends._owners`). The numbers are a
    single process's on the full batch.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.02,
        momentum: float = 0.95,
        *,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        ns_coefficients: tuple[float, float, float] = DEFAULT_NS_COEFFICIENTS,
        eps: float = 1e-7,
        adjust_lr_fn: str = "original",
        ns_dtype: torch.dtype = torch.bfloat16,
        use_muon: bool | None = None,
        adamw_lr: float | None = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
        batched: bool = True,
        state_dtype: torch.dtype | None = None,
        kahan: bool = False,
        skip_nonfinite: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "nesterov": nesterov,
            "weight_decay": weight_decay,
            "ns_steps": ns_steps,
            "ns_coefficients": tuple(ns_coefficients)
            if isinstance(ns_coefficients, (tuple, list))
            else ns_coefficients,
            "eps": eps,
            "adjust_lr_fn": adjust_lr_fn,
            "ns_dtype": ns_dtype,
            "use_muon": use_muon,
            "adamw_lr": adamw_lr,
            "adamw_betas": tuple(adamw_betas)
            if isinstance(adamw_betas, (tuple, list))
            else adamw_betas,
            "adamw_eps": adamw_eps,
            "adamw_weight_decay": adamw_weight_decay,
            "batched": batched,
            "state_dtype": state_dtype,
            "kahan": kahan,
            "skip_nonfinite": skip_nonfinite,
        }
        _check_group(defaults, "")
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (validated; nothing is added when it is invalid)."""
        index = len(self.param_groups)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_group(group, f"param group {index}")
            for i, p in enumerate(group["params"]):
                if p.is_complex():
                    raise TypeError(
                        f"Muon does not support complex parameters; parameter {i} of param "
                        f"group {index} is {p.dtype}"
                    )
                if group["use_muon"] is True and p.dim() < 2:
                    raise ValueError(
                        f"Muon with use_muon=True orthogonalises matrices only, but parameter "
                        f"{i} of param group {index} has shape {tuple(p.shape)}; use "
                        "use_muon=None to send non-matrices to the internal AdamW"
                    )
        except Exception:
            self.param_groups.pop()
            raise

    # GradScaler hands over grad_scale/found_inf and calls step() without a host read.
    _step_supports_amp_scaling = True

    # -- stepping --------------------------------------------------------------------------

    @property
    def skipped_steps(self) -> Tensor | None:
        """Steps skipped for non-finite gradients or GradScaler's ``found_inf`` (a 0-d device
        tensor), or ``None`` before any step could be skipped."""
        return precision.skip_count(self)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One Muon step for the matrices and one AdamW step for the rest.

        With ``skip_nonfinite=True`` (any group), or under ``torch.amp.GradScaler``, the step
        is decided on the device: when a gradient holds NaN/Inf (or the scaler found one),
        every parameter and state tensor is left bit-identical and
        ``state[p]["nonfinite_skips"]`` counts the skip; nothing is read on the host.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = []
        for index, group in enumerate(self.param_groups):  # checked before anything moves
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError(
                            f"Muon does not support sparse gradients (param group {index})"
                        )
                    if _uses_muon(group, p):  # DTensor placements we cannot gather: TypeError
                        _owners.shard_group(p)
                    grads.append(p.grad)
        if not grads:
            return loss
        skip_nonfinite = any(group["skip_nonfinite"] for group in self.param_groups)
        # GradScaler: unscale in place and fold in found_inf; None when nothing can skip.
        # FSDP2: on the local shards, the flag then common to every rank of a shard group.
        skip = shards.prepare_sharded_step(self, grads, skip_nonfinite=skip_nonfinite)
        for group in self.param_groups:
            self._muon_group(group, skip)
            self._adamw_group(group, skip)
        return loss

    def _kahan_buffers(self, group: dict[str, Any], params: Sequence[Tensor]) -> list[Tensor]:
        """The compensation buffers of low-precision parameters when ``kahan`` is on."""
        if not group["kahan"] or params[0].dtype not in precision.LOW_PRECISION:
            return []
        comps = []
        for p in params:
            state = self.state[p]
            if KAHAN_KEY not in state:
                state[KAHAN_KEY] = torch.zeros_like(p, memory_format=torch.preserve_format)
            comps.append(state[KAHAN_KEY])
        return comps

    @staticmethod
    def _guarded(skip: Tensor | None, tensors: list[Tensor]) -> list[Tensor] | None:
        """Copies of everything a step may write, to restore where ``skip`` (None: no flag).

        A temporary copy of the parameters and state of one group and dtype: cheap beside
        Newton–Schulz (measured skip/plain 0.97 on 200 64×64 matrices).
        """
        return None if skip is None else precision.snapshot(tensors)

    def _finish(
        self, skip: Tensor | None, params: list[Tensor], tensors: list[Tensor],
        saved: list[Tensor] | None,
    ) -> None:
        """Restore the snapshot where ``skip`` and count the skip for every stepped parameter."""
        if skip is None or saved is None:
            return
        precision.restore_where_(tensors, saved, skip)
        count_skips_(self.state, params, skip)

    def _muon_group(self, group: dict[str, Any], skip: Tensor | None) -> None:
        buckets: dict[tuple, tuple[list[Tensor], list[Tensor], list[Tensor]]] = {}
        for p in group["params"]:
            if p.grad is None or not _uses_muon(group, p):
                continue
            state = self.state[p]
            state_dtype = precision.resolve_state_dtype(p.dtype, group["state_dtype"])
            buffer = state.get("momentum_buffer")
            if buffer is None:
                buffer = state["momentum_buffer"] = torch.zeros_like(
                    p, dtype=state_dtype, memory_format=torch.preserve_format
                )
            bucket = buckets.setdefault((p.device, p.dtype, buffer.dtype), ([], [], []))
            bucket[0].append(p)
            bucket[1].append(p.grad)
            bucket[2].append(buffer)
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        for (_, param_dtype, state_dtype), bucket in buckets.items():
            # FSDP2: everything element-wise runs on the DTensors' local rows (views that
            # share their storage); only Newton–Schulz needs whole matrices (see _owners).
            owners = [_owners.shard_group(p) for p in bucket[0]]
            keys = bucket[0]
            b_params, b_grads, b_buffers = ([shards.local(t) for t in lst] for lst in bucket)
            comps = [shards.local(c) for c in self._kahan_buffers(group, keys)]
            written = [*b_params, *b_buffers, *comps]
            saved = self._guarded(skip, written)
            compute = _compute_dtype(param_dtype, state_dtype)
            # B ← lerp(B, g, 1−μ) in the compute dtype, stored once in the state dtype
            work = _as(b_buffers, compute)
            grads = _as(b_grads, compute)
            torch._foreach_lerp_(work, grads, 1.0 - momentum)
            if work is not b_buffers:
                torch._foreach_copy_(b_buffers, work)
            low = param_dtype != compute
            if weight_decay != 0 and not low:
                torch._foreach_mul_(b_params, 1.0 - lr * weight_decay)
            low_compute = compute if low else None
            by_group: dict[int, tuple[Any, list[int]]] = {}
            for i, pg in enumerate(owners):
                if pg is not None:
                    by_group.setdefault(id(pg), (pg, []))[1].append(i)
            for pg, indices in by_group.values():
                self._sharded_update(
                    group, pg, [_matrix_shape(keys[i]) for i in indices],
                    [b_params[i] for i in indices], [grads[i] for i in indices],
                    [work[i] for i in indices], [comps[i] for i in indices] if comps else [],
                    low_compute,
                )
            by_shape: dict[tuple[int, int], list[int]] = {}
            for i, p in enumerate(b_params):
                if owners[i] is None:
                    by_shape.setdefault(_matrix_shape(p), []).append(i)
            for shape, indices in by_shape.items():
                chunk = max(1, MAX_BATCH_NUMEL // max(1, shape[0] * shape[1]))
                for start in range(0, len(indices), chunk):
                    part = indices[start : start + chunk]
                    self._orthogonal_update(
                        group,
                        shape,
                        [b_params[i] for i in part],
                        [grads[i] for i in part],
                        [work[i] for i in part],
                        [comps[i] for i in part] if comps else [],
                        low_compute,
                    )
            self._finish(skip, keys, written, saved)

    def _orthogonal_update(
        self,
        group: dict[str, Any],
        shape: tuple[int, int],
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        buffers: Sequence[Tensor],
        comps: Sequence[Tensor],
        compute: torch.dtype | None,
    ) -> None:
        """``θ ← θ − η·s·NS(U)`` for same-shaped matrices; ``U`` never aliases the buffer.

        ``compute`` is set for low-precision parameters: the whole update, weight decay
        included, is formed in that dtype and written with one rounding (or compensated).
        """
        rows, cols = shape
        updates = self._nesterov(group, grads, buffers)
        sources = [u.reshape(rows, cols) for u in updates]
        dtype = self._update_dtype(group, params[0].dtype, compute)
        outputs = [o.to(dtype) for o in self._orthogonalize(group, shape, sources)]
        if params[0].dim() != 2:
            outputs = [o.reshape(p.shape) for o, p in zip(outputs, params)]
        self._apply(group, shape, params, outputs, comps, compute)

    @staticmethod
    def _nesterov(
        group: dict[str, Any], grads: Sequence[Tensor], buffers: Sequence[Tensor]
    ) -> list[Tensor]:
        """``U = lerp(g, B, μ)`` (nesterov) or ``B`` itself (read only), element-wise."""
        if group["nesterov"]:
            return list(torch._foreach_lerp(grads, buffers, group["momentum"]))
        return list(buffers)  # read only: copied into the iteration's own buffer

    @staticmethod
    def _update_dtype(
        group: dict[str, Any], param_dtype: torch.dtype, compute: torch.dtype | None
    ) -> torch.dtype:
        """The dtype the orthogonalised update is added in."""
        if compute is not None:
            return compute
        # The update is added in the parameter's dtype when that is at least as wide (an
        # exact cast, and same-dtype foreach ops); otherwise in the iteration's dtype.
        if torch.promote_types(param_dtype, group["ns_dtype"]) != param_dtype:
            return group["ns_dtype"]
        return param_dtype

    @staticmethod
    def _orthogonalize(
        group: dict[str, Any], shape: tuple[int, int], sources: Sequence[Tensor]
    ) -> list[Tensor]:
        """``NS_k`` of whole ``rows × cols`` matrices (any dtype, never modified): results in
        ``ns_dtype``, shaped ``rows × cols``; batched when ``batched`` and small enough."""
        rows, cols = shape
        steps, coefficients, eps = group["ns_steps"], group["ns_coefficients"], group["eps"]
        transpose = rows > cols
        m, n = (cols, rows) if transpose else (rows, cols)
        if transpose:
            sources = [s.mT for s in sources]
        device, ns_dtype = sources[0].device, group["ns_dtype"]
        if group["batched"] and len(sources) > 1 and m * n <= MAX_BATCHED_MATRIX_NUMEL:
            x = torch.empty((len(sources), m, n), dtype=ns_dtype, device=device)
            torch._foreach_copy_(list(x.unbind(0)), list(sources))
            y = _newton_schulz_owned_(x, steps, coefficients, eps)
            return list((y.mT if transpose else y).unbind(0))
        outputs = []
        for source in sources:
            x = source.to(dtype=ns_dtype, memory_format=torch.contiguous_format, copy=True)
            y = _newton_schulz_owned_(x, steps, coefficients, eps)
            outputs.append(y.mT if transpose else y)
        return outputs

    @staticmethod
    def _apply(
        group: dict[str, Any],
        shape: tuple[int, int],
        params: Sequence[Tensor],
        outputs: Sequence[Tensor],
        comps: Sequence[Tensor],
        compute: torch.dtype | None,
    ) -> None:
        """``θ ← θ − η·s(r, c)·O`` (weight decay already applied, except for low-precision
        parameters, where it joins the one rounded write)."""
        scale = lr_adjustment(shape[0], shape[1], group["adjust_lr_fn"])
        if compute is None:
            torch._foreach_add_(list(params), list(outputs), alpha=-group["lr"] * scale)
            return
        # d = −η·s·O − ηλ·θ in the compute dtype, then one rounding into θ
        deltas = torch._foreach_mul(list(outputs), -group["lr"] * scale)
        if group["weight_decay"] != 0:
            decay = -group["lr"] * group["weight_decay"]
            torch._foreach_add_(deltas, _as(params, compute), alpha=decay)
        _write_(params, deltas, comps)

    def _sharded_update(
        self,
        group: dict[str, Any],
        process_group: Any,
        shapes: list[tuple[int, int]],
        params: list[Tensor],
        grads: list[Tensor],
        buffers: list[Tensor],
        comps: list[Tensor],
        compute: torch.dtype | None,
    ) -> None:
        """The orthogonal update of FSDP2 matrices (``params`` etc.: the local rows).

        ``U`` is formed on the local rows, cast to ``ns_dtype`` (the iteration's first step,
        so the cast before sending is the one a single process makes) and sent to the
        matrix's owner (:mod:`backends._owners`); the owner runs Newton–Schulz on the whole
        matrices it owns, batched as on one process, and sends each rank its rows of the
        result (in ``ns_dtype``, cast afterwards exactly as on one process). Bytes per step:
        ``2·N·(W-1)/W`` elements of ``ns_dtype`` over all ranks (``N``: the matrices'
        elements), two ``all_to_all_single`` calls per param group and dtype.
        """
        ns_dtype = group["ns_dtype"]
        updates = self._nesterov(group, grads, buffers)
        sources = [_owners.matrix_rows(u).to(ns_dtype) for u in updates]
        plan = _owners.Plan(process_group, shapes, [_owners.muon_cost(*s) for s in shapes])
        wholes = plan.to_owners(sources)
        results: dict[int, Tensor] = {}
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i in plan.owned:
            by_shape.setdefault(shapes[i], []).append(i)
        for shape, indices in by_shape.items():
            chunk = max(1, MAX_BATCH_NUMEL // max(1, shape[0] * shape[1]))
            for start in range(0, len(indices), chunk):
                part = indices[start : start + chunk]
                outs = self._orthogonalize(group, shape, [wholes[i] for i in part])
                results.update(zip(part, outs))
        mine = plan.to_shards(results, like=sources[0])
        dtype = self._update_dtype(group, params[0].dtype, compute)
        by_shape = {}
        for i, shape in enumerate(shapes):
            by_shape.setdefault(shape, []).append(i)
        for shape, indices in by_shape.items():
            self._apply(
                group, shape, [params[i] for i in indices],
                [mine[i].to(dtype).reshape(params[i].shape) for i in indices],
                [comps[i] for i in indices] if comps else [], compute,
            )

    def _adamw_group(self, group: dict[str, Any], skip: Tensor | None) -> None:
        buckets: dict[tuple, tuple[list[Tensor], ...]] = {}
        for p in group["params"]:
            if p.grad is None or _uses_muon(group, p):
                continue
            state = self.state[p]
            if "exp_avg" not in state:
                # The step count lives on the parameter's device: bias corrections are
                # computed there, with no host read.
                state_dtype = precision.resolve_state_dtype(p.dtype, group["state_dtype"])
                state["step"] = torch.zeros((), dtype=step_dtype(p), device=p.device)
                state["exp_avg"] = torch.zeros_like(
                    p, dtype=state_dtype, memory_format=torch.preserve_format
                )
                state["exp_avg_sq"] = torch.zeros_like(
                    p, dtype=state_dtype, memory_format=torch.preserve_format
                )
            key = (p.device, p.dtype, state["exp_avg"].dtype)
            bucket = buckets.setdefault(key, ([], [], [], [], [], []))
            # FSDP2: element-wise on the local shards (views sharing the DTensors' storage)
            for lst, value in zip(
                bucket, (p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], p)
            ):
                lst.append(shards.local(value) if lst is not bucket[-1] else value)
        lr = group["lr"] if group["adamw_lr"] is None else group["adamw_lr"]
        beta1, beta2 = group["adamw_betas"]
        weight_decay, eps = group["adamw_weight_decay"], group["adamw_eps"]
        for (_, param_dtype, state_dtype), bucket in buckets.items():
            b_params, b_grads, b_m, b_v, b_steps, keys = bucket
            comps = [shards.local(c) for c in self._kahan_buffers(group, keys)]
            written = [*b_params, *b_m, *b_v, *b_steps, *comps]
            saved = self._guarded(skip, written)
            compute = _compute_dtype(param_dtype, state_dtype)
            low = param_dtype != compute
            torch._foreach_add_(b_steps, 1.0)
            if weight_decay != 0 and not low:
                torch._foreach_mul_(b_params, 1.0 - lr * weight_decay)
            grads = _as(b_grads, compute)
            m, v = _as(b_m, compute), _as(b_v, compute)
            torch._foreach_lerp_(m, grads, 1.0 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, value=1.0 - beta2)
            if m is not b_m:  # stored once in the state dtype
                torch._foreach_copy_(b_m, m)
                torch._foreach_copy_(b_v, v)
            # 1 − β^t as 0-d device tensors
            correction1, correction2 = adam_bias_corrections(beta1, beta2, b_steps)
            torch._foreach_sqrt_(correction2)
            # θ −= η·m/((√v/√c₂ + ε)·c₁)
            denominators = torch._foreach_sqrt(v)
            torch._foreach_div_(denominators, correction2)
            torch._foreach_add_(denominators, eps)
            torch._foreach_mul_(denominators, correction1)
            if not low:
                torch._foreach_addcdiv_(b_params, m, denominators, value=-lr)
            else:
                deltas = torch._foreach_div(m, denominators)
                torch._foreach_mul_(deltas, -lr)
                if weight_decay != 0:
                    torch._foreach_add_(deltas, _as(b_params, compute), alpha=-lr * weight_decay)
                _write_(b_params, deltas, comps)
            self._finish(skip, keys, written, saved)

    # -- checkpoints -----------------------------------------------------------------------

    def _state_spec(self, group: dict[str, Any], p: Tensor) -> Spec:
        """Every state key a parameter may hold: ``{key: (shape, dtype)}``, required keys first."""
        state_dtype = precision.resolve_state_dtype(p.dtype, group["state_dtype"])
        if _uses_muon(group, p):
            spec = {"momentum_buffer": (tuple(p.shape), state_dtype)}
        else:
            spec = {
                "step": ((), step_dtype(p)),
                "exp_avg": (tuple(p.shape), state_dtype),
                "exp_avg_sq": (tuple(p.shape), state_dtype),
            }
        return spec

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load a state dict of this optimizer: checked first, then loaded, or nothing changes.

        torch's layout and rules (saved hyperparameters replace the groups'; state that is not
        keyed by a parameter index, e.g. written by a hook, is kept as it is), except that every
        state tensor is copied to its parameter's device in the dtype this optimizer keeps it
        in (momentum and moments in the state dtype, ``step`` float32/float64,
        ``kahan_comp`` in the parameter's dtype), not cast to the parameter's dtype.
        Raises ``ValueError`` naming the parameter index, key and shapes for a state dict of
        another model or optimizer (wrong parameter count, shapes, missing or unknown keys).
        """
        load_checked(self, state_dict, "Muon", _check_group, self._state_spec, _DTYPE_KEYS)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """torch's state dict, with the groups' ``ns_dtype`` and ``state_dtype`` saved by
        name (``"bfloat16"``), as ``torch.distributed.checkpoint`` requires; either form
        loads."""
        return name_dtypes(super().state_dict(), _DTYPE_KEYS)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        fill_later_defaults(self)  # groups saved before these settings existed
