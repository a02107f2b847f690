r"""Second-order backend: Shampoo, Kronecker-factored preconditioning with grafting.

For a parameter whose gradient is viewed as a matrix ``G`` (``m × n``; a tensor of ``ndim > 2``
such as a conv weight is flattened to ``shape[0] × prod(shape[1:])``), Shampoo keeps two
statistics and preconditions with their inverse fourth roots::

    L ← L + G Gᵀ,  R ← R + Gᵀ G                            (β₂ = 1, the default: sums)
    L ← β₂·L + (1-β₂)·G Gᵀ,  R ← β₂·R + (1-β₂)·Gᵀ G        (β₂ < 1: L̂ = L/(1-β₂ᵗ))
    D = L̂^{-1/4} · M̂ · R̂^{-1/4}         M̂ = m/(1-β₁ᵗ), m ← β₁·m + (1-β₁)·G

with ``D`` rescaled per block to the norm of the grafted method's step. Matrices with a side
larger than ``max_preconditioner_dim`` are split into near-equal blocks of at most that size
(as in distributed_shampoo); each block has its own ``L`` and ``R``. 0-d and 1-D parameters
(biases, norms) take the grafted method's step.

Everything runs on the parameters' device. ``step()`` reads no tensor value on the host,
except on CUDA with ``root_method="eigh"``: torch's eigh synchronises there anyway, and the
float64 retry decision reads one flag right after it (see :func:`matrix_inverse_root`).
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
    check_choice,
    check_flag,
    check_float_dtype,
    check_int,
    check_nonneg,
    check_positive,
    check_precision,
    check_tuple,
    check_unit,
    real,
)

__all__ = ["Shampoo", "matrix_inverse_root"]

GRAFTINGS = ("adam", "adagrad", "sgd", "none")
ROOT_METHODS = ("eigh", "newton")
MOMENTUM_POSITIONS = ("before", "after")
# Group settings that hold a torch.dtype: saved by name (see Shampoo.state_dict).
_DTYPE_KEYS = ("preconditioner_dtype", "state_dtype")
# State keys of a preconditioned (matrix) parameter.
MATRIX_KEYS = ("left", "right", "left_root", "right_root")
# ... and with reuse_eigenbasis > 0, the factors' kept eigenvectors.
BASIS_KEYS = ("left_basis", "right_basis")


# -- the inverse root ---------------------------------------------------------------------

# The smallest relative ridge ``eps`` for which the roots are promised within 1e-3 relative
# error of the exact float64 root of the same statistic, rank-deficient statistics included
# (tests/backends/test_second_order_roots.py checks exactly these values). A backward-stable
# decomposition in a dtype of unit roundoff u perturbs the statistic by about u·‖A‖, i.e. the
# damped matrix A + ρI by u/eps relatively; the fourth root divides that by 4. float32
# (u = 6e-8): eps ≥ 3e-5 keeps it near 5e-4; float64 leaves room down to 1e-10.
MIN_EPS = {torch.float32: 3e-5, torch.float64: 1e-10}
# Newton iterations that cover these ridges (condition numbers up to 1 + 1/eps; fewer suffice
# for larger eps). The guard below catches a run that does not converge.
NEWTON_ITERATIONS = 40
# Devices whose ``torch.linalg.eigh`` already synchronises with the host (its convergence
# check): there, and only there, the float64 retry for negative eigenvalues below -eps is
# decided by one host read right after that synchronisation (see _eigh).
_EIGH_SYNC_DEVICES = ("cuda",)


def _floor(dtype: torch.dtype) -> float:
    """An absolute floor added to the ridge so that an all-zero statistic stays finite."""
    return torch.finfo(dtype).tiny ** 0.5


def _ridge(matrix: Tensor, eps: float) -> Tensor:
    """``ρ = eps·‖A‖_F + floor`` per matrix of the batch, shape ``(...,)``."""
    return eps * torch.linalg.matrix_norm(matrix) + _floor(matrix.dtype)


def _eigh(matrix: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` in ``matrix.dtype`` with a float64 retry, results in that dtype.

    Retried in float64 (the whole batch) when the decomposition fails (torch raises: its own
    convergence check, no extra host read) or, on devices whose eigh already synchronises
    (CUDA), when a matrix has an eigenvalue below ``-eps·‖A‖_F`` or a non-finite one: one
    host read of that flag right after eigh's synchronisation. Elsewhere (CPU, meta, inside
    ``torch.compile``) no value is read: negative eigenvalues are clamped to 0 by the caller
    and a non-finite decomposition is caught by the finiteness guard of the caller.
    """
    try:
        eigenvalues, vectors = torch.linalg.eigh(matrix)
    except RuntimeError:  # torch.linalg.LinAlgError: did not converge
        if matrix.dtype == torch.float64:
            raise
        eigenvalues, vectors = torch.linalg.eigh(matrix.double())
        return eigenvalues.to(matrix.dtype), vectors.to(matrix.dtype)
    if (
        matrix.dtype != torch.float64
        and matrix.device.type in _EIGH_SYNC_DEVICES
        and not torch.compiler.is_compiling()
    ):
        low = -eps * torch.linalg.matrix_norm(matrix)
        bad = (eigenvalues.amin(-1) < low) | ~torch.isfinite(eigenvalues).all(-1)
        if bad.any():  # eigh has just synchronised: this read waits for nothing more
            eigenvalues64, vectors64 = torch.linalg.eigh(matrix.double())
            eigenvalues = torch.where(bad[..., None], eigenvalues64.to(matrix.dtype), eigenvalues)
            vectors = torch.where(bad[..., None, None], vectors64.to(matrix.dtype), vectors)
    return eigenvalues, vectors


def _root_from_eigh(eigenvalues: Tensor, vectors: Tensor, ridge: Tensor, root: int) -> Tensor:
    """``Q diag((max(λ, 0) + ρ)^{-1/root}) Qᵀ``."""
    scale = (eigenvalues.clamp_min(0) + ridge.unsqueeze(-1)).pow(-1.0 / root)
    return (vectors * scale.unsqueeze(-2)) @ vectors.mT


def _refresh_basis(matrix: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """One QR-based power iteration (as SOAP): ``Q ← qr(A·Q_σ).Q``, ``λ = diag(Qᵀ A Q)``.

    Matmuls, a sort and a QR, no eigh. ``Q_σ``: the kept eigenvectors ordered by decreasing
    Rayleigh quotient, so that the QR's Gram–Schmidt keeps the dominant directions and
    orthogonalises the small ones against them (in eigh's ascending order the first column,
    the smallest eigenvalue's, is pulled toward the large ones: 49 % root error after one
    refresh on a 1e-2 drift, against 0.08 % sorted). Starting from the eigenvectors of a
    nearby statistic, ``Q`` tracks the slowly drifting eigenbasis.
    """
    product = matrix @ basis
    quotients = (basis * product).sum(-2)
    order = quotients.argsort(dim=-1, descending=True).unsqueeze(-2).expand_as(basis)
    q, _ = torch.linalg.qr(product.gather(-1, order))  # A·Q_σ: the product's columns, sorted
    eigenvalues = (q * (matrix @ q)).sum(-2)
    return eigenvalues, q


def _newton_root(
    damped: Tensor, root: int, iterations: int
) -> tuple[Tensor, Tensor]:
    """The coupled Newton iteration for ``B^{-1/root}`` with its convergence guard.

    ``z = (1+p)/(2‖B‖_F)``, ``X₀ = z^{1/p}·I``, ``M₀ = z·B``; repeat ``Mᵢ = ((p+1)·I − M)/p``,
    ``X ← X·Mᵢ``, ``M ← Mᵢᵖ·M`` (Guo & Higham 2006; Google's Scalable Shampoo). ``M``
    converges to ``I`` exactly when ``X`` converges to ``B^{-1/p}``. Returns ``(X, ok)``:
    ``X`` is the last iterate that was finite, ``ok`` (a bool tensor per matrix, on the
    device) says that ``B`` was finite and ``‖M − I‖_F ≤ 1e-3·√n`` at the end — the guard
    that a caller uses to keep its previous root with ``torch.where`` (no host read).
    """
    n = damped.shape[-1]
    identity = torch.eye(n, dtype=damped.dtype, device=damped.device)
    z = (1.0 + root) / (2.0 * torch.linalg.matrix_norm(damped))
    m_k = damped * z[..., None, None]
    x_k = identity * z.pow(1.0 / root)[..., None, None]
    for _ in range(iterations):
        m_i = ((root + 1.0) * identity - m_k) / root
        x_next = x_k @ m_i
        m_next = torch.linalg.matrix_power(m_i, root) @ m_k
        # keep the last finite iterate: a diverging run (κ beyond the dtype) turns Inf/NaN
        finite = (torch.isfinite(x_next).all((-2, -1)) & torch.isfinite(m_next).all((-2, -1)))
        x_k = torch.where(finite[..., None, None], x_next, x_k)
        m_k = torch.where(finite[..., None, None], m_next, m_k)
    residual = torch.linalg.matrix_norm(m_k - identity)
    ok = (residual <= 1e-3 * n**0.5) & torch.isfinite(damped).all((-2, -1))
    return x_k, ok


def matrix_inverse_root(
    matrix: Tensor,
    root: int = 4,
    *,
    eps: float = 1e-6,
    method: str = "eigh",
    newton_iterations: int = NEWTON_ITERATIONS,
    previous: Tensor | None = None,
) -> Tensor:
    r"""``(A + ρ·I)^{-1/root}`` for a (batch of) symmetric positive semi-definite ``A``.

    The ridge is relative to the statistic's scale: ``ρ = eps·‖A‖_F + floor`` (``floor`` =
    ``sqrt(finfo.tiny)``, only there to keep an all-zero ``A`` finite). Computed in
    ``matrix.dtype`` on ``matrix.device``, batched over leading dimensions.

    - ``method="eigh"``: ``A = Q diag(λ) Qᵀ`` (``torch.linalg.eigh``), then
      ``Q diag((max(λ, 0) + ρ)^{-1/root}) Qᵀ``. Retried in float64 when eigh fails (torch
      raises) and, on CUDA, when an eigenvalue is below ``-eps·‖A‖_F`` (see :func:`_eigh`).
      On CUDA torch's eigh synchronises internally (its convergence check); the retry
      decision adds one host read of a flag right after that synchronisation.
    - ``method="newton"``: the coupled Newton iteration (:func:`_newton_root`) on
      ``B = A + ρI``: matmuls only, a fixed number of iterations, no synchronisation at all.

    Accuracy (tested, rank-deficient ``A`` included): within 1e-3 relative error of the
    exact root for ``eps ≥ MIN_EPS[dtype]`` (float32: 3e-5, float64: 1e-10) with the default
    40 Newton iterations. Below that a float32 root is still finite but less accurate (about
    1.5e-8/eps relative for eigh).

    Guard: a root that is not finite (or a Newton run that did not converge, ``‖M − I‖`` >
    1e-3·√n, or a non-finite ``A``) is replaced, per matrix and on the device
    (``torch.where``, no host read), by ``previous`` when given, else by the last finite
    Newton iterate (eigh: by ``ρ^{-1/root}·I``).
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
    if previous is not None and previous.shape != matrix.shape:
        raise ValueError(
            f"matrix_inverse_root: previous has shape {tuple(previous.shape)}, expected "
            f"{tuple(matrix.shape)}"
        )
    ridge = _ridge(matrix, eps)
    if method == "eigh":
        result = _root_from_eigh(*_eigh(matrix, eps), ridge, root)
        ok = torch.isfinite(result).all((-2, -1))
        if previous is None:
            identity = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
            previous = identity * ridge.pow(-1.0 / root)[..., None, None]
    else:
        identity = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
        result, ok = _newton_root(matrix + ridge[..., None, None] * identity, root,
                                  newton_iterations)
        ok = ok & torch.isfinite(result).all((-2, -1))
        if previous is None:
            return result  # the last finite iterate
    return torch.where(ok[..., None, None], result, previous.to(result.dtype))


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
    states: list[dict[str, Any]], matrices: list[int], start: int, every: int, reuse: int = 0
) -> tuple[list[int], set[int], list[int]]:
    """Advance each ``host_step`` and return the matrices whose roots are recomputed now, those
    of them that need a full decomposition, and those preconditioned now.

    The root schedule counts ``step()`` calls on the host (no device read); a step skipped on
    the device still advances it (see :class:`Shampoo`). Kept out of ``torch.compile``'s
    graphs (one graph break): traced, the changing integer would recompile every step.
    With ``reuse = r > 0`` the recomputations ``0, r, 2r, …`` (counted from the start) are
    full eigendecompositions, the others refresh the kept eigenbasis; a parameter without a
    kept basis (state from before the option was set) gets a full one.
    """
    for state in states:
        state["host_step"] += 1
    refresh = [
        i for i in matrices
        if states[i]["host_step"] >= start and (states[i]["host_step"] - start) % every == 0
    ]
    full = set(refresh)
    if reuse:
        full = {
            i for i in refresh
            if ((states[i]["host_step"] - start) // every) % reuse == 0
            or "left_basis" not in states[i]
        }
    active = [i for i in matrices if states[i]["host_step"] >= start]
    return refresh, full, active


# -- the per-block math (statistics, roots, preconditioning) ------------------------------
# Pure functions of batches of same-shaped blocks; Shampoo.step() gathers the blocks of a
# group's parameters into batches and scatters the results back.


def update_block_statistics_(
    lefts: list[Tensor], rights: list[Tensor], blocks: Tensor, beta2: float,
    weight: Tensor | float | None = None,
) -> None:
    """``L ← β₂L + (1-β₂)·GGᵀ``, ``R ← β₂R + (1-β₂)·GᵀG`` for a batch of blocks ``G``.

    ``lefts``/``rights``: the factors of the batch's parameters, each ``(count_i, r, r)`` /
    ``(count_i, c, c)`` with ``Σ count_i = len(blocks)``. ``β₂ = 1``: ``L ← L + GGᵀ``
    (summed, AdaGrad-style statistics; a zero block, e.g. a skipped step's, adds exactly 0).
    ``weight`` replaces ``1 - β₂`` when given (a 0-d device tensor: 0 on a skipped step).
    """
    counts = [t.shape[0] for t in lefts]
    gram_left = list(torch.bmm(blocks, blocks.mT).split(counts))
    gram_right = list(torch.bmm(blocks.mT, blocks).split(counts))
    if beta2 == 1.0:
        torch._foreach_add_(lefts, gram_left)
        torch._foreach_add_(rights, gram_right)
        return
    weight = 1.0 - beta2 if weight is None else weight
    torch._foreach_lerp_(lefts, gram_left, _each(lefts, weight))
    torch._foreach_lerp_(rights, gram_right, _each(rights, weight))


def compute_block_roots(
    statistics: Tensor,
    previous: Tensor,
    *,
    eps: float,
    method: str,
    newton_iterations: int,
    keep_on_failure: bool,
    basis: Tensor | None = None,
    full: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """``(S + ρI)^{-1/4}`` for a batch of (bias-corrected) statistics ``S``.

    ``basis`` (eigenbasis reuse): the eigenvectors kept from the last decomposition. With
    ``full=True`` they are recomputed by eigh; with ``full=False`` refreshed by one QR power
    iteration (:func:`_refresh_basis`) and the root built in them — matmuls and a QR, no
    eigh. Returns ``(root, new basis or None)``.

    ``keep_on_failure``: a root that failed (non-finite, or Newton not converged) keeps
    ``previous`` (selected per matrix on the device); otherwise it is replaced by the
    fallback of :func:`matrix_inverse_root` (the last finite Newton iterate, or ρ^{-1/4}·I).
    """
    if basis is None:
        if keep_on_failure:
            root = matrix_inverse_root(
                statistics, 4, eps=eps, method=method, newton_iterations=newton_iterations,
                previous=previous,
            )
        else:
            root = matrix_inverse_root(
                statistics, 4, eps=eps, method=method, newton_iterations=newton_iterations
            )
        return root, None
    ridge = _ridge(statistics, eps)
    if full:
        eigenvalues, vectors = _eigh(statistics, eps)
    else:
        eigenvalues, vectors = _refresh_basis(statistics, basis)
    root = _root_from_eigh(eigenvalues, vectors, ridge, 4)
    ok = torch.isfinite(root).all((-2, -1))
    if not keep_on_failure:
        identity = torch.eye(statistics.shape[-1], dtype=root.dtype, device=root.device)
        previous = identity * ridge.pow(-0.25)[..., None, None]
    root = torch.where(ok[..., None, None], root, previous)
    vectors = torch.where(ok[..., None, None], vectors, basis)
    return root, vectors


def precondition_blocks(
    blocks: Tensor, left_root: Tensor, right_root: Tensor, graft: Tensor | None
) -> Tensor:
    """``P = L̂^{-1/4}·M·R̂^{-1/4}`` per block, scaled to ``‖graft block‖_F`` when ``graft``
    (the grafted method's direction, blocked the same way) is given: ``P·‖A‖/‖P‖``."""
    direction = torch.bmm(torch.bmm(left_root, blocks), right_root)
    if graft is None:
        return direction
    graft_norm = torch.linalg.matrix_norm(graft)
    norm = torch.linalg.matrix_norm(direction).clamp_min(_floor(direction.dtype))
    return direction * (graft_norm / norm)[:, None, None]


# -- validation ---------------------------------------------------------------------------


def _check_group(group: dict[str, Any], where: str = "") -> None:
    """Every hyperparameter of a group, with a message naming it, its range and ``where``."""
    owner = f"Shampoo ({where})" if where else "Shampoo"
    check_nonneg(owner, "lr", group["lr"])
    betas = check_tuple(owner, "betas", group["betas"], 2, names=("β₁ momentum", "β₂ statistics"))
    check_unit(owner, "betas[0]", betas[0])
    if not 0.0 <= real(owner, "betas[1]", betas[1]) <= 1.0:  # 1: summed (AdaGrad) statistics
        raise ValueError(
            f"{owner}: invalid betas[1]={betas[1]}, must satisfy 0 <= betas[1] <= 1"
        )
    check_unit(owner, "grafting_beta2", group["grafting_beta2"])
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
    check_int(owner, "reuse_eigenbasis", group["reuse_eigenbasis"], low=0)
    check_choice(owner, "grafting", group["grafting"], GRAFTINGS)
    check_choice(owner, "root_method", group["root_method"], ROOT_METHODS)
    check_choice(owner, "momentum_position", group["momentum_position"], MOMENTUM_POSITIONS)
    check_flag(owner, "keep_root_on_failure", group["keep_root_on_failure"])
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
    r"""Shampoo with grafting, decoupled weight decay, blocked preconditioners and guarded roots.

    Per parameter, with ``t`` its step count and ``g`` its gradient (``-g`` if ``maximize``)::

        θ ← θ·(1 - lr·λ)                                      # decoupled weight decay
        m ← β₁·m + (1-β₁)·g,   M̂ = m/(1-β₁ᵗ)                   # momentum "before" (default)
        the grafted method's second moment and direction A:
          "adam":    v ← β_g·v + (1-β_g)·g²,  A = M̂ / (sqrt(v/(1-β_gᵗ)) + eps)
          "adagrad": v ← v + g²,               A = M̂ / (sqrt(v) + eps)
          "sgd":                               A = M̂
          "none":    as "adam" where a grafted step is taken (below), no rescaling otherwise

    1-D/0-d parameters, and every parameter before ``start_preconditioning_step``, take
    ``θ ← θ - lr·A`` (with the defaults, AdamW exactly). For a matrix view ``G`` of ``g``, per
    block::

        L ← β₂·L + (1-β₂)·G Gᵀ,  R ← β₂·R + (1-β₂)·Gᵀ G       # β₂ < 1: moving averages
        L ← L + G Gᵀ,            R ← R + Gᵀ G                  # β₂ = 1: sums (AdaGrad-style)
        P = L̂^{-1/4} · M̂ · R̂^{-1/4}      L̂ = L/(1-β₂ᵗ) (β₂ < 1),  L̂ = L (β₂ = 1)
        D = P·‖A‖_F/‖P‖_F  (grafting "adam", "adagrad", "sgd")   or   D = P  ("none")
        θ ← θ - lr·D

    ``momentum_position="after"`` moves the momentum after the preconditioner (Distributed
    Shampoo's ``momentum``, as opposed to its ``betas[0]`` gradient filtering, which is our
    default "before"): ``D`` and ``A`` are then computed from ``g`` itself, and the update
    uses ``M̂`` with ``m ← β₁·m + (1-β₁)·D`` (bias-corrected as above), for every parameter.

    The roots ``(L̂ + ρI)^{-1/4}`` (see :func:`matrix_inverse_root`, ``ρ = matrix_eps·‖L̂‖_F``)
    are recomputed at the parameter's steps ``t = start, start + k, start + 2k, …``
    (``k = precondition_frequency``) and reused in between. Grafting is per block (per
    layer when the matrix fits in one block), as in distributed_shampoo: Shampoo picks the
    direction, the grafted method the step size, so its learning rate carries over.

    **Defaults, and why.** Measured on the rotated, ill-conditioned quadratic
    ``½‖A W B − C‖²_F`` (8×8, Hessian condition number 1e4; the test of
    ``tests/backends/test_second_order_convergence.py``): steps to 1e-3 of the initial loss
    at the best lr of the grid {1e-3, 3e-3, …, 10}, roots every step from step 1, seeds 0/1/2::

        torch Adam (tuned)                                  87 / 71 / 61
        pytorch-optimizer Shampoo (summed, no momentum)     24 / 17
        β = (0.9, 0.999), Adam grafting  (the old default)  55 / 53
        β = (0.9, 1),     Adam grafting                     55 / 53
        β = (0, 0.999),   no grafting                      137 / 49 / 43
        β = (0, 1),       no grafting                       24 / 17       (= the peer)
        β = (0, 1),       AdaGrad grafting                  13 / 14 / 9
        β = (0.5, 1),     AdaGrad grafting                  20 / 15 / 11
        β = (0.5, 1),     Adam grafting    (the default)    22 / 17 / 12
        the default under E(α = 0.5, β = 0.01)              14 / 21 / 12
        β = (0.9, 1),     momentum "after"                  42 / 46

    β₂ = 1 (summed statistics, Distributed Shampoo's default): the exponential average with
    bias correction is dominated by the last gradients, which on a converging run all lie
    along the least-curved directions; without grafting it needs 137 steps where the sum
    needs 24. With grafting the step size comes from the grafted method and β₂ matters less
    here, so the sum is chosen for the direction it gives. β₁ = 0.5: Adam's 0.9 averages
    over ~10 steps of a trajectory that, preconditioned, converges in ~20, and costs 2.5-3×
    the steps; 0.5 keeps some averaging of gradient noise for stochastic training and
    costs about what none does (β = (0, 1), Adam grafting: 13 / 21 / 10). Adam grafting
    (β_g = ``grafting_beta2`` = 0.999) rather than AdaGrad's, slightly faster here: it keeps
    Adam's learning-rate scale for users moving from Adam/AdamW (1-D parameters and the
    steps before the start take Adam's step), and AdaGrad's ever-shrinking step needs a
    retuned schedule.

    Args:
        params: parameters or param groups (every argument below may be set per group).
        lr: learning rate ``lr >= 0``.
        betas: ``(β₁, β₂)``: β₁ in ``[0, 1)`` for the momentum ``m`` (bias-corrected), β₂ in
            ``[0, 1]`` for ``L`` and ``R`` (1: summed, no bias correction).
        eps: the grafted method's denominator term, ``> 0``.
        matrix_eps: relative ridge of the inverse roots, ``> 0``. Roots are accurate to 1e-3
            for ``matrix_eps >= 3e-5`` in float32 and ``>= 1e-10`` in float64 (``MIN_EPS``);
            smaller values are allowed (finite, guarded) but less accurate.
        weight_decay: decoupled weight decay ``λ >= 0`` (AdamW style).
        precondition_frequency: recompute the inverse roots every ``k >= 1`` steps.
        start_preconditioning_step: the first step (``>= 1``) that uses Shampoo's direction;
            steps before it are the grafted method's.
        max_preconditioner_dim: largest side of a preconditioner; larger matrix sides are
            split into near-equal blocks (``>= 1``).
        grafting: ``"adam"`` (default), ``"adagrad"``, ``"sgd"`` or ``"none"`` (raw Shampoo
            direction; 1-D parameters and steps before the start then use Adam).
        grafting_beta2: Adam grafting's β₂ in ``[0, 1)`` (default 0.999); unused by the
            other graftings.
        root_method: ``"eigh"`` (default; float64 retry, see :func:`matrix_inverse_root`) or
            ``"newton"`` (coupled Newton iteration, matmuls only, no synchronisation even on
            CUDA).
        newton_iterations: iterations of the Newton method (``>= 1``).
        reuse_eigenbasis: ``0`` (default): every recomputation is a full root. ``r >= 1``:
            the factors' eigenvectors are kept; every ``r``-th recomputation is a full eigh,
            the others refresh the kept eigenvectors by one QR power iteration and build the
            root in them (matmuls and a QR, no eigh; as SOAP). Two more ``r×r``/``c×c``
            tensors per block (``left_basis``/``right_basis``). Full decompositions use eigh
            whatever ``root_method`` says.
        keep_root_on_failure: a recomputed root that is not finite (or a Newton run that did
            not converge) keeps the previous root, chosen per block on the device (default
            True). False: the fallback of :func:`matrix_inverse_root`.
        momentum_position: ``"before"`` (default) or ``"after"`` the preconditioner.
        preconditioner_dtype: dtype of ``L``, ``R`` and their roots: ``None`` (float32, or
            float64 for float64 parameters), ``torch.float32`` or ``torch.float64``.
        maximize: maximise the objective.
        state_dtype: dtype of the moments (and, when ``preconditioner_dtype`` is None, at
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
    ``R``, the roots and bases — is left bit-identical by masked updates (gradients zeroed on
    the device, each decay and weight selected to exactly 1 or 0, new roots and Kahan writes
    selected with ``torch.where``): no copy of the state, and no host read. ``host_step``,
    the host-side clock that schedules root recomputations, counts ``step()`` calls and
    cannot see the device's decision: it advances on a skipped step, so a recomputation
    that falls on a skipped step is dropped (the roots stay one period older).

    State per parameter: ``step`` (a 0-d tensor on the parameter's device, float32, or
    float64 for float64 parameters, used for the bias corrections), ``host_step`` (the same
    count as a Python int: it schedules the root recomputations without reading the device,
    and is saved in the state dict), ``exp_avg``, ``exp_avg_sq`` (the grafted method's second
    moment; kept for every grafting) and, for matrices, ``left``/``right`` (``blocks × r ×
    r``, ``blocks × c × c``), ``left_root``/``right_root`` and, with ``reuse_eigenbasis``,
    ``left_basis``/``right_basis``.

    Host reads: none inside ``step()`` with ``root_method="newton"``. With ``"eigh"``, on
    CUDA, torch's eigh synchronises once per recomputation (its convergence check) and the
    float64 retry decision reads one flag right after it; on CPU and meta nothing is read.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.5, 1.0),
        eps: float = 1e-8,
        matrix_eps: float = 1e-6,
        weight_decay: float = 0.0,
        precondition_frequency: int = 10,
        start_preconditioning_step: int = 10,
        max_preconditioner_dim: int = 1024,
        grafting: str = "adam",
        root_method: str = "eigh",
        newton_iterations: int = NEWTON_ITERATIONS,
        preconditioner_dtype: torch.dtype | None = None,
        *,
        grafting_beta2: float = 0.999,
        reuse_eigenbasis: int = 0,
        keep_root_on_failure: bool = True,
        momentum_position: str = "before",
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
            grafting_beta2=grafting_beta2,
            root_method=root_method,
            newton_iterations=newton_iterations,
            reuse_eigenbasis=reuse_eigenbasis,
            keep_root_on_failure=keep_root_on_failure,
            momentum_position=momentum_position,
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
            if group["reuse_eigenbasis"]:
                self._init_bases(state)

    @staticmethod
    def _init_bases(state: dict[str, Any]) -> None:
        """Identity bases (replaced by the first full decomposition)."""
        state["left_basis"] = state["left_root"].clone()
        state["right_basis"] = state["right_root"].clone()

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
        if "left_basis" in state or "right_basis" in state:
            expected["left_basis"], expected["right_basis"] = expected["left"], expected["right"]
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
        grafting = group["grafting"]
        graft_beta2 = group["grafting_beta2"]
        after = group["momentum_position"] == "after"
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
        refresh, full, active = _advance_schedule(
            states, matrices, start, every, group["reuse_eigenbasis"]
        )
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
        first_weight = first if mask is None else _each(m, mask.select(first, 0.0, compute))
        # The grafted method's second moment: Adam's average or AdaGrad's sum (SGD: none).
        if grafting in ("adam", "none"):
            torch._foreach_mul_(
                v, graft_beta2 if mask is None else mask.select(graft_beta2, 1.0, compute)
            )
            torch._foreach_addcmul_(v, grads, grads, value=1.0 - graft_beta2)  # 0 if skipped
        elif grafting == "adagrad":
            torch._foreach_addcmul_(v, grads, grads)  # + 0 where skipped: bits kept

        # Bias corrections as device scalars: 1 - β₁ᵗ and 1 - β_gᵗ.
        correction1, graft_correction = adam_bias_corrections(beta1, graft_beta2, steps)
        if not after:  # momentum before the preconditioner (gradient filtering)
            torch._foreach_lerp_(m, grads, first_weight)
            filtered = torch._foreach_div(m, correction1)
        else:
            filtered = grads
        # The grafted method's direction A (SGD: the filtered gradient itself).
        if grafting == "sgd":
            directions = list(filtered)
        else:
            denominator = torch._foreach_sqrt(v)
            if grafting != "adagrad":
                torch._foreach_div_(denominator, torch._foreach_sqrt(graft_correction))
            torch._foreach_add_(denominator, group["eps"])
            directions = list(torch._foreach_div(filtered, denominator))

        if matrices:
            # FSDP2 matrices: whole-matrix work spread over the ranks (backends/_shampoo_fsdp)
            sharded = _shampoo_fsdp.split(keys, matrices)
            for process_group, indices in sharded.items():
                if process_group is None:
                    continue
                _shampoo_fsdp.directions_(
                    self, group, process_group, keys, indices, grads, filtered, directions,
                    refresh, full, active, steps, layouts, beta2, mask,
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
                    group, [keys[i] for i in refresh], [steps[i] for i in refresh],
                    [i in full for i in refresh], mask,
                )
            if active:
                shampoo = self._precondition(
                    group,
                    [keys[i] for i in active],
                    [filtered[i] for i in active],
                    [directions[i] for i in active],
                    layouts,
                )
                for i, direction in zip(active, shampoo):
                    directions[i] = direction.to(compute)
        if after:  # momentum after the preconditioner, on the update direction
            torch._foreach_lerp_(m, directions, first_weight)
            directions = list(torch._foreach_div(m, correction1))
        if m is not exp_avgs:  # stored once in the state dtype
            torch._foreach_copy_(exp_avgs, m)
        if v is not exp_avg_sqs and grafting != "sgd":
            torch._foreach_copy_(exp_avg_sqs, v)
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
        """The factors' update (:func:`update_block_statistics_`), batched over same-shaped
        blocks of all parameters."""
        items = list(zip(params, grads))
        by_shape = _bucket(
            items,
            lambda pg: (layouts[pg[0]].rows, layouts[pg[0]].cols, self.state[pg[0]]["left"].dtype),
        )
        for (_, _, dtype), bucket in by_shape.items():
            blocks = _cat([layouts[p].to_blocks(g).to(dtype) for p, g in bucket])
            lefts = [self.state[p]["left"] for p, _ in bucket]
            rights = [self.state[p]["right"] for p, _ in bucket]
            weight = None
            if mask is not None and beta2 != 1.0:
                weight = mask.select(1.0 - beta2, 0.0, dtype)
            update_block_statistics_(lefts, rights, blocks, beta2, weight)

    def _refresh_roots(
        self, group: dict[str, Any], params: list[Tensor], steps: list[Tensor],
        full: list[bool], mask: _Mask | None = None,
    ) -> None:
        """Recompute ``(L̂ + ρI)^{-1/4}`` and ``(R̂ + ρI)^{-1/4}`` (:func:`compute_block_roots`),
        one batched call per size; ``L̂ = L/(1-β₂ᵗ)``, or ``L`` itself when β₂ = 1."""
        beta2 = group["betas"][1]
        reuse = group["reuse_eigenbasis"] > 0
        corrections: list[Tensor | None] = [None] * len(params)
        if beta2 != 1.0:
            corrections = list(torch._foreach_pow(beta2, steps))
            torch._foreach_neg_(corrections)
            torch._foreach_add_(corrections, 1.0)
        jobs = []  # (statistic, root, basis or None, correction or None, full)
        for p, correction, is_full in zip(params, corrections, full):
            state = self.state[p]
            if reuse and "left_basis" not in state:
                self._init_bases(state)  # state from before the option was set
            for side in ("left", "right"):
                basis = state[f"{side}_basis"] if reuse else None
                jobs.append((state[side], state[f"{side}_root"], basis, correction, is_full))
        for (_, dtype, is_full), bucket in _bucket(
            jobs, lambda j: (j[0].shape[-1], j[0].dtype, j[4])
        ).items():
            stats = []
            for statistic, _, _, correction, _ in bucket:
                stats.append(
                    statistic if correction is None else statistic / correction.to(dtype)
                )
            targets = [j[1] for j in bucket]
            previous = _cat(targets)
            bases = [j[2] for j in bucket] if reuse else []
            roots, vectors = compute_block_roots(
                _cat(stats),
                previous,
                eps=group["matrix_eps"],
                method=group["root_method"],
                newton_iterations=group["newton_iterations"],
                keep_on_failure=group["keep_root_on_failure"],
                basis=_cat(bases) if reuse else None,
                full=is_full,
            )
            sizes = [t.shape[0] for t in targets]
            fresh = list(roots.split(sizes))
            if mask is not None:  # keep the old roots where the step is skipped
                fresh = [torch.where(mask.drop, t, r) for t, r in zip(targets, fresh)]
            torch._foreach_copy_(targets, fresh)
            if vectors is not None:
                new_bases = list(vectors.split(sizes))
                if mask is not None:
                    new_bases = [torch.where(mask.drop, b, n) for b, n in zip(bases, new_bases)]
                torch._foreach_copy_(bases, new_bases)

    def _precondition(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        momentum: list[Tensor],
        graft: list[Tensor],
        layouts: dict,
    ) -> list[Tensor]:
        """:func:`precondition_blocks` per block, grafted to the grafted method's per-block
        norm (``grafting != "none"``)."""
        out: dict[int, Tensor] = {}
        order = list(range(len(params)))
        by_shape = _bucket(
            order,
            lambda i: (layouts[params[i]].rows, layouts[params[i]].cols,
                       self.state[params[i]]["left_root"].dtype),
        )
        grafted = group["grafting"] != "none"
        for (_, _, dtype), bucket in by_shape.items():
            lay = [layouts[params[i]] for i in bucket]
            states = [self.state[params[i]] for i in bucket]
            blocks = _cat([lay_i.to_blocks(momentum[i]).to(dtype) for lay_i, i in zip(lay, bucket)])
            graft_blocks = None
            if grafted:
                graft_blocks = _cat(
                    [lay_i.to_blocks(graft[i]).to(dtype) for lay_i, i in zip(lay, bucket)]
                )
            direction = precondition_blocks(
                blocks,
                _cat([s["left_root"] for s in states]),
                _cat([s["right_root"] for s in states]),
                graft_blocks,
            )
            pieces = direction.split([lay_i.count for lay_i in lay])
            for i, lay_i, piece in zip(bucket, lay, pieces):
                out[i] = lay_i.from_blocks(piece).to(graft[i].dtype)
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
            if group.get("reuse_eigenbasis"):
                spec.update(left_basis=left, right_basis=right)
        return spec

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this optimizer: checked first, then loaded, or nothing changes.

        torch's rules (saved hyperparameters replace the groups'; state not keyed by a
        parameter index, e.g. written by a hook, is kept as it is), except that every state
        tensor is copied to its parameter's device in the dtype Shampoo keeps it in (torch's
        loader casts floating state to the parameter's dtype, which would round the float32
        preconditioners of bf16 parameters). A state dict of another model or optimizer
        (wrong parameter count, shapes, block size, missing or unknown keys) raises a
        ``ValueError`` naming the parameter index, the key and the shapes. Groups saved
        before ``grafting_beta2``, ``reuse_eigenbasis``, ``keep_root_on_failure`` and
        ``momentum_position`` existed load with the behaviour they were saved with (see
        :meth:`__setstate__`).
        """
        load_checked(
            self, _with_later_settings(state_dict), "Shampoo", _check_group, self._state_spec,
            _DTYPE_KEYS,
        )

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """torch's state dict, with the groups' ``preconditioner_dtype`` and ``state_dtype``
        saved by name (``"float64"``), as ``torch.distributed.checkpoint`` requires; either
        form loads."""
        return name_dtypes(super().state_dict(), _DTYPE_KEYS)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            _fill_group(group)
        fill_later_defaults(self)  # groups saved before these settings existed


def _fill_group(group: dict[str, Any]) -> None:
    """Settings added with summed statistics (issue 13), as a group saved before them
    behaved: Adam grafting with the statistics' β₂, no eigenbasis reuse, roots replaced even
    when they fail, momentum before the preconditioner."""
    if "grafting_beta2" not in group and "betas" in group:
        group["grafting_beta2"] = group["betas"][1]
    group.setdefault("reuse_eigenbasis", 0)
    group.setdefault("keep_root_on_failure", False)
    group.setdefault("momentum_position", "before")


def _with_later_settings(state_dict: Any) -> Any:
    """``state_dict`` with its groups completed by :func:`_fill_group` (a shallow copy)."""
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("param_groups"), list):
        return state_dict
    groups = []
    for group in state_dict["param_groups"]:
        if isinstance(group, dict):
            group = dict(group)
            _fill_group(group)
        groups.append(group)
    return {**state_dict, "param_groups": groups}
