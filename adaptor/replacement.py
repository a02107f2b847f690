"""Step 2 of the generic algorithm: the gradient replacement, with one buffer per parameter.

The paper keeps the EMA ``a`` and the previous gradient ``g_{k-1}``::

    a_k = β·a_{k-1} + (1-β)·(g_k - g_{k-1}),     g̃_k = g_k + α·a_k,     a_0 = g_0 = 0

With ``s = 1-β`` and ``c_k = a_k - s·g_k`` the same sequence needs only ``c``::

    c_1 = 0,   c_{k+1} = β·c_k - s²·g_k,   g̃_k = (1 + α·s)·g_k + α·c_k

In place on the gradient ``g`` and the buffer ``c`` (``k₁ = 1 + α·s > 0`` because ``|α| < 1/s``)::

    g ← k₁·g + α·c
    c ← ((β + α·s)·c − s²·g) / k₁          # g is already g̃ here

``theory/README.md`` has the proof; the tests compare both forms in float64.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import types
from collections.abc import Sequence

import torch
import torch.fx.experimental._config  # use_duck_shape: see _no_duck_shapes
from torch import Tensor

# A tensor passed as α or β would make the bound check read the device; refuse it.
_REAL = (numbers.Real,)


def check_alpha_beta(alpha: object, beta: object, *, where: str = "") -> tuple[float, float]:
    """Validate ``0 <= β < 1`` and ``|α| < 1/(1-β)``; return them as floats.

    Raises ``TypeError`` for non-numbers and ``ValueError`` naming the bound otherwise.
    """
    suffix = f" ({where})" if where else ""
    for name, value in (("alpha", alpha), ("beta", beta)):
        if isinstance(value, bool) or not isinstance(value, _REAL):
            raise TypeError(
                f"explore {name} must be a real number (a Python float), got "
                f"{type(value).__name__}{suffix}"
            )
    alpha_f, beta_f = float(alpha), float(beta)  # type: ignore[arg-type]
    if not 0.0 <= beta_f < 1.0:
        raise ValueError(f"explore beta must satisfy 0 <= beta < 1, got beta={beta_f}{suffix}")
    bound = 1.0 / (1.0 - beta_f)
    if not math.isfinite(alpha_f) or not abs(alpha_f) < bound:
        raise ValueError(
            f"explore alpha must satisfy |alpha| < 1/(1-beta) = {bound:.6g} for beta={beta_f}, "
            f"got alpha={alpha_f}{suffix}"
        )
    return alpha_f, beta_f


def replacement_coefficients(alpha: float, beta: float) -> tuple[float, float, float]:
    """``(k₁, p, q)`` of the in-place form: ``g ← k₁·g + α·c``, ``c ← p·c + q·g̃``."""
    s = 1.0 - beta
    k1 = 1.0 + alpha * s
    return k1, (beta + alpha * s) / k1, -(s * s) / k1


# Near α = -1/(1-β), k₁ = 1 + α·(1-β) -> 0 and the in-place form's division by k₁ amplifies
# rounding by about 1/k₁ (k₁ = 1e-9 loses 9 digits). Below this k₁ the replacement keeps α·c
# in a temporary instead and divides by nothing: c ← β·c − s²·g, g ← k₁·g + (α·c)_old.
WELL_CONDITIONED_K1 = 0.125

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def work_dtype(buffer_dtype: torch.dtype) -> torch.dtype:
    """The dtype the replacement computes in: the buffer's, and at least float32.

    A bf16/fp16 gradient is read into it and ``g̃`` is written back with one rounding; a
    bf16/fp16 buffer (only with an explicit ``state_dtype``) is updated in float32 and
    rounded once. No Python scalar ever multiplies a low-precision tensor (on CPU torch
    would round the scalar to bf16 first: 0.99 → 0.98828).
    """
    return torch.float32 if buffer_dtype in _LOW_PRECISION else buffer_dtype


def _replace_lists_(grads: list[Tensor], buffers: list[Tensor], alpha: float, beta: float) -> None:
    """The replacement in place on same-dtype lists (the work dtype)."""
    k1, p, q = replacement_coefficients(alpha, beta)
    if k1 < WELL_CONDITIONED_K1:
        scaled = torch._foreach_mul(buffers, alpha)  # α·c_k, a temporary
        torch._foreach_mul_(buffers, beta)
        torch._foreach_add_(buffers, grads, alpha=-(1.0 - beta) ** 2)  # c_{k+1}
        torch._foreach_mul_(grads, k1)
        torch._foreach_add_(grads, scaled)  # g̃_k = k₁·g_k + α·c_k
        return
    torch._foreach_mul_(grads, k1)
    torch._foreach_add_(grads, buffers, alpha=alpha)
    torch._foreach_mul_(buffers, p)
    torch._foreach_add_(buffers, grads, alpha=q)


def replace_foreach_(
    grads: Sequence[Tensor],
    buffers: Sequence[Tensor],
    alpha: float,
    beta: float,
    skip: Tensor | None = None,
) -> None:
    """The replacement on lists of same-device tensors (one grad dtype, one buffer dtype).

    Computed in :func:`work_dtype` of the buffers; ``g̃`` is written into the gradients
    with one rounding. ``skip`` (a 0-d device tensor, 1 = skip) masks the buffer update:
    where it is 1 the buffers keep their bits (the gradients still receive ``g̃``, which the
    base then does not use). No host read.
    """
    grads, buffers = list(grads), list(buffers)
    work = work_dtype(buffers[0].dtype)
    g_work = grads if grads[0].dtype == work else [g.to(work) for g in grads]
    c_work = buffers if buffers[0].dtype == work else [c.to(work) for c in buffers]
    if skip is None:
        _replace_lists_(g_work, c_work, alpha, beta)
        if c_work is not buffers:
            torch._foreach_copy_(buffers, c_work)
    else:
        _replace_lists_masked_(g_work, c_work, buffers, alpha, beta, skip)
    if g_work is not grads:
        torch._foreach_copy_(grads, g_work)  # g̃ rounded once to the gradient's dtype


def _replace_lists_masked_(
    grads: list[Tensor],
    buffers: list[Tensor],
    targets: list[Tensor],
    alpha: float,
    beta: float,
    skip: Tensor,
) -> None:
    """As :func:`_replace_lists_`, but ``targets ← where(skip, targets, c_{k+1})``.

    ``buffers`` are the targets themselves or their work-dtype copies. The new buffer is
    formed per tensor in a temporary (the same operations in the same order as the
    unmasked form, so an unskipped step gives the same bits) and written with
    ``torch.where``: one tensor-sized temporary at a time, not a copy of all state.
    """
    k1, p, q = replacement_coefficients(alpha, beta)
    keep = skip.to(buffers[0].device, non_blocking=True) > 0
    near_bound = k1 < WELL_CONDITIONED_K1
    if near_bound:
        scaled = torch._foreach_mul(buffers, alpha)  # α·c_k
        news = []
        for c, g in zip(buffers, grads):  # c_{k+1} = β·c_k − s²·g_k (g before replacement)
            new = c * beta
            news.append(new.add_(g, alpha=-(1.0 - beta) ** 2))
        torch._foreach_mul_(grads, k1)
        torch._foreach_add_(grads, scaled)  # g̃_k = k₁·g_k + α·c_k
    else:
        torch._foreach_mul_(grads, k1)
        torch._foreach_add_(grads, buffers, alpha=alpha)  # g̃_k
        news = None
    for i, (c, target) in enumerate(zip(buffers, targets)):
        if news is not None:
            new = news[i]
        else:
            new = c * p
            new.add_(grads[i], alpha=q)  # c_{k+1} = p·c_k + q·g̃_k
        if target is c:
            torch.where(keep, c, new, out=c)
        else:  # a low-precision buffer: the old value is exact in the work dtype
            target.copy_(torch.where(keep, c, new))


def _replace_pointwise_(gs: list[Tensor], cs: list[Tensor], skip: Tensor | None, k1, alpha, p,
                        q) -> None:
    # One read of g and c and one write of each when compiled (the foreach chain needs four
    # passes over both). Computed in the work dtype, rounded once on each write. Where
    # ``skip`` is 1 the buffer is written back unchanged (bit-identical: the up-cast to the
    # work dtype and back is exact).
    for i in range(len(gs)):
        g, c = gs[i], cs[i]
        work = work_dtype(c.dtype)
        c_work = c.to(work)
        g_tilde = g.to(work) * k1 + c_work * alpha
        new = c_work * p + g_tilde * q
        c.copy_(new if skip is None else torch.where(skip > 0, c_work, new))
        g.copy_(g_tilde)


_compiled_kernels: dict[tuple[bool, int], object] = {}


def _kernel(masked: bool, count: int):
    """The compiled pointwise kernel for groups of ``count`` tensors, built on first use
    (compiling costs seconds)."""
    kernel = _compiled_kernels.get((masked, count))
    if kernel is None:
        # dynamic=True: one kernel for every shape; floats are not specialised in recent
        # torch, so scheduling α does not recompile. One code object per (masked, count)
        # (compile_variant), so that each stays within torch's recompile limit across
        # dtypes.
        tag = f"_{'masked' if masked else 'plain'}_{count}"
        kernel = _compiled_kernels[masked, count] = compile_variant(_replace_pointwise_, tag)
    return kernel


def kernel_scalars(device: torch.device, dtype: torch.dtype, *values: float) -> tuple:
    """Python floats as a compiled pointwise kernel should receive them on ``device``.

    On CPU: 0-d tensors of ``dtype``, the kernel's compute dtype. Inductor's C++ kernels take
    an unspecialised Python float as a float64 input and convert it to the compute dtype
    inside the loop, for every element and every scalar; a dozen such conversions made E's
    fused Adam pass compute-bound on one core (1.48 × torch's ``fused`` AdamW; 1.30 × with
    0-d float32 inputs, the same kernel otherwise). Each value is rounded here once, in
    double → ``dtype``, to the value the kernel rounded it to (and eager ATen rounds a Python
    scalar to for a ``dtype`` tensor), so the arithmetic is unchanged. The caller derives
    every coefficient (``1 − β`` …) in Python floats first: the same expression on a 0-d
    float32 tensor would round differently.

    Elsewhere (CUDA: Triton passes scalars as kernel arguments, no per-element cost; meta)
    the floats unchanged: a host-to-device copy per step would be dearer than what it saves.
    """
    if device.type != "cpu":
        return values
    # A fresh tensor per value and call (about 10 µs each): a cache by value would hand the
    # same object to two slots with equal values, which dynamo compiles as aliased inputs, a
    # recompile per pattern of equal coefficients (it hit the limit of 8 in the tests).
    return tuple(torch.tensor(float(v), dtype=dtype) for v in values)


def pack_scalars(
    device: torch.device, dtype: torch.dtype, named: dict[str, float | None]
) -> tuple[Tensor | tuple[float, ...], tuple[str, ...]]:
    """Named coefficients as ONE input of a compiled kernel, and the names present.

    Returns ``(values, layout)``: ``layout`` names the values that are not None, in order
    (a term that is None is left out of the kernel: the layout is a compile-time constant
    of its variant), and ``values`` holds them: on CPU one 1-d tensor of ``dtype``, each
    value rounded once from its Python double as :func:`kernel_scalars` rounds it; elsewhere
    a tuple of the floats. One tensor instead of a dozen 0-d ones: dynamo checks (and
    ``torch.tensor`` builds) one input instead of twelve, per call. The kernel reads a value
    with :func:`scalar`.
    """
    layout = tuple(name for name, value in named.items() if value is not None)
    floats = tuple(float(named[name]) for name in layout)  # type: ignore[arg-type]
    if device.type != "cpu":
        return floats, layout
    return torch.tensor(floats, dtype=dtype), layout


def scalar(values: Tensor | Sequence[float], layout: tuple[str, ...], name: str):
    """Inside a kernel: the value ``name`` of :func:`pack_scalars`, or None if absent."""
    return values[layout.index(name)] if name in layout else None


# Large tensors per compiled call: each call pays dynamo's guards and wrappers (about
# 0.1 ms on one CPU core, whatever the size), so a bucket of n large tensors is handed over
# FUSED_GROUP at a time (the remainder one by one: two tensor counts, hence at most two
# compiled graphs per variant). A group's graph holds one loop per tensor.
FUSED_GROUP = 4


def chunks(indices: list[int], sizes: tuple[int, ...] = (FUSED_GROUP,)) -> list[list[int]]:
    """``indices`` as groups of ``sizes[0]`` while they last, then of ``sizes[1]``, ...,
    then single ones (by default groups of FUSED_GROUP, then singles)."""
    groups, start = [], 0
    for size in sizes:
        while len(indices) - start >= size:
            groups.append(indices[start : start + size])
            start += size
    return groups + [[i] for i in indices[start:]]


def flat(t: Tensor) -> Tensor:
    """A contiguous tensor's elements as a 1-d tensor on the same storage, and not a view:
    dynamo guards a view's base (its rank and strides), so views would make a group's graph
    depend on the ranks of its tensors (a recompile per pattern of ranks)."""
    return t.view(-1).detach()


def _no_duck_shapes():
    """Dynamo's "duck sizing" gives equal sizes one symbol: a group's graph would then guard
    on which of its tensors have equal sizes (a recompile per pattern, toward the limit of
    8) and inductor would merge their loops. Off while a variant traces."""
    config = torch.fx.experimental._config  # imported above
    if not hasattr(config, "use_duck_shape"):  # a torch without the option
        return contextlib.nullcontext()
    return config.patch(use_duck_shape=False)


class _Variant:
    """A compiled variant: traced (on its first call for a device, dtype and the ranks of
    its first argument's tensors) without duck sizing, then called as it is (the config
    patch costs ~50 µs, more than the call)."""

    __slots__ = ("compiled", "traced_for")

    def __init__(self, compiled):
        self.compiled = compiled
        self.traced_for: set[tuple] = set()

    def __call__(self, *args, **kwargs):
        first = args[0] if isinstance(args[0], (list, tuple)) else [args[0]]
        where = (first[0].device, first[0].dtype, tuple(t.dim() for t in first))
        if where in self.traced_for:
            return self.compiled(*args, **kwargs)
        with _no_duck_shapes():
            result = self.compiled(*args, **kwargs)
        self.traced_for.add(where)
        return result


def compile_variant(function, tag: str, options: dict | None = None):
    """``torch.compile(function, dynamic=True, fullgraph=True)`` on a fresh copy of its code
    object (named ``function.__name__ + tag``), for one variant of a kernel's flags.

    Dynamo keeps its cache, and its recompile limit of 8 past which ``fullgraph=True``
    raises, per code object: variants sharing one would pay a recompile for every mix of
    flags, dtypes and devices and could exhaust the limit. Each copy only recompiles for a
    new dtype or device (sizes are symbolic and, without duck sizing, unrelated).
    """
    code = function.__code__.replace(co_name=f"{function.__name__}{tag}")
    copy = types.FunctionType(code, function.__globals__, code.co_name, function.__defaults__)
    copy.__kwdefaults__ = function.__kwdefaults__
    return _Variant(torch.compile(copy, dynamic=True, fullgraph=True, options=options))


def fused_supported(device: torch.device) -> bool:
    """Whether the compiled kernel can run on ``device`` (not on meta, not while tracing)."""
    if device.type not in ("cpu", "cuda"):
        return False
    return not torch.compiler.is_compiling()


# Tensors below this size go through the foreach path even when fused is requested:
# the per-call overhead of a compiled kernel outweighs its saved memory traffic there.
FUSED_MIN_NUMEL = 1 << 16


def replace_fused_(
    grads: Sequence[Tensor],
    buffers: Sequence[Tensor],
    alpha: float,
    beta: float,
    skip: Tensor | None = None,
) -> None:
    """The replacement with one compiled pass per large tensor, foreach for the small ones.

    Same contract as :func:`replace_foreach_` (work dtype, one rounding, ``skip`` mask).
    """
    k1, p, q = replacement_coefficients(alpha, beta)
    if k1 < WELL_CONDITIONED_K1:  # the kernel divides by k₁: see WELL_CONDITIONED_K1
        replace_foreach_(grads, buffers, alpha, beta, skip)
        return
    small_g, small_c = [], []
    # At least 2 elements: a one-element view would make dynamo specialise on size 1.
    threshold = max(FUSED_MIN_NUMEL, 2)
    # Per device and dtype pair: flat tensors (not views: dynamo guards a view's base), so
    # that a kernel compiles once per dtype pair and device, not once per rank
    # (fullgraph=True raises past torch's recompile limit of 8); FUSED_GROUP per call.
    buckets: dict[tuple[torch.device, torch.dtype, torch.dtype], list[tuple]] = {}
    for g, c in zip(grads, buffers):
        if g.numel() >= threshold and g.is_contiguous() and c.is_contiguous():
            buckets.setdefault((g.device, g.dtype, c.dtype), []).append((flat(g), flat(c)))
        else:
            small_g.append(g)
            small_c.append(c)
    with torch.no_grad():  # one grad mode: a change would recompile the kernel
        for (device, _, c_dtype), pairs in buckets.items():
            scalars = kernel_scalars(device, work_dtype(c_dtype), k1, alpha, p, q)
            for chunk in chunks(list(range(len(pairs)))):
                gs = [pairs[i][0] for i in chunk]
                cs = [pairs[i][1] for i in chunk]
                _kernel(skip is not None, len(chunk))(gs, cs, skip, *scalars)
    if small_g:
        replace_foreach_(small_g, small_c, alpha, beta, skip)
