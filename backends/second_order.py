r"""Second-order backend: Shampoo, Kronecker-factored preconditioning with Adam grafting.

For a parameter whose gradient is viewed as a matrix ``G`` (``m × n``; a tensor of ``ndim > 2``
such as a conv weight is flattened to ``shape[0] × prod(shape[1:])``), Shampoo keeps two
statistics and preconditions with their inverse fourth roots::

    L ← β₂·L + (1-β₂)·G Gᵀ              R ← β₂·R + (1-β₂)·Gᵀ G
    D = L̂^{-1/4} · M̂ · R̂^{-1/4}         M̂ = m/(1-β₁ᵗ), m ← β₁·m + (1-β₁)·G

with ``L̂ = L/(1-β₂ᵗ)`` (likewise ``R̂``). Matrices with a side larger than
``max_preconditioner_dim`` are split into near-equal blocks of at most that size (as in
distributed_shampoo); each block has its own ``L`` and ``R``. 0-d and 1-D parameters (biases,
norms) are preconditioned diagonally: their update is Adam's.

Everything runs on the parameters' device; ``step()`` reads no tensor value on the host.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim import Optimizer

from adaptor import precision, shards
from backends import _shampoo_fsdp
from backends._common import adam_bias_corrections, step_dtype
from backends._state import (
    KAHAN_KEY,
    Spec,
    as_dtype,
    compute_dtype,
    count_skips_,
    fill_later_defaults,
    load_checked,
    name_dtypes,
    write_params_,
)
from backends._validation import (
    check_betas,
    check_choice,
    check_flag,
    check_float_dtype,
    check_int,
    check_nonneg,
    check_positive,
    check_precision,
)

__all__ = ["Shampoo", "matrix_inverse_root"]

GRAFTINGS = ("adam", "none")
ROOT_METHODS = ("eigh", "newton")
# Group settings that hold a torch.dtype: saved by name (see Shampoo.state_dict).
_DTYPE_KEYS = ("preconditioner_dtype", "state_dtype")
# State keys of a preconditioned (matrix) parameter.
MATRIX_KEYS = ("left", "right", "left_root", "right_root")


# -- the inverse root ---------------------------------------------------------------------


def _floor(dtype: torch.dtype) -> float:
    """An absolute floor added to the ridge so that an all-zero statistic stays finite."""
    return torch.finfo(dtype).tiny ** 0.5


def matrix_inverse_root(
    matrix: Tensor,
    root: int = 4,
    *,
    eps: float = 1e-6,
    method: str = "eigh",
    newton_iterations: int = 40,
) -> Tensor:
    r"""``(A + ρ·I)^{-1/root}`` for a (batch of) symmetric positive semi-definite ``A``.

    The ridge is relative to the statistic's scale: ``ρ = eps·‖A‖_F + floor`` (``floor`` =
    ``sqrt(finfo.tiny)``, only there to keep an all-zero ``A`` finite). Computed in
    ``matrix.dtype`` on ``matrix.device``, batched over leading dimensions.

    - ``method="eigh"``: ``A = Q diag(λ) Qᵀ`` (``torch.linalg.eigh``), then
      ``Q diag((max(λ, 0) + ρ)^{-1/root}) Qᵀ``. Exact; on CUDA torch's eigh synchronises
      internally (its convergence check).
    - ``method="newton"``: the coupled Newton iteration (Guo & Higham 2006, as in Google's
      Scalable Shampoo) for ``B = A + ρI``: ``z = (1+p)/(2‖B‖_F)``, ``X₀ = z^{1/p}·I``,
      ``M₀ = z·B``; repeat ``Mᵢ = ((p+1)·I - M)/p``, ``X ← X·Mᵢ``, ``M ← Mᵢᵖ·M``. Matmuls
      only, a fixed number of iterations (no convergence test, hence no sync at all). The
      condition number of ``B`` is at most ``1 + 1/eps``; ``newton_iterations`` must grow like
      ``log(1/eps)`` (40 covers ``eps ≥ 1e-8`` in float32/float64).
    """
    if not isinstance(root, int) or isinstance(root, bool) or root < 1:
        raise ValueError(f"matrix_inverse_root: root must be an int >= 1, got {root!r}")
    if method not in ROOT_METHODS:
        raise ValueError(
            f"matrix_inverse_root: method must be one of {ROOT_METHODS}, got {method!r}"
        )
    if matrix.dim() < 2 or matrix.shape[-1] != matrix.shape[-2]:
        raise ValueError(
            f"matrix_inverse_root: expected a (batch of) square matrices, got {tuple(matrix.shape)}"
        )
    n = matrix.shape[-1]
    ridge = eps * torch.linalg.matrix_norm(matrix) + _floor(matrix.dtype)  # (...,)
    if method == "eigh":
        eigenvalues, vectors = torch.linalg.eigh(matrix)
        scale = (eigenvalues.clamp_min(0) + ridge.unsqueeze(-1)).pow(-1.0 / root)
        return (vectors * scale.unsqueeze(-2)) @ vectors.mT
    identity = torch.eye(n, dtype=matrix.dtype, device=matrix.device)
    damped = matrix + ridge[..., None, None] * identity
    z = (1.0 + root) / (2.0 * torch.linalg.matrix_norm(damped))
    m_k = damped * z[..., None, None]
    x_k = identity * z.pow(1.0 / root)[..., None, None]
    for _ in range(newton_iterations):
        m_i = ((root + 1.0) * identity - m_k) / root
        x_k = x_k @ m_i
        m_k = torch.linalg.matrix_power(m_i, root) @ m_k
    return x_k


# -- blocking -----------------------------------------------------------------------------


class _Layout:
    """How a parameter is cut into ``count`` blocks of ``rows × cols`` (zero-padded when uneven).

    The matrix view is ``m × n`` (``shape[0] × prod(shape[1:])``); a side larger than
    ``block`` is split into ``ceil(side/block)`` near-equal parts, so padding is at most one
    row (column) per part.
    """

    __slots__ = ("col_parts", "cols", "count", "m", "n", "row_parts", "rows", "shape")

    def __init__(self, shape: torch.Size, block: int) -> None:
        self.shape = shape
        self.m = shape[0]
        self.n = math.prod(shape[1:])
        self.row_parts = -(-self.m // block)
        self.rows = -(-self.m // self.row_parts)
        self.col_parts = -(-self.n // block)
        self.cols = -(-self.n // self.col_parts)
        self.count = self.row_parts * self.col_parts

    def to_blocks(self, tensor: Tensor) -> Tensor:
        """``(count, rows, cols)`` blocks of ``tensor`` (a view when there is one block)."""
        x = tensor.reshape(self.m, self.n)
        pad_rows = self.row_parts * self.rows - self.m
        pad_cols = self.col_parts * self.cols - self.n
        if pad_rows or pad_cols:
            x = F.pad(x, (0, pad_cols, 0, pad_rows))
        if self.count == 1:
            return x.unsqueeze(0)
        x = x.reshape(self.row_parts, self.rows, self.col_parts, self.cols).transpose(1, 2)
        return x.reshape(self.count, self.rows, self.cols)

    def from_blocks(self, blocks: Tensor) -> Tensor:
        """Inverse of :meth:`to_blocks` (padding dropped), shaped like the parameter."""
        x = blocks.reshape(self.row_parts, self.col_parts, self.rows, self.cols).transpose(1, 2)
        x = x.reshape(self.row_parts * self.rows, self.col_parts * self.cols)
        return x[: self.m, : self.n].reshape(self.shape)


@functools.lru_cache(maxsize=1024)
def _layout(shape: torch.Size, block: int) -> _Layout:
    return _Layout(shape, block)


def _cat(tensors: Sequence[Tensor]) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(list(tensors))


def _bucket(items: Iterable[Any], key: Callable[[Any], Any]) -> dict[Any, list[Any]]:
    buckets: dict[Any, list[Any]] = {}
    for item in items:
        buckets.setdefault(key(item), []).append(item)
    return buckets


def _each(tensors: Sequence[Tensor], value: Any) -> Any:
    """A 0-d tensor operand as a list: the tensor-list overloads of foreach add/lerp never
    read it on the host (their single-tensor overloads call ``.item()``)."""
    return [value] * len(tensors) if isinstance(value, Tensor) else value


class _Mask:
    """A step's skip flag as the pieces a masked update needs (all on the device).

    ``select(run, skipped, dtype)`` is a 0-d tensor holding ``run`` (rounded to ``dtype``
    exactly as a Python scalar would be) or ``skipped`` where the flag is set: decays become
    1 and weights 0, so a skipped step writes every tensor back bit for bit.
    """

    __slots__ = ("device", "drop", "flag")

    def __init__(self, flag: Tensor, device: torch.device) -> None:
        self.flag = flag.to(device, non_blocking=True)
        self.device = device
        self.drop = self.flag.bool()

    def select(self, run: float, skipped: float, dtype: torch.dtype) -> Tensor:
        # torch.full: a fill on the device (no host→device copy); the scalar is rounded to
        # dtype as an operation with a Python scalar would round it
        kw = dict(dtype=dtype, device=self.device)
        return torch.where(self.drop, torch.full((), skipped, **kw), torch.full((), run, **kw))

    def keep(self, dtype: torch.dtype) -> Tensor:
        return self.select(1.0, 0.0, dtype)


@torch.compiler.disable
def _advance_schedule(
    states: list[dict[str, Any]], matrices: list[int], start: int, every: int
) -> tuple[list[int], list[int]]:
    """Advance each ``host_step`` and return the matrices whose roots are recomputed now and
    those preconditioned now.

    The root schedule counts ``step()`` calls on the host (no device read); a step skipped on
    the device still advances it (see :class:`Shampoo`). Kept out of ``torch.compile``'s
    graphs (one graph break): traced, the changing integer would recompile every step.
    """
    for state in states:
        state["host_step"] += 1
    refresh = [
        i for i in matrices
        if states[i]["host_step"] >= start and (states[i]["host_step"] - start) % every == 0
    ]
    active = [i for i in matrices if states[i]["host_step"] >= start]
    return refresh, active


# -- validation ---------------------------------------------------------------------------


def _check_group(group: dict[str, Any], where: str = "") -> None:
    """Every hyperparameter of a group, with a message naming it, its range and ``where``."""
    owner = f"Shampoo ({where})" if where else "Shampoo"
    check_nonneg(owner, "lr", group["lr"])
    check_betas(owner, group["betas"], 2, names=("β₁ momentum", "β₂ statistics"))
    check_positive(owner, "eps", group["eps"])
    check_positive(owner, "matrix_eps", group["matrix_eps"])
    check_nonneg(owner, "weight_decay", group["weight_decay"])
    for name in (
        "precondition_frequency",
        "start_preconditioning_step",
        "max_preconditioner_dim",
        "newton_iterations",
    ):
        check_int(owner, name, group[name], low=1)
    check_choice(owner, "grafting", group["grafting"], GRAFTINGS)
    check_choice(owner, "root_method", group["root_method"], ROOT_METHODS)
    check_float_dtype(
        owner,
        "preconditioner_dtype",
        group["preconditioner_dtype"],
        optional=True,
        allowed=(torch.float32, torch.float64),
    )
    check_flag(owner, "maximize", group["maximize"])
    check_precision(owner, group)


# -- the optimizer ------------------------------------------------------------------------


class Shampoo(Optimizer):
    r"""Shampoo with Adam grafting, decoupled weight decay and blocked preconditioners.

    Per parameter, with ``t`` its step count and ``g`` its gradient (``-g`` if ``maximize``)::

        θ ← θ·(1 - lr·λ)                                     # decoupled weight decay
        m ← β₁·m + (1-β₁)·g,     v ← β₂·v + (1-β₂)·g²         # Adam moments (grafting)
        A = (m/(1-β₁ᵗ)) / (sqrt(v/(1-β₂ᵗ)) + eps)             # Adam's direction

    1-D/0-d parameters, and every parameter before ``start_preconditioning_step``, take
    ``θ ← θ - lr·A`` (AdamW exactly). For a matrix view ``G`` of ``g``, per block::

        L ← β₂·L + (1-β₂)·G Gᵀ,  R ← β₂·R + (1-β₂)·Gᵀ G      # every step
        P = L̂^{-1/4} · (m/(1-β₁ᵗ)) · R̂^{-1/4}                 # L̂ = L/(1-β₂ᵗ)
        D = P·‖A‖/‖P‖  (grafting="adam")   or   D = P  (grafting="none")
        θ ← θ - lr·D

    The roots ``(L̂ + ρI)^{-1/4}`` (see :func:`matrix_inverse_root`, ``ρ = matrix_eps·‖L̂‖_F``)
    are recomputed at the parameter's steps ``t = start, start + k, start + 2k, …``
    (``k = precondition_frequency``) and reused in between. Grafting is per block (per
    layer when the matrix fits in one block), as in distributed_shampoo: Shampoo picks the
    direction, Adam the step size, so Adam's learning rate carries over.

    Args:
        params: parameters or param groups (every argument below may be set per group).
        lr: learning rate ``lr >= 0``.
        betas: ``(β₁, β₂)``, each in ``[0, 1)``: β₁ for the momentum ``m`` (the gradient fed
            to the preconditioner, bias-corrected), β₂ for ``L``, ``R`` and Adam's ``v``.
        eps: Adam's denominator term, ``> 0``.
        matrix_eps: relative ridge of the inverse roots, ``> 0``.
        weight_decay: decoupled weight decay ``λ >= 0`` (AdamW style).
        precondition_frequency: recompute the inverse roots every ``k >= 1`` steps.
        start_preconditioning_step: the first step (``>= 1``) that uses Shampoo's direction;
            steps before it are Adam's.
        max_preconditioner_dim: largest side of a preconditioner; larger matrix sides are
            split into near-equal blocks (``>= 1``).
        grafting: ``"adam"`` (default) or ``"none"`` (raw Shampoo direction, still
            bias-corrected; 1-D parameters and steps before the start use Adam either way).
        root_method: ``"eigh"`` (exact; default) or ``"newton"`` (coupled Newton iteration,
            matmuls only, no device synchronisation even on CUDA).
        newton_iterations: iterations of the Newton method.
        preconditioner_dtype: dtype of ``L``, ``R`` and their roots: ``None`` (float32, or
            float64 for float64 parameters), ``torch.float32`` or ``torch.float64``.
        maximize: maximise the objective.
        state_dtype: dtype of Adam's moments (and, when ``preconditioner_dtype`` is None, at
            least float32 for ``L``, ``R`` and the roots). ``None`` (default): float32 for
            bfloat16/float16 parameters, the parameter's dtype otherwise.
        kahan: Kahan-compensated parameter writes for bfloat16/float16 parameters (a
            ``kahan_comp`` buffer in the parameter's dtype); no effect on float32/float64.
        skip_nonfinite: skip a step whose gradients hold NaN or Inf, decided on the device
            (count in :attr:`skipped_steps`). Off by default, like torch.

    Precision: for bfloat16/float16 parameters the whole step runs in float32 and each
    parameter is written once, rounded once (or compensated with ``kahan=True``).

    Skipped steps (``skip_nonfinite=True``, or GradScaler's ``found_inf``: the class sets
    ``_step_supports_amp_scaling``, so ``scaler.step(opt)`` unscales and skips on the device
    with no host read): every parameter and state tensor — ``step``, the moments, ``L``,
    ``R`` and the roots — is left bit-identical by masked updates (gradients zeroed on the
    device, each decay and weight selected to exactly 1 or 0, new roots and Kahan writes
    selected with ``torch.where``): no copy of the state, and no host read. ``host_step``,
    the host-side clock that schedules root recomputations, counts ``step()`` calls and
    cannot see the device's decision: it advances on a skipped step, so a recomputation
    that falls on a skipped step is dropped (the roots stay one period older).

    State per parameter: ``step`` (a 0-d tensor on the parameter's device, float32, or
    float64 for float64 parameters, used for the bias corrections), ``host_step`` (the same
    count as a Python int: it schedules the root recomputations without reading the device,
    and is saved in the state dict),
    ``exp_avg``, ``exp_avg_sq`` and, for matrices, ``left``/``right`` (``blocks × r × r``,
    ``blocks × c × c``) and ``left_root``/``right_root``.

    No host reads inside ``step()``; same-shaped blocks of all parameters of a group are
    batched into one ``eigh``/``bmm``. On CUDA, ``torch.linalg.eigh`` itself synchronises
    once per recomputation (its error check); ``root_method="newton"`` avoids even that.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        matrix_eps: float = 1e-6,
        weight_decay: float = 0.0,
        precondition_frequency: int = 10,
        start_preconditioning_step: int = 10,
        max_preconditioner_dim: int = 1024,
        grafting: str = "adam",
        root_method: str = "eigh",
        newton_iterations: int = 40,
        preconditioner_dtype: torch.dtype | None = None,
        *,
        maximize: bool = False,
        state_dtype: torch.dtype | None = None,
        kahan: bool = False,
        skip_nonfinite: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            eps=eps,
            matrix_eps=matrix_eps,
            weight_decay=weight_decay,
            precondition_frequency=precondition_frequency,
            start_preconditioning_step=start_preconditioning_step,
            max_preconditioner_dim=max_preconditioner_dim,
            grafting=grafting,
            root_method=root_method,
            newton_iterations=newton_iterations,
            preconditioner_dtype=preconditioner_dtype,
            maximize=maximize,
            state_dtype=state_dtype,
            kahan=kahan,
            skip_nonfinite=skip_nonfinite,
        )
        _check_group(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (checked: hyperparameter ranges, no complex parameters)."""
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        group = self.param_groups[index]
        try:
            _check_group(group, f"param group {index}")
            for p in group["params"]:
                if p.is_complex():
                    raise TypeError(
                        f"Shampoo does not support complex parameters (param group {index})"
                    )
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    # GradScaler hands over grad_scale/found_inf and calls step() without a host read.
    _step_supports_amp_scaling = True

    # -- helpers -------------------------------------------------------------------------

    @staticmethod
    def _matrix_dtype(group: dict[str, Any], p: Tensor) -> torch.dtype:
        if group["preconditioner_dtype"] is not None:
            return group["preconditioner_dtype"]
        state_dtype = precision.resolve_state_dtype(p.dtype, group.get("state_dtype"))
        return torch.promote_types(state_dtype, torch.float32)

    @staticmethod
    def _is_matrix(p: Tensor) -> bool:
        return p.dim() >= 2

    def _init_state(self, group: dict[str, Any], p: Tensor, layout: _Layout | None) -> None:
        state = self.state[p]
        if state:
            return
        state_dtype = precision.resolve_state_dtype(p.dtype, group["state_dtype"])
        state["step"] = torch.zeros((), dtype=step_dtype(p), device=p.device)
        state["host_step"] = 0
        state["exp_avg"] = torch.zeros_like(
            p, dtype=state_dtype, memory_format=torch.preserve_format
        )
        state["exp_avg_sq"] = torch.zeros_like(
            p, dtype=state_dtype, memory_format=torch.preserve_format
        )
        if layout is not None:
            dtype = self._matrix_dtype(group, p)
            kw = dict(dtype=dtype, device=p.device)
            count, rows, cols = layout.count, layout.rows, layout.cols
            state["left"] = torch.zeros(count, rows, rows, **kw)
            state["right"] = torch.zeros(count, cols, cols, **kw)
            state["left_root"] = torch.eye(rows, **kw).expand(count, rows, rows).clone()
            state["right_root"] = torch.eye(cols, **kw).expand(count, cols, cols).clone()

    def _check_matrix_state(
        self, group: dict[str, Any], p: Tensor, state: dict, where: str
    ) -> None:
        layout = _layout(p.shape, group["max_preconditioner_dim"])
        dtype = self._matrix_dtype(group, p)
        expected = {
            "left": (layout.count, layout.rows, layout.rows),
            "right": (layout.count, layout.cols, layout.cols),
        }
        expected["left_root"], expected["right_root"] = expected["left"], expected["right"]
        for key, shape in expected.items():
            value = state.get(key)
            if not isinstance(value, Tensor) or tuple(value.shape) != shape:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"Shampoo state {key!r} of {where} has shape {got}, expected {shape} for a "
                    f"parameter of shape {tuple(p.shape)} with max_preconditioner_dim="
                    f"{group['max_preconditioner_dim']} (was it changed mid-run?)"
                )
            if value.dtype != dtype and where.startswith("state_dict"):
                raise ValueError(
                    f"Shampoo state {key!r} of {where} has dtype {value.dtype}, expected {dtype}"
                )

    # -- stepping ------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One Shampoo step for every parameter with a gradient (see the class docstring)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Everything that can fail is checked before anything is modified.
        work = []
        for index, group in enumerate(self.param_groups):
            _check_group(group, f"param group {index}")
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"Shampoo does not support sparse gradients (param group {index})"
                    )
                if p.is_complex():
                    raise TypeError(
                        f"Shampoo does not support complex parameters (param group {index})"
                    )
                if self._is_matrix(p):  # DTensor placements we cannot gather: TypeError
                    _shampoo_fsdp.split([p], [0])
                state = self.state.get(p)
                if state and self._is_matrix(p):
                    self._check_matrix_state(group, p, state, f"a parameter of group {index}")
            work.append((group, params))
        grads = [p.grad for _, params in work for p in params]
        if not grads:
            return loss
        skip_nonfinite = any(group["skip_nonfinite"] for group in self.param_groups)
        # GradScaler: unscale in place and fold in found_inf; None when nothing can skip.
        # FSDP2: on the local shards, the flag then common to every rank of a shard group.
        skip = shards.prepare_sharded_step(self, grads, skip_nonfinite=skip_nonfinite)
        for group, params in work:
            for _, bucket in _bucket(params, lambda p: (p.device, p.dtype)).items():
                self._step_bucket(group, bucket, skip)
        return loss

    @property
    def skipped_steps(self) -> Tensor | None:
        """Steps skipped for non-finite gradients or GradScaler's ``found_inf`` (a 0-d device
        tensor), or ``None`` before any step could be skipped."""
        return precision.skip_count(self)

    def _step_bucket(
        self, group: dict[str, Any], params: list[Tensor], skip: Tensor | None
    ) -> None:
        """One step of same-(device, dtype) parameters of a group.

        Low-precision parameters: every quantity is formed in the compute dtype (float32
        with the default float32 state) and each parameter is written once, rounded once or
        Kahan-compensated. ``skip`` (a 0-d device flag, or None): every write is masked
        (gradients zeroed, decays 1, weights 0, roots and Kahan writes selected with
        ``torch.where``) so that a skipped step leaves every tensor's bits, and the skip is
        counted.
        """
        lr = group["lr"]
        beta1, beta2 = group["betas"]
        block = group["max_preconditioner_dim"]
        start = group["start_preconditioning_step"]
        every = group["precondition_frequency"]
        layouts = {p: _layout(p.shape, block) if self._is_matrix(p) else None for p in params}
        for p in params:
            self._init_state(group, p, layouts[p])
        states = [self.state[p] for p in params]
        # FSDP2: element-wise work on the DTensors' local rows (views sharing their storage);
        # ``keys`` (the parameters) index the state and give the whole shapes.
        keys, params = params, [shards.local(p) for p in params]
        param_dtype = params[0].dtype
        compute = compute_dtype(param_dtype, states[0]["exp_avg"].dtype)
        low = param_dtype != compute
        comps = []
        if group["kahan"] and param_dtype in precision.LOW_PRECISION:
            for p, s in zip(keys, states):
                if KAHAN_KEY not in s:
                    s[KAHAN_KEY] = torch.zeros_like(p, memory_format=torch.preserve_format)
                comps.append(shards.local(s[KAHAN_KEY]))

        steps = [s["step"] for s in states]
        exp_avgs = [shards.local(s["exp_avg"]) for s in states]
        exp_avg_sqs = [shards.local(s["exp_avg_sq"]) for s in states]
        matrices = [i for i, p in enumerate(keys) if layouts[p] is not None]
        refresh, active = _advance_schedule(states, matrices, start, every)
        # A skip flag (a 0-d device tensor) masks every write: the gradients are zeroed and
        # each decay/weight becomes exactly 1/0 where the flag is set, so parameters and state
        # keep their bits without a snapshot (see _Mask).
        mask = None if skip is None else _Mask(skip, params[0].device)

        grads = as_dtype([shards.local(p.grad) for p in keys], compute)
        if mask is not None:
            # A skipped step's gradients may hold NaN/Inf: zero them on the device (eigh
            # never sees a non-finite statistic, and 0·g terms vanish).
            grads = [g.masked_fill(mask.drop, 0.0) for g in grads]
        if group["maximize"]:
            grads = torch._foreach_neg(grads)
        torch._foreach_add_(steps, 1.0 if mask is None else _each(steps, mask.keep(steps[0].dtype)))
        if group["weight_decay"] != 0 and not low:
            decay = 1.0 - lr * group["weight_decay"]
            torch._foreach_mul_(
                params, decay if mask is None else mask.select(decay, 1.0, param_dtype)
            )
        m, v = as_dtype(exp_avgs, compute), as_dtype(exp_avg_sqs, compute)
        first = 1.0 - beta1
        torch._foreach_lerp_(
            m, grads, first if mask is None else _each(m, mask.select(first, 0.0, compute))
        )
        torch._foreach_mul_(v, beta2 if mask is None else mask.select(beta2, 1.0, compute))
        torch._foreach_addcmul_(v, grads, grads, value=1.0 - beta2)  # 0 where skipped
        if m is not exp_avgs:  # stored once in the state dtype
            torch._foreach_copy_(exp_avgs, m)
            torch._foreach_copy_(exp_avg_sqs, v)

        # Bias corrections as device scalars: 1 - β₁ᵗ and sqrt(1 - β₂ᵗ).
        correction1, correction2 = adam_bias_corrections(beta1, beta2, steps)
        # Adam's direction A = (m/c₁) / (sqrt(v)/sqrt(c₂) + eps), and the momentum m̂ = m/c₁.
        momentum = torch._foreach_div(m, correction1)
        denominator = torch._foreach_sqrt(v)
        torch._foreach_div_(denominator, torch._foreach_sqrt(correction2))
        torch._foreach_add_(denominator, group["eps"])
        directions = list(torch._foreach_div(momentum, denominator))

        if matrices:
            # FSDP2 matrices: whole-matrix work spread over the ranks (backends/_shampoo_fsdp)
            sharded = _shampoo_fsdp.split(keys, matrices)
            for process_group, indices in sharded.items():
                if process_group is None:
                    continue
                _shampoo_fsdp.directions_(
                    self, group, process_group, keys, indices, grads, momentum, directions,
                    refresh, active, correction2, layouts, beta2, mask,
                )
            if len(sharded) > 1 or None not in sharded:  # the whole matrices remain below
                whole = set(sharded.get(None, []))
                matrices = [i for i in matrices if i in whole]
                refresh = [i for i in refresh if i in whole]
                active = [i for i in active if i in whole]
        if matrices:
            self._update_statistics(
                [keys[i] for i in matrices], [grads[i] for i in matrices], layouts, beta2, mask
            )
            if refresh:
                self._refresh_roots(
                    group, [keys[i] for i in refresh], [correction2[i] for i in refresh], mask
                )
            if active:
                shampoo = self._precondition(
                    group,
                    [keys[i] for i in active],
                    [momentum[i] for i in active],
                    [directions[i] for i in active],
                    layouts,
                )
                for i, direction in zip(active, shampoo):
                    directions[i] = direction.to(compute)
        if mask is not None:  # exactly 0 where skipped (torch.where: even if D were not finite)
            directions = [torch.where(mask.drop, 0.0, d) for d in directions]
        if not low:
            torch._foreach_add_(params, directions, alpha=-lr)
        else:
            # d = −lr·D − lr·λ·θ in the compute dtype, then one rounding into θ
            deltas = torch._foreach_mul(directions, -lr)
            if group["weight_decay"] != 0:
                decay = -lr * group["weight_decay"]
                if mask is not None:
                    decay = mask.select(decay, 0.0, compute)
                torch._foreach_add_(deltas, torch._foreach_mul(as_dtype(params, compute), decay))
            write_params_(params, deltas, comps, None if mask is None else mask.drop)
        if skip is not None:
            count_skips_(self.state, keys, skip)

    def _update_statistics(
        self, params: list[Tensor], grads: list[Tensor], layouts: dict, beta2: float,
        mask: _Mask | None = None,
    ) -> None:
        """``L ← β₂L + (1-β₂)GGᵀ``, ``R ← β₂R + (1-β₂)GᵀG``, batched over same-shaped blocks."""
        items = list(zip(params, grads))
        by_shape = _bucket(
            items,
            lambda pg: (layouts[pg[0]].rows, layouts[pg[0]].cols, self.state[pg[0]]["left"].dtype),
        )
        for (_, _, dtype), bucket in by_shape.items():
            blocks = _cat([layouts[p].to_blocks(g).to(dtype) for p, g in bucket])
            counts = [layouts[p].count for p, _ in bucket]
            gram_left = torch.bmm(blocks, blocks.mT).split(counts)
            gram_right = torch.bmm(blocks.mT, blocks).split(counts)
            lefts = [self.state[p]["left"] for p, _ in bucket]
            rights = [self.state[p]["right"] for p, _ in bucket]
            weight = 1.0 - beta2 if mask is None else mask.select(1.0 - beta2, 0.0, dtype)
            torch._foreach_lerp_(lefts, list(gram_left), _each(lefts, weight))
            torch._foreach_lerp_(rights, list(gram_right), _each(rights, weight))

    def _refresh_roots(
        self, group: dict[str, Any], params: list[Tensor], corrections: list[Tensor],
        mask: _Mask | None = None,
    ) -> None:
        """Recompute ``(L̂ + ρI)^{-1/4}`` and ``(R̂ + ρI)^{-1/4}``, one batched call per size."""
        jobs = []  # (statistic, target root, bias correction)
        for p, correction in zip(params, corrections):
            state = self.state[p]
            jobs.append((state["left"], state["left_root"], correction))
            jobs.append((state["right"], state["right_root"], correction))
        for _, bucket in _bucket(jobs, lambda j: (j[0].shape[-1], j[0].dtype)).items():
            stats = []
            for statistic, _, correction in bucket:
                stats.append(statistic / correction.to(statistic.dtype))
            roots = matrix_inverse_root(
                _cat(stats),
                4,
                eps=group["matrix_eps"],
                method=group["root_method"],
                newton_iterations=group["newton_iterations"],
            )
            targets = [target for _, target, _ in bucket]
            fresh = list(roots.split([t.shape[0] for t in targets]))
            if mask is not None:  # keep the old roots where the step is skipped
                fresh = [torch.where(mask.drop, t, r) for t, r in zip(targets, fresh)]
            torch._foreach_copy_(targets, fresh)

    def _precondition(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        momentum: list[Tensor],
        adam: list[Tensor],
        layouts: dict,
    ) -> list[Tensor]:
        """``L̂^{-1/4} m̂ R̂^{-1/4}`` per block, grafted to Adam's per-block norm."""
        out: dict[int, Tensor] = {}
        order = list(range(len(params)))
        by_shape = _bucket(
            order,
            lambda i: (layouts[params[i]].rows, layouts[params[i]].cols,
                       self.state[params[i]]["left_root"].dtype),
        )
        graft = group["grafting"] == "adam"
        for (_, _, dtype), bucket in by_shape.items():
            lay = [layouts[params[i]] for i in bucket]
            states = [self.state[params[i]] for i in bucket]
            blocks = _cat([lay_i.to_blocks(momentum[i]).to(dtype) for lay_i, i in zip(lay, bucket)])
            left = _cat([s["left_root"] for s in states])
            right = _cat([s["right_root"] for s in states])
            direction = torch.bmm(torch.bmm(left, blocks), right)
            if graft:
                adam_blocks = _cat(
                    [lay_i.to_blocks(adam[i]).to(dtype) for lay_i, i in zip(lay, bucket)]
                )
                adam_norm = torch.linalg.matrix_norm(adam_blocks)
                shampoo_norm = torch.linalg.matrix_norm(direction).clamp_min(_floor(dtype))
                direction = direction * (adam_norm / shampoo_norm)[:, None, None]
            pieces = direction.split([lay_i.count for lay_i in lay])
            for i, lay_i, piece in zip(bucket, lay, pieces):
                out[i] = lay_i.from_blocks(piece).to(adam[i].dtype)
        return [out[i] for i in order]

    # -- checkpoints ---------------------------------------------------------------------

    def _state_spec(self, group: dict[str, Any], p: Tensor) -> Spec:
        """The state keys of a parameter with state: ``{key: (shape, dtype)}`` or ``int``."""
        state_dtype = precision.resolve_state_dtype(p.dtype, group["state_dtype"])
        spec: Spec = {
            "step": ((), step_dtype(p)),
            "host_step": int,
            "exp_avg": (tuple(p.shape), state_dtype),
            "exp_avg_sq": (tuple(p.shape), state_dtype),
        }
        if self._is_matrix(p):
            layout = _layout(p.shape, group["max_preconditioner_dim"])
            dtype = self._matrix_dtype(group, p)
            left = ((layout.count, layout.rows, layout.rows), dtype)
            right = ((layout.count, layout.cols, layout.cols), dtype)
            spec.update(left=left, right=right, left_root=left, right_root=right)
        return spec

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this optimizer: checked first, then loaded, or nothing changes.

        torch's rules (saved hyperparameters replace the groups'; state not keyed by a
        parameter index, e.g. written by a hook, is kept as it is), except that every state
        tensor is copied to its parameter's device in the dtype Shampoo keeps it in (torch's
        loader casts floating state to the parameter's dtype, which would round the float32
        preconditioners of bf16 parameters). A state dict of another model or optimizer
        (wrong parameter count, shapes, block size, missing or unknown keys) raises a
        ``ValueError`` naming the parameter index, the key and the shapes.
        """
        load_checked(self, state_dict, "Shampoo", _check_group, self._state_spec, _DTYPE_KEYS)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """torch's state dict, with the groups' ``preconditioner_dtype`` and ``state_dtype``
        saved by name (``"float64"``), as ``torch.distributed.checkpoint`` requires; either
        form loads."""
        return name_dtypes(super().state_dict(), _DTYPE_KEYS)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        fill_later_defaults(self)  # groups saved before these settings existed
