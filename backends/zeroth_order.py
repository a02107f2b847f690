r"""Zero-order gradient estimation: SPSA (simultaneous perturbation stochastic approximation).

The gradient estimator φ of the generic E-adapted algorithm becomes a finite difference of
the loss along random directions, for models where backpropagation is unavailable or too
memory-hungry. For each of ``n`` samples a direction ``Δ`` (Rademacher ``±1`` or standard
Gaussian, one entry per parameter element) is drawn and

.. math::
    \hat g = \frac1n \sum_{s=1}^{n} \frac{f(θ + cΔ_s) - f(θ - cΔ_s)}{2c}\, Δ_s,
    \qquad \mathbb E[\hat g] = ∇f(θ) + O(c^2)

(exactly unbiased for a quadratic, since ``E[ΔΔᵀ] = I``). Use it with any base optimizer,
with or without the adaptor::

    opt = explore(SPSA(perturbation=1e-3), torch.optim.SGD(params, lr=1e-3), alpha=0.5, beta=0.01)
    loss = opt.step(closure)          # the closure only evaluates the loss (no backward)

    spsa, sgd = SPSA(), torch.optim.SGD(params, lr=1e-3)      # without the adaptor
    loss = spsa.estimate(closure, sgd.param_groups); sgd.step()

Memory is that of inference: the parameters are perturbed in place and ``Δ`` is regenerated
from a per-step seed instead of being stored. See :class:`SPSA` for the details.
"""

from __future__ import annotations

import copy
import numbers
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from adaptor.estimators import Closure, DeferredRestore, GradEstimator
from adaptor.replacement import (
    FUSED_MIN_NUMEL,
    chunks,
    compile_variant,
    fused_supported,
    kernel_scalars,
)
from adaptor.signs import WORD_BITS
from adaptor.signs import positive as _positive
from adaptor.signs import shift as _shift
from adaptor.signs import signed as _signed

DISTRIBUTIONS = ("rademacher", "gaussian")
_LOW_PRECISION = (torch.bfloat16, torch.float16)
_MASK64 = (1 << 64) - 1
_FUSED_DTYPES = (torch.float32, torch.float64)


def _mix(*values: int) -> int:
    """A 64-bit seed from integers (SplitMix64 finaliser, chained); host integers only."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state


def _block_seed(sample_seed: int, index: int, block: int) -> int:
    """The seed of block ``block`` of parameter ``index``, from ``mix(seed, step, sample)``."""
    return _mix(sample_seed ^ ((index << 24) & _MASK64), block)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# -- packed Rademacher signs ------------------------------------------------------------------
#
# A block of ``n`` elements draws ``ceil(n / 64)`` int64 words over the full 64-bit range
# (``random_(-2**63, None)``: every bit uniform and independent); element ``e`` of the block
# takes bit ``e mod 64`` (least significant first) of word ``e // 64``: ``Δ_e = 2·bit − 1``.
# Drawing one word per 64 elements instead of one value per element is what makes the draw
# cheap (on CPU it dominated the step).


def _words(n: int) -> int:
    """Packed words of a block of ``n`` elements."""
    return (n + WORD_BITS - 1) // WORD_BITS


def _unpack_bits_(out: Tensor, words: Tensor) -> Tensor:
    """``out[e] ← bit e mod 64 of words[e // 64]`` (0 or 1, in ``out``'s dtype), eagerly.

    Scratch: one byte per element (the unpacked bits), besides ``words`` (1/64 of that).
    """
    flat = out.view(-1)
    if sys.byteorder == "little":
        # byte b of a little-endian word holds its bits 8b … 8b+7: bytes then bits within
        octets = words.view(torch.uint8)
        shifts = torch.arange(8, dtype=torch.uint8, device=words.device)
    else:  # pragma: no cover - no big-endian CI
        octets = words
        shifts = torch.arange(WORD_BITS, dtype=torch.int64, device=words.device)
    bits = octets.unsqueeze(1).bitwise_right_shift(shifts).bitwise_and_(1)
    return flat.copy_(bits.view(-1)[: flat.numel()])


# The kernels take lists: a group of FUSED_GROUP tensors (or one) per call, each viewed as
# ``(len(words), 2, 32)``, one loop per tensor (dynamo's per-call cost, ~0.1 ms on a CPU
# core, is paid once per group: see adaptor.replacement.chunks).


def _shift_kernel(ps: list[Tensor], words: list[Tensor], scale: Tensor | float) -> None:
    """``θ ← θ + scale·Δ``: the eager arithmetic."""
    for i in range(len(ps)):
        ps[i].copy_(_shift(ps[i], _positive(words[i]), scale))


def _shift_grad_kernel(ps: list[Tensor], gs: list[Tensor], words: list[Tensor],
                       scale: Tensor | float, weight: Tensor | float) -> None:
    """``θ ← θ + scale·Δ`` and ``g ← weight·Δ`` in one pass over ``θ`` and ``g``."""
    for i in range(len(ps)):
        positive = _positive(words[i])
        ps[i].copy_(_shift(ps[i], positive, scale))
        gs[i].copy_(_signed(positive, weight, gs[i].dtype))


def _shift_accumulate_kernel(ps: list[Tensor], gs: list[Tensor], words: list[Tensor],
                             scale: Tensor | float, weight: Tensor | float) -> None:
    """``θ ← θ + scale·Δ`` and ``g ← g + weight·Δ`` in one pass over ``θ`` and ``g``."""
    for i in range(len(ps)):
        positive = _positive(words[i])
        ps[i].copy_(_shift(ps[i], positive, scale))
        gs[i].copy_(gs[i] + _signed(positive, weight, gs[i].dtype))


def _shift_grad_next_kernel(ps: list[Tensor], gs: list[Tensor], words: list[Tensor],
                            next_words: list[Tensor], scale: Tensor | float,
                            weight: Tensor | float) -> None:
    """``θ ← (θ + scale·Δ) + scale·Δ'`` and ``g ← weight·Δ``: one sample's restore and the
    next sample's ``+cΔ'`` (its words ``next_words``) in one pass, rounded as two passes."""
    for i in range(len(ps)):
        positive = _positive(words[i])
        ps[i].copy_(_shift(_shift(ps[i], positive, scale), _positive(next_words[i]), scale))
        gs[i].copy_(_signed(positive, weight, gs[i].dtype))


def _shift_accumulate_next_kernel(ps: list[Tensor], gs: list[Tensor], words: list[Tensor],
                                  next_words: list[Tensor], scale: Tensor | float,
                                  weight: Tensor | float) -> None:
    """``θ ← (θ + scale·Δ) + scale·Δ'`` and ``g ← g + weight·Δ`` in one pass."""
    for i in range(len(ps)):
        positive = _positive(words[i])
        ps[i].copy_(_shift(_shift(ps[i], positive, scale), _positive(next_words[i]), scale))
        gs[i].copy_(gs[i] + _signed(positive, weight, gs[i].dtype))


_KERNELS: dict[str, Callable[..., None]] = {
    "shift": _shift_kernel, "grad": _shift_grad_kernel, "accumulate": _shift_accumulate_kernel,
    "grad_next": _shift_grad_next_kernel, "accumulate_next": _shift_accumulate_next_kernel,
}
_compiled: dict[tuple[str, int], Callable[..., None]] = {}


def _kernel(kind: str, device: torch.device, count: int) -> Callable[..., None]:
    """The compiled kernel of ``kind`` for groups of ``count`` tensors (built on first use),
    or the same function uncompiled on meta and while an outer ``torch.compile`` traces (no
    nested compile)."""
    if not fused_supported(device):
        return _KERNELS[kind]
    kernel = _compiled.get((kind, count))
    if kernel is None:
        # One code object per kind and count (compile_variant): dynamo's cache and its
        # recompile limit of 8 are per code object, and each then only recompiles for a new
        # dtype or device. dynamic=True: one kernel for every size; the scalars (c, the
        # weight) come as kernel_scalars, 0-d tensors on CPU and floats on CUDA, neither
        # specialised.
        kernel = _compiled[kind, count] = compile_variant(_KERNELS[kind], f"_{count}")
    return kernel


class SPSA(GradEstimator):
    r"""SPSA gradient estimator for :func:`adaptor.explore`: the closure only evaluates the loss.

    .. math::
        g = \frac1n \sum_{s=1}^{n} \frac{f(θ + cΔ_s) - f(θ - cΔ_s)}{2c}\, Δ_s,\qquad
        Δ_s \sim \text{Rademacher } (\pm 1) \text{ or } \mathcal N(0, I)

    written into ``p.grad`` (overwritten, not accumulated) of every parameter of the param
    groups with ``requires_grad=True``; frozen parameters are neither perturbed nor given a
    gradient. The closure only computes the loss; it runs under ``torch.no_grad()`` and
    may return a 0-d (or one-element) tensor or a Python number. Since ``E[ΔΔᵀ] = I``
    the estimate is unbiased up to ``O(c²)`` (exactly for a quadratic);
    its per-coordinate variance for one sample is ``‖∇f‖² − (∇f)ᵢ²`` (Rademacher) or
    ``‖∇f‖² + (∇f)ᵢ²`` (Gaussian), divided by ``n``.

    **Returned loss.** ``estimate`` (and so ``step``) returns
    ``(1/n) Σ_s (f(θ+cΔ_s) + f(θ−cΔ_s))/2``, a second-order accurate estimate of ``f(θ)``:
    its error is ``(c²/2)·ΔᵀHΔ + O(c⁴)`` (``(c²/2)·tr H`` on average). No extra evaluation
    of ``f(θ)`` is made. It is a tensor on the loss's device when the closure returns
    tensors (no host read), a Python float when it returns floats.

    **Memory.** The parameters are perturbed in place — ``θ += cΔ``, evaluate, ``θ −= 2cΔ``,
    evaluate, ``θ += cΔ`` — and nothing of parameter size is stored. With ``samples=1``
    ``Δ`` is drawn straight into ``p.grad`` and scaled there: no floating-point temporary
    beyond the gradients themselves (drawing a Rademacher block uses integer scratch of one
    byte per element of the block: its packed words and their unpacked bits). With
    ``samples > 1`` the gradient accumulates, so ``Δ_s`` is regenerated (three times per
    sample) into scratch of at most ``chunk`` elements per (device, dtype): parameters up to
    ``chunk`` elements are packed into it together, larger ones go through it block by block
    (a non-contiguous parameter needs a scratch of its own size);
    tests/backends/test_zeroth_order.py records every allocation of a step.

    **Packed one-pass kernels** (``fused``). Rademacher parameters of at least
    ``FUSED_MIN_NUMEL`` (65536) elements, contiguous, float32/float64, not FSDP2 shards
    (and ``chunk`` a multiple of 64) are perturbed by a compiled kernel that unpacks the
    signs from the packed words inside the pass: ``θ ± cΔ`` is one read and one write of
    ``θ``, and the restore writes ``g = (f₊ − f₋)/(2c)·Δ`` in the same pass (seven array
    passes per sample instead of sixteen, and no write of ``Δ`` into ``p.grad``); with
    ``samples > 1`` the restore also applies the next sample's ``+cΔ`` (rounded as two
    passes would round it), one read and write of ``θ`` fewer per further sample. The
    only allocation is the packed words (``numel/8`` bytes per parameter, 1/32 of a
    float32 parameter), drawn once per sample and kept for its three passes (with
    ``samples > 1`` also the next sample's, drawn by the restore that looks ahead): at most
    1/16 of the float32 parameters' bytes (drawing them again for each pass, as before,
    cost about 3 ms per step on one CPU core for a 16.8M-parameter model). Under
    ``explore(..., fused=True)`` over torch's SGD/Adam/AdamW with one sample, the restore
    of the parameters that hold whole words is done by E's fast-path kernel instead, fused
    with the update (:meth:`estimate_deferred`). The results are bit for bit those of the
    generic path (same signs, same arithmetic). ``fused=None``
    (default): on CUDA only; on CPU the first step compiles two kinds of kernel (up to four
    with ``samples > 1``), each for the group sizes it meets (four tensors per call, then
    one): seconds to tens of seconds. ``fused=True`` opts in; there ``c`` and
    the weight enter as 0-d tensors of the parameters' dtype (``kernel_scalars``), rounded
    once as the eager ops round them. On ``meta`` and while an outer ``torch.compile``
    traces the step the same kernel functions run uncompiled.

    **Randomness.** ``Δ`` of parameter ``i`` (its index over all params of all groups) is drawn
    block by block: elements ``[j·chunk, (j+1)·chunk)`` of the row-major flattening come
    from a ``torch.Generator`` on the parameter's device seeded with a SplitMix64 hash of
    ``(seed, step, sample, i, j)``. Rademacher signs are packed: a block of ``m`` elements
    draws ``⌈m/64⌉`` int64 words over the full 64-bit range (``random_(-2**63, None)``) and
    element ``e`` of the block is ``Δ_e = 2·b − 1`` with ``b`` bit ``e mod 64`` (least
    significant first) of word ``e // 64``. (Before this packing each element was one draw
    of ``random_(0, 2)``: the same seeds, a different stream. A checkpoint saved before
    loads unchanged — the state is still ``seed`` and ``step`` — but the directions drawn
    after resuming differ from those the old code would have drawn; Gaussian directions
    are unchanged.) The whole random state is two Python integers, ``seed`` and ``step``
    (:meth:`state_dict`); the explored optimizer saves it under ``explore_estimator``, so a
    resumed run draws the same directions, on either path (``fused`` or not). Seeding a
    generator is host-side; no device value is ever read.

    **Round-off.** For float32/float64 parameters the in-place restore is not exact: after
    one sample ``|θ' − θ| ≤ u·(3|θ| + 2c|Δ|)`` elementwise to first order (``u`` the unit
    roundoff, ``2⁻²⁴`` in float32), i.e. a few ulps of ``|θ|`` (and of ``c`` where
    ``|θ| < c``). A power-of-two ``c`` with Rademacher directions does not make it exact in
    general (the low bits of a small ``|θ|`` are lost in ``θ + c``). The drift is
    deterministic, so resuming stays bit-exact. If the closure raises, the current
    perturbation is undone (to this accuracy) before the error propagates; ``p.grad`` is
    then unspecified.

    **bf16/fp16 parameters** (and ``exact_restore=True``). In these formats the same walk
    would drift by percents (``u = 2⁻⁸`` in bf16) and the grid decides the perturbation:
    ``θ ± cΔ`` rounds to ``θ`` where ``c`` is below half an ulp of ``|θ|`` and to
    ``θ ± 1 ulp`` just above it (bf16, ``c = 1e-3``: ``|θ| ≥ 0.5`` is not perturbed,
    ``|θ| ∈ [0.25, 0.5)`` moves by ``1.95c``, so dividing by ``2c`` overestimated its
    gradient 1.95-fold). When any trainable parameter is bf16/fp16 (or with
    ``exact_restore=True``) the estimate therefore perturbs from a saved copy
    ``θ₀`` (``θ± = rnd(θ₀ ± cΔ)`` computed in float32, rounded once), copies ``θ₀`` back (bit
    exact) and, for Rademacher ``Δ``, divides ``f₊ − f₋`` by the realized difference
    ``θ₊ − θ₋`` instead of ``2cΔ`` (unbiased wherever the format can move ``θᵢ``; 0 where
    ``θ₊ = θ₋``: choose ``c`` at least half an ulp of the largest weights, ``2⁻⁸·max|θ|``
    in bf16). Cost: one copy of the parameters (their dtype) per step and ``Δ`` of one
    parameter in float32 at a time, regenerated three times per sample.

    **Distributed.** Under ``torch.distributed`` every rank draws the same ``Δ`` (same
    ``seed`` and ``step``; with ``seed=None`` rank 0's draw is broadcast at construction)
    and the ranks average their ``(f₊, f₋)`` with one all-reduce of two scalars per sample:
    with each rank evaluating a mean loss on its equal shard of the batch, every rank then
    forms the full-batch estimate, with or without a ``DistributedDataParallel`` wrapper
    (the closure runs under ``no_grad``, so DDP's gradient hooks never fire).
    ``process_group=None`` uses the world group when one is initialised, a group restricts
    the average to it, ``False`` never communicates. FSDP2 (``fully_shard``, DTensor
    parameters sharded on dim 0): each rank perturbs and writes the gradient of its own
    shard only, with the values of the whole parameter's stream at the shard's offset, so
    the result equals one process on the full batch; FSDP2 gathers the perturbed shards in
    its forward as usual.

    **torch.compile.** A compiled function that calls ``explore(SPSA(...), base).step``
    traces the closure's forward passes and the foreach perturbations; drawing ``Δ``
    (seeding ``torch.Generator`` objects) and advancing the step counter run eagerly
    (``torch.compiler.disable``: a graph break around each).

    **Copies.** ``copy.deepcopy`` and ``pickle`` carry the configuration, ``seed`` and
    ``step`` (a copy continues the same stream of directions, independently of the
    original); the per-device generators are a cache and are not copied. A deepcopy shares
    an explicit process group; pickling one raises ``TypeError``.

    Args:
        perturbation: ``c > 0``, the finite-difference step.
        samples: ``n >= 1``, directions averaged per step (2 closure calls each).
        distribution: ``"rademacher"`` (default) or ``"gaussian"``.
        seed: an integer; ``None`` draws one from torch's global generator at construction.
        chunk: block size of the regenerated directions (elements); bounds the scratch
            memory when ``samples > 1``. Part of the definition of ``Δ``.
        process_group: ``None`` (default: the world group when ``torch.distributed`` is
            initialised), a ``ProcessGroup``, or ``False`` (each rank estimates alone).
        exact_restore: perturb from a saved copy of the parameters and copy it back (bit
            exact; memory: one copy of the parameters per step) instead of the in-place
            walk. ``None`` (default): on when any trainable parameter is bf16/fp16. Turn it
            on for float32/64 models whose skipped steps (``explore(...,
            skip_nonfinite=True)``, GradScaler) must leave the parameters bit-identical.
        fused: the packed one-pass kernels for large Rademacher parameters (see above);
            ``None`` (default): on CUDA only; ``True`` also on CPU; ``False``: never.
            Results are identical either way.
    """

    requires_closure = True

    def __init__(
        self,
        perturbation: float = 1e-3,
        samples: int = 1,
        distribution: str = "rademacher",
        seed: int | None = None,
        *,
        chunk: int = 1 << 20,
        process_group: Any = None,
        exact_restore: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        if isinstance(perturbation, bool) or not isinstance(perturbation, numbers.Real):
            raise TypeError(
                "SPSA perturbation must be a real number c > 0, got "
                f"{type(perturbation).__name__}"
            )
        if not 0.0 < float(perturbation) < float("inf"):
            raise ValueError(f"SPSA perturbation must satisfy 0 < c < inf, got {perturbation}")
        if not _is_int(samples) or samples < 1:
            raise ValueError(f"SPSA samples must be an integer >= 1, got {samples!r}")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"SPSA distribution must be one of {DISTRIBUTIONS}, got {distribution!r}"
            )
        if seed is not None and not _is_int(seed):
            raise TypeError(f"SPSA seed must be an integer or None, got {type(seed).__name__}")
        if not _is_int(chunk) or chunk < 1:
            raise ValueError(f"SPSA chunk must be an integer >= 1, got {chunk!r}")
        if exact_restore is not None and not isinstance(exact_restore, bool):
            raise TypeError(
                f"SPSA exact_restore must be None, True or False, got {exact_restore!r}"
            )
        if fused is not None and not isinstance(fused, bool):
            raise TypeError(f"SPSA fused must be True, False or None, got {fused!r}")
        _check_process_group(process_group)
        self.process_group = process_group
        self.exact_restore = exact_restore
        self.fused = fused
        if seed is None:
            # Host-side, at construction: follows torch.manual_seed; under torch.distributed
            # rank 0's draw is broadcast so that every rank perturbs along the same Δ.
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
            group = self._reduction_group()
            if group is not None:
                box = [seed]
                torch.distributed.broadcast_object_list(
                    box, src=torch.distributed.get_global_rank(group, 0), group=group
                )
                seed = int(box[0])
        self.perturbation = float(perturbation)
        self.samples = int(samples)
        self.distribution = distribution
        self.chunk = int(chunk)
        self.seed = int(seed) & _MASK64
        self.step = 0
        self._generators: dict[torch.device, torch.Generator] = {}
        # per estimate: DTensor parameters' (flat offset, numel) and (parameter, local grad)
        self._shards: dict[int, tuple[int, int]] = {}
        self._sharded: list[tuple[Tensor, Tensor]] = []

    # -- copies and pickling ---------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        """Configuration and ``seed``/``step`` only: generators are a cache (reseeded per draw).

        An explicit process group cannot travel (pickle raises ``TypeError``); the default
        (``None``: the world group when initialised) and ``False`` do.
        """
        state = self.__dict__.copy()
        state["_generators"] = {}
        group = state.get("process_group")
        if group is not None and group is not False:
            if _is_world(group):
                state["process_group"] = None
            else:
                raise TypeError(
                    "SPSA with an explicit process_group cannot be pickled (process groups "
                    "are not picklable); build it with process_group=None (the world group) "
                    "or set the group again after loading"
                )
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("fused", None)  # pickled before the packed kernels existed
        self.__dict__.update(state)
        self._generators = {}

    def __deepcopy__(self, memo: dict[int, Any]) -> SPSA:
        """An independent estimator: same configuration, ``seed`` and ``step``; the process
        group (a communicator handle) is shared, the generator cache is not."""
        twin = type(self).__new__(type(self))
        memo[id(self)] = twin
        for name, value in self.__dict__.items():
            if name == "_generators":
                value = {}
            elif name != "process_group":
                value = copy.deepcopy(value, memo)
            setattr(twin, name, value)
        return twin

    # -- distributed -----------------------------------------------------------------

    def _reduction_group(self) -> Any:
        """The group whose ranks average their loss values, or ``None`` (no communication)."""
        if self.process_group is False:
            return None
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return None
        group = torch.distributed.group.WORLD if self.process_group is None else self.process_group
        if torch.distributed.get_world_size(group) == 1:
            return None
        return group

    def _average_over_ranks(
        self, f_plus: Tensor | float, f_minus: Tensor | float, like: Tensor
    ) -> tuple[Tensor | float, Tensor | float]:
        """``(f₊, f₋)`` averaged over the ranks of the group: one all-reduce of 2 scalars.

        Every rank perturbs along the same ``Δ`` (same seed and step), so the average of the
        ranks' loss differences is the difference of the global-batch loss (for a mean loss
        over equal shards). The values stay on the device (no host read); Python numbers are
        put on ``like``'s device first, so the result is then a tensor.
        """
        group = self._reduction_group()
        if group is None:
            return f_plus, f_minus
        device = f_plus.device if isinstance(f_plus, Tensor) else like.device
        values = torch.stack([torch.as_tensor(f, device=device) for f in (f_plus, f_minus)])
        if not values.is_floating_point():
            values = values.double()
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM, group=group)
        values = values / torch.distributed.get_world_size(group)
        return values[0], values[1]

    # -- random directions -----------------------------------------------------------

    def _generator(self, device: torch.device) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            # Nothing is drawn on meta; a CPU generator is accepted there.
            where = "cpu" if device.type == "meta" else device
            generator = self._generators[device] = torch.Generator(device=where)
        return generator

    def _blocks(self, flat: Tensor) -> list[tuple[int, Tensor]]:
        return [
            (j, flat[start : start + self.chunk])
            for j, start in enumerate(range(0, flat.numel(), self.chunk))
        ]

    def _sample_seed(self, sample: int) -> int:
        return _mix(self.seed, self.step, sample)

    def _draw_(self, out: Tensor, seed: int, signs: bool = True) -> Tensor:
        """Fill ``out`` with one block of ``Δ``, drawn from a generator seeded with ``seed``.

        Rademacher draws are random bits ``b ∈ {0, 1}`` mapped to ``2b − 1``; with
        ``signs=False`` the caller applies that map (one op over many tensors at once).
        """
        generator = self._generator(out.device)
        generator.manual_seed(seed)
        if self.distribution == "gaussian":
            return out.normal_(generator=generator)
        words = torch.empty(_words(out.numel()), dtype=torch.int64, device=out.device)
        words.random_(-(2**63), None, generator=generator)
        _unpack_bits_(out, words)
        return out.mul_(2.0).sub_(1.0) if signs else out

    def _packed_words(self, n: int, sample_seed: int, index: int, device: torch.device) -> Tensor:
        """The packed signs of parameter ``index`` (``n`` elements, ``chunk`` a multiple of
        64): block ``j``'s words at ``[j·chunk/64, …)``, so that element ``e`` of the
        parameter is bit ``e mod 64`` of word ``e // 64``; the bits :meth:`_draw_` unpacks."""
        stride = self.chunk // WORD_BITS
        words = torch.empty(_words(n), dtype=torch.int64, device=device)
        generator = self._generator(device)
        for block in range(0, (n + self.chunk - 1) // self.chunk):
            generator.manual_seed(_block_seed(sample_seed, index, block))
            words[block * stride : (block + 1) * stride].random_(
                -(2**63), None, generator=generator
            )
        return words

    def _fast_entries(self, entries: Sequence[tuple[int, Tensor, Tensor]]) -> set[int]:
        """Indices of the parameters the packed one-pass kernels perturb (see ``fused``)."""
        if self.distribution != "rademacher" or self.chunk % WORD_BITS:
            return set()
        fast = set()
        for index, p, grad in entries:
            fused = self.fused if self.fused is not None else p.device.type == "cuda"
            if (
                fused
                and index not in self._shards
                and p.dtype in _FUSED_DTYPES
                and p.numel() >= FUSED_MIN_NUMEL
                and p.is_contiguous()
                and grad.is_contiguous()
            ):
                fast.add(index)
        return fast

    @staticmethod
    def _kernel_scalars(
        device: torch.device, dtype: torch.dtype, scale: float, weight: Tensor | float | None
    ) -> tuple[Tensor | float, Tensor | float | None]:
        """``scale`` and ``weight`` as the packed kernels take them for parameters of
        ``dtype`` on ``device``: :func:`kernel_scalars` (on CPU 0-d tensors of ``dtype``, each
        rounded once to the value the generic path's eager ops give a scalar for a ``dtype``
        tensor; elsewhere floats), and a weight tensor on ``device`` (on CPU rounded to
        ``dtype`` likewise). Otherwise inductor's CPU kernel converts a float, or a float64
        loss difference, to ``dtype`` inside its loop."""
        (c,) = kernel_scalars(device, dtype, scale)
        if weight is None:
            return c, None
        if isinstance(weight, Tensor):
            w = _on(weight, device, strict=True)
            return c, (w.to(dtype) if device.type == "cpu" else w)
        (w,) = kernel_scalars(device, dtype, weight)
        return c, w

    @torch.compiler.disable
    def _fused_pass_(
        self,
        entries: Sequence[tuple[int, Tensor, Tensor]],
        sample: int,
        scale: float,
        weight: Tensor | float | None = None,
        first: bool = False,
        then: int | None = None,
        *,
        drawn: dict[tuple[int, int], Tensor],
        sample_seed: int | None = None,
    ) -> None:
        """``θ += scale·Δ_s`` (with ``weight``: and ``g (+)= weight·Δ_s``) for the fast
        entries: the packed words of each parameter (``numel/8`` bytes) are drawn (or taken
        from ``drawn``), then one
        kernel per group of FUSED_GROUP parameters of a device and dtype reads and writes
        each ``θ`` (and writes ``g``) once. With ``then`` (and a weight)
        the same pass goes on to ``θ += scale·Δ_then`` (the next sample's first shift),
        rounded as a second pass would round it; the next words are drawn beside the first.
        The last ``numel mod 64`` elements (a partial word) are updated eagerly, with the
        same arithmetic. ``drawn``: the words already drawn in this step, by (sample seed,
        parameter index); words drawn here are added to it (each sample's words serve its
        three passes: drawn once, not three times). ``sample_seed``: the sample's seed,
        when the pass runs after the step counter advanced (a deferred restore)."""
        if sample_seed is None:
            sample_seed = self._sample_seed(sample)
        then_seed = None if then is None else self._sample_seed(then)

        def words_of(seed: int, index: int, p: Tensor) -> Tensor:
            words = drawn.get((seed, index))
            if words is None:
                words = drawn[seed, index] = self._packed_words(p.numel(), seed, index, p.device)
            return words

        # Per device and dtype: the whole-word bodies of the parameters, as the kernels take
        # them (blocks that are not views, detached: dynamo guards a view's base, and the
        # base's size, with or without a partial word, would be a second graph).
        bodies: dict[tuple[torch.device, torch.dtype], list[tuple]] = {}
        for index, p, grad in entries:
            words = words_of(sample_seed, index, p)
            next_words = None if then_seed is None else words_of(then_seed, index, p)
            full = p.numel() // WORD_BITS
            flat, g_flat = p.view(-1), grad.view(-1)
            body, tail = flat[: full * WORD_BITS], flat[full * WORD_BITS :]
            g_body, g_tail = g_flat[: full * WORD_BITS], g_flat[full * WORD_BITS :]
            bodies.setdefault((p.device, p.dtype), []).append((
                body.view(full, 2, 32).detach(), g_body.view(full, 2, 32).detach(),
                words[:full].detach(),
                None if next_words is None else next_words[:full].detach(),
            ))
            if tail.numel():
                delta = _unpack_bits_(torch.empty_like(tail), words[full:]).mul_(2.0).sub_(1.0)
                tail.add_(delta, alpha=scale)
                if weight is not None:
                    delta.mul_(_on(weight, p.device))
                    g_tail.copy_(delta) if first else g_tail.add_(delta)
                    if next_words is not None:
                        delta = _unpack_bits_(delta, next_words[full:]).mul_(2.0).sub_(1.0)
                        tail.add_(delta, alpha=scale)
        if weight is None:
            kind = "shift"
        elif then_seed is None:
            kind = "grad" if first else "accumulate"
        else:
            kind = "grad_next" if first else "accumulate_next"
        for (device, dtype), items in bodies.items():
            c, w = self._kernel_scalars(device, dtype, scale, weight)
            for chunk in chunks(list(range(len(items)))):
                ps, gs, words, next_words = ([items[i][k] for i in chunk] for k in range(4))
                kernel = _kernel(kind, device, len(chunk))
                if kind == "shift":
                    kernel(ps, words, c)
                elif then_seed is None:
                    kernel(ps, gs, words, c, w)
                else:
                    kernel(ps, gs, words, next_words, c, w)

    def _fill_direction_(
        self, out: Tensor, sample_seed: int, index: int, signs: bool = True
    ) -> None:
        """``out`` (contiguous, the parameter's shape) ← ``Δ`` of parameter ``index``.

        For the local shard of a DTensor parameter (FSDP2) ``out`` is the slab
        ``[offset, offset + n)`` of the whole parameter's flattening: the blocks of the whole
        parameter that overlap it are drawn and sliced, so every rank's shard holds exactly
        the values one process draws for the whole parameter.
        """
        flat = out.view(-1)
        shard = self._shards.get(index)
        if shard is None:
            for block, view in self._blocks(flat):
                self._draw_(view, _block_seed(sample_seed, index, block), signs)
            return
        offset, total = shard
        if flat.numel() == 0:
            return
        first, last = offset // self.chunk, (offset + flat.numel() - 1) // self.chunk
        for block in range(first, last + 1):
            start = block * self.chunk
            drawn = torch.empty(min(self.chunk, total - start), device=out.device,
                                dtype=out.dtype)
            self._draw_(drawn, _block_seed(sample_seed, index, block), signs)
            lo, hi = max(offset, start), min(offset + flat.numel(), start + drawn.numel())
            flat[lo - offset : hi - offset].copy_(drawn[lo - start : hi - start])

    @torch.compiler.disable
    def _fill_directions_(self, entries: Sequence[tuple[int, Tensor, Tensor]]) -> None:
        """``p.grad ← Δ`` bits (``samples == 1``); the seed is read here, outside any graph.

        Under ``torch.compile`` this and :meth:`_apply_direction_` run eagerly (seeding and
        drawing from a ``torch.Generator`` cannot be traced, and a traced read of the step
        counter would recompile every step); the closure's forward passes are traced.
        """
        sample_seed = self._sample_seed(0)
        for index, _, grad in entries:
            self._fill_direction_(grad, sample_seed, index, signs=False)

    @torch.compiler.disable
    def _advance(self) -> None:
        self.step += 1

    @torch.compiler.disable
    def _apply_direction_(
        self,
        entries: Sequence[tuple[int, Tensor, Tensor]],
        sample: int,
        scale: float,
        weight: Tensor | float | None = None,
        first: bool = False,
    ) -> None:
        """``θ += scale·Δ_s`` from ``Δ_s`` regenerated block by block (``samples > 1``).

        With ``weight`` (the sample's ``(f₊−f₋)/(2cn)``) also ``g += weight·Δ_s``
        (``g = weight·Δ_s`` when ``first``), from the same regenerated blocks. Parameters
        of at most ``chunk`` elements are packed into one scratch of ``chunk`` elements and
        updated with foreach ops; larger ones go block by block through a scratch of
        ``chunk`` elements. A non-contiguous parameter gets a scratch of its own size.
        """
        sample_seed = self._sample_seed(sample)
        packs: dict[tuple[torch.device, torch.dtype], list[tuple[int, Tensor, Tensor]]] = {}
        scratch: dict[tuple[torch.device, torch.dtype], Tensor] = {}

        def buffer_for(key: tuple[torch.device, torch.dtype]) -> Tensor:
            buffer = scratch.get(key)
            if buffer is None:
                sizes = [
                    min(p.numel(), self.chunk) for _, p, _ in entries
                    if (p.device, p.dtype) == key and p.is_contiguous()
                ]
                total = min(self.chunk, sum(sizes))
                buffer = scratch[key] = torch.empty(total, device=key[0], dtype=key[1])
            return buffer

        def update(p_views, g_views, delta_views, region: Tensor) -> None:
            """θ += scale·Δ; then, with a weight, g (+)= weight·Δ (Δ scaled in ``region``)."""
            torch._foreach_add_(p_views, delta_views, alpha=scale)
            if weight is None:
                return
            region.mul_(_on(weight, region.device))
            if first:
                torch._foreach_copy_(g_views, delta_views)
            else:
                torch._foreach_add_(g_views, delta_views)

        def flush(key: tuple[torch.device, torch.dtype]) -> None:
            items = packs.pop(key, [])
            packed.pop(key, None)
            if not items:
                return
            buffer, used, views = buffer_for(key), 0, []
            for index, p, _ in items:
                view = buffer[used : used + p.numel()]
                self._draw_(view, _block_seed(sample_seed, index, 0), signs=False)
                views.append(view.view(p.shape))
                used += p.numel()
            region = buffer[:used]
            if self.distribution == "rademacher":
                region.mul_(2.0).sub_(1.0)
            update([p for _, p, _ in items], [g for _, _, g in items], views, region)

        packed: dict[tuple[torch.device, torch.dtype], int] = {}
        for index, p, grad in entries:
            key = (p.device, p.dtype)
            if index in self._shards:  # a DTensor's local shard: drawn by global offset
                delta = torch.empty(p.shape, device=p.device, dtype=p.dtype)
                self._fill_direction_(delta, sample_seed, index)
                update([p], [grad], [delta], delta)
            elif p.is_contiguous() and p.numel() <= self.chunk:
                if packed.get(key, 0) + p.numel() > self.chunk:
                    flush(key)
                packs.setdefault(key, []).append((index, p, grad))
                packed[key] = packed.get(key, 0) + p.numel()
            elif p.is_contiguous():
                buffer = buffer_for(key)
                for (block, p_view), (_, g_view) in zip(
                    self._blocks(p.view(-1)), self._blocks(grad.view(-1))
                ):
                    delta = buffer[: p_view.numel()]
                    self._draw_(delta, _block_seed(sample_seed, index, block))
                    update([p_view], [g_view], [delta], delta)
            else:
                delta = torch.empty(p.shape, device=p.device, dtype=p.dtype)
                self._fill_direction_(delta, sample_seed, index)
                update([p], [grad], [delta], delta)
        for key in list(packs):
            flush(key)

    # -- the estimate ----------------------------------------------------------------

    def _entries(self, param_groups: Sequence[dict]) -> list[tuple[int, Tensor, Tensor]]:
        """``(index, p, grad)`` for trainable parameters; grads reused or allocated."""
        trainable: list[tuple[int, Tensor]] = []
        index = 0
        for group in param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    if not p.is_floating_point():
                        raise TypeError(
                            "SPSA supports real floating-point parameters, got a parameter "
                            f"of dtype {p.dtype} (param index {index})"
                        )
                    if p.layout is not torch.strided:
                        raise TypeError(
                            f"SPSA supports dense (strided) parameters, got {p.layout} "
                            f"(param index {index})"
                        )
                    trainable.append((index, p))
                index += 1
        entries = []
        self._shards, self._sharded = {}, []
        for index, p in trainable:
            if _is_dtensor(p):
                local, grad = p.to_local(), p.grad
                grad = grad.to_local() if _is_dtensor(grad) else None
                if grad is None or grad.shape != local.shape or not grad.is_contiguous():
                    grad = torch.empty(local.shape, dtype=local.dtype, device=local.device)
                self._shards[index] = _shard_offset(p, index)
                self._sharded.append((p, grad))
                entries.append((index, local, grad))
                continue
            grad = p.grad
            if (
                grad is None
                or grad.shape != p.shape
                or grad.dtype != p.dtype
                or grad.device != p.device
                or grad.layout is not torch.strided
                or not grad.is_contiguous()
            ):
                grad = torch.empty(p.shape, dtype=p.dtype, device=p.device)
            entries.append((index, p, grad))
        return entries

    @staticmethod
    def _evaluate(closure: Closure) -> Tensor | float:
        with torch.no_grad():
            loss = closure()
        if isinstance(loss, Tensor):
            if loss.numel() != 1:
                raise ValueError(
                    "SPSA closure must return a scalar loss (a one-element tensor or a "
                    f"number), got a tensor of shape {tuple(loss.shape)}"
                )
            return loss.detach().reshape(())
        if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
            return float(loss)
        raise TypeError(
            "SPSA closure must return the loss (a tensor or a number), got "
            f"{type(loss).__name__}"
        )

    def estimate(self, closure: Closure | None, param_groups: Sequence[dict]) -> Any:
        """Write the SPSA estimate into ``p.grad``; return ``mean_s (f₊ + f₋)/2``."""
        return self._estimate(closure, param_groups, defer=False)[0]

    def estimate_deferred(
        self, closure: Closure | None, param_groups: Sequence[dict]
    ) -> tuple[Any, DeferredRestore | None]:
        """:meth:`estimate`, with the last pass of some parameters left to the caller.

        With one sample, the packed one-pass kernels' parameters that hold whole words
        (``numel`` a multiple of 64) are left at ``θ − cΔ`` with their gradient unwritten;
        the returned :class:`~adaptor.estimators.DeferredRestore` describes that pass (the
        words, ``c`` and ``w = (f₊ − f₋)/(2c)``) for a kernel that fuses it with the
        update, and its ``finish()`` does it for whatever the caller does not take. The
        caller must take or finish every parameter before anything reads them. Returns
        ``(loss, None)`` when nothing is deferred (the estimate is then complete).
        """
        return self._estimate(closure, param_groups, defer=True)

    def _estimate(
        self, closure: Closure | None, param_groups: Sequence[dict], defer: bool
    ) -> tuple[Any, DeferredRestore | None]:
        if closure is None:
            raise ValueError(
                "SPSA needs a closure that returns the loss (it evaluates the loss at "
                "θ ± cΔ); got closure=None"
            )
        if not callable(closure):
            raise TypeError(f"SPSA closure must be callable, got {type(closure).__name__}")
        entries = self._entries(param_groups)
        total: Tensor | float
        pending: DeferredRestore | None = None
        if entries:
            exact = self.exact_restore
            if exact is None:
                exact = any(p.dtype in _LOW_PRECISION for _, p, _ in entries)
            if exact:
                total = self._estimate_rounded(closure, entries)
            elif self.samples == 1:
                total, pending = self._estimate_one(closure, entries, defer)
            else:
                total = self._estimate_many(closure, entries)
        else:  # nothing to perturb: the loss at θ is exact
            total = self._evaluate(closure)
        try:
            sharded = {id(grad) for _, grad in self._sharded}
            for _, p, grad in entries:
                if id(grad) not in sharded and p.grad is not grad:
                    p.grad = grad
            for p, grad in self._sharded:
                if p.grad is None or p.grad.to_local().data_ptr() != grad.data_ptr():
                    p.grad = torch.distributed.tensor.DTensor.from_local(
                        grad, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                        stride=p.stride(),
                    )
            self._shards, self._sharded = {}, []
            self._advance()
        except BaseException:
            if pending is not None:  # no parameter is left perturbed
                pending.finish()
            raise
        return total, pending

    def _buckets(
        self, entries: Sequence[tuple[int, Tensor, Tensor]]
    ) -> list[tuple[torch.device, list[Tensor], list[Tensor]]]:
        grouped = Optimizer._group_tensors_by_device_and_dtype(
            [[p for _, p, _ in entries], [grad for _, _, grad in entries]]
        )
        # The device comes from a tensor: under torch.compile the key is (None, None).
        return [(params[0].device, params, grads) for (params, grads), _ in grouped.values()]

    def _estimate_one(
        self, closure: Closure, entries: Sequence[tuple[int, Tensor, Tensor]], defer: bool
    ) -> tuple[Tensor | float, DeferredRestore | None]:
        """``samples == 1``: ``Δ`` lives in ``p.grad``; no other full-size tensor.

        The fast entries (:meth:`_fast_entries`) keep nothing in ``p.grad`` until the end:
        ``θ += cΔ`` and ``θ −= 2cΔ`` are one pass each, and the restore ``θ += cΔ`` writes
        ``g = (f₊ − f₋)/(2c)·Δ`` in the same pass. With ``defer``, that last pass is left
        undone for the fast entries of whole words and described by the returned
        :class:`DeferredRestore` (see :meth:`estimate_deferred`).
        """
        c = self.perturbation
        fast_indices = self._fast_entries(entries)
        fast = [entry for entry in entries if entry[0] in fast_indices]
        # with defer, the restore of the entries of whole words is left to the caller
        whole = {index for index, p, _ in fast if defer and p.numel() % WORD_BITS == 0}
        deferred = [entry for entry in fast if entry[0] in whole]
        now = [entry for entry in fast if entry[0] not in whole]
        rest = [entry for entry in entries if entry[0] not in fast_indices]
        self._fill_directions_(rest)
        buckets = self._buckets(rest) if rest else []
        if self.distribution == "rademacher":  # bits b → signs 2b − 1, exactly
            for _, _, grads in buckets:
                torch._foreach_mul_(grads, 2.0)
                torch._foreach_sub_(grads, 1.0)
        drawn: dict[tuple[int, int], Tensor] = {}  # the fast entries' words, drawn once

        def shift(scale: float, generic: bool = True, packed: bool = True) -> None:
            with torch.no_grad():
                if generic:
                    for _, params, grads in buckets:
                        torch._foreach_add_(params, grads, alpha=scale)
                if fast and packed:
                    self._fused_pass_(fast, 0, scale, drawn=drawn)

        # the multiple of cΔ currently added to θ (the generic and the fast entries)
        offset = fast_offset = 0.0
        pending = None
        try:
            shift(c)
            offset = fast_offset = 1.0
            f_plus = self._evaluate(closure)
            shift(-2.0 * c)
            offset = fast_offset = -1.0
            f_minus = self._evaluate(closure)
            f_plus, f_minus = self._average_over_ranks(f_plus, f_minus, entries[0][1])
            scale = (f_plus - f_minus) / (2.0 * c)
            if now:  # restore and write the gradient in one pass
                with torch.no_grad():
                    self._fused_pass_(now, 0, c, weight=scale, first=True, drawn=drawn)
            # from here the deferred entries' restore is the DeferredRestore's
            pending = self._deferred(deferred, scale, drawn) if deferred else None
            fast_offset = 0.0
            shift(c, packed=False)
            offset = 0.0
            for device, _, grads in buckets:
                torch._foreach_mul_(grads, _on(scale, device))
        except BaseException:
            if pending is not None:
                pending.finish()
            raise
        finally:
            if offset or fast_offset:
                shift(-offset * c, generic=bool(offset), packed=bool(fast_offset))
        return (f_plus + f_minus) / 2.0, pending

    def _deferred(
        self,
        entries: Sequence[tuple[int, Tensor, Tensor]],
        weight: Tensor | float,
        drawn: dict[tuple[int, int], Tensor],
    ) -> DeferredRestore:
        """The record of the restore pass left undone for ``entries`` (their words drawn)."""
        c, sample_seed = self.perturbation, self._sample_seed(0)
        by_id = {id(entry[1]): entry for entry in entries}

        def finish(params: list[Tensor]) -> None:
            with torch.no_grad():
                self._fused_pass_([by_id[id(p)] for p in params], 0, c, weight=weight,
                                  first=True, drawn=drawn, sample_seed=sample_seed)

        return DeferredRestore(
            {id(p): (p, drawn[sample_seed, index]) for index, p, _ in entries},
            lambda device, dtype: self._kernel_scalars(device, dtype, c, weight),
            finish,
        )

    def _estimate_many(
        self, closure: Closure, entries: Sequence[tuple[int, Tensor, Tensor]]
    ) -> Tensor | float:
        """``samples > 1``: ``Δ_s`` regenerated block by block; ``g`` accumulates.

        The fast entries (:meth:`_fast_entries`) take the packed one-pass kernels.
        """
        c, n = self.perturbation, self.samples
        fast_indices = self._fast_entries(entries)
        fast = [entry for entry in entries if entry[0] in fast_indices]
        rest = [entry for entry in entries if entry[0] not in fast_indices]

        def apply(sample: int, scale: float, weight: Any = None, first: bool = False) -> None:
            if rest:
                self._apply_direction_(rest, sample, scale, weight, first)

        total: Tensor | float = 0.0
        # The fast entries' words of the current and the next sample (each drawn once for
        # its three passes); a sample's are dropped after its restore.
        drawn: dict[tuple[int, int], Tensor] = {}
        # the multiple of cΔ_sample currently added to θ: the generic and the fast entries;
        # the fast entries start a sample (after the first) already shifted by +cΔ_sample,
        # folded into the previous sample's restore pass (one pass over θ fewer per sample)
        offset = fast_offset = 0.0
        with torch.no_grad():
            for sample in range(n):
                then = sample + 1 if sample + 1 < n else None
                try:
                    apply(sample, c)
                    offset = 1.0
                    if fast and not fast_offset:
                        self._fused_pass_(fast, sample, c, drawn=drawn)
                    fast_offset = 1.0
                    f_plus = self._evaluate(closure)
                    apply(sample, -2.0 * c)
                    offset = -1.0
                    if fast:
                        self._fused_pass_(fast, sample, -2.0 * c, drawn=drawn)
                    fast_offset = -1.0
                    f_minus = self._evaluate(closure)
                    f_plus, f_minus = self._average_over_ranks(f_plus, f_minus, entries[0][1])
                    weight = (f_plus - f_minus) / (2.0 * c * n)
                    # restore θ and accumulate g from the same regenerated blocks
                    offset = 0.0
                    apply(sample, c, weight, first=sample == 0)
                    fast_offset = 0.0
                    if fast:
                        self._fused_pass_(fast, sample, c, weight, sample == 0, then, drawn=drawn)
                        seed = self._sample_seed(sample)
                        for key in [key for key in drawn if key[0] == seed]:
                            del drawn[key]
                        fast_offset = 0.0 if then is None else 1.0  # now +cΔ_then
                except BaseException:
                    if offset:
                        apply(sample, -offset * c)
                    if fast and fast_offset:
                        self._fused_pass_(fast, sample, -fast_offset * c, drawn=drawn)
                    raise
                total = total + (f_plus + f_minus) / (2.0 * n)
        return total

    def _packs(
        self, entries: Sequence[tuple[int, Tensor, Tensor]]
    ) -> list[list[tuple[int, Tensor, Tensor]]]:
        """Entries grouped by (device, dtype) into packs of at most ``chunk`` elements."""
        packs: list[list[tuple[int, Tensor, Tensor]]] = []
        open_packs: dict[tuple[torch.device, torch.dtype], tuple[list, int]] = {}
        for entry in entries:
            p = entry[1]
            key = (p.device, p.dtype)
            items, size = open_packs.get(key, ([], 0))
            if items and size + p.numel() > self.chunk:
                packs.append(items)
                items, size = [], 0
            items.append(entry)
            open_packs[key] = (items, size + p.numel())
        packs.extend(items for items, _ in open_packs.values() if items)
        return packs

    @torch.compiler.disable
    def _pack_direction(self, pack: Sequence[tuple[int, Tensor, Tensor]], sample: int) -> Tensor:
        """``Δ_s`` of the pack's parameters, flat and concatenated, in the work dtype (float32,
        or float64 for float64 parameters): the same values as the in-place paths draw."""
        first = pack[0][1]
        work = torch.promote_types(first.dtype, torch.float32)
        flat = torch.empty(sum(p.numel() for _, p, _ in pack), device=first.device, dtype=work)
        sample_seed = self._sample_seed(sample)
        used = 0
        for index, p, _ in pack:
            self._fill_direction_(flat[used : used + p.numel()], sample_seed, index, signs=False)
            used += p.numel()
        if self.distribution == "rademacher":
            flat.mul_(2.0).sub_(1.0)
        return flat

    @staticmethod
    def _views(flat: Tensor, pack: Sequence[tuple[int, Tensor, Tensor]]) -> list[Tensor]:
        views, used = [], 0
        for _, p, _ in pack:
            views.append(flat[used : used + p.numel()].view(p.shape))
            used += p.numel()
        return views

    def _estimate_rounded(
        self, closure: Closure, entries: Sequence[tuple[int, Tensor, Tensor]]
    ) -> Tensor | float:
        r"""bf16/fp16 parameters: exact restore, perturbations rounded once, realized steps.

        In a low-precision format ``θ ± cΔ`` lands on the format's grid: with ``c`` below half
        an ulp of ``|θ|`` the perturbation vanishes, just above it doubles (bf16, ``c = 1e-3``:
        every ``|θ| ≥ 0.5`` is not perturbed at all and ``|θ| ∈ [0.25, 0.5)`` moves by
        ``±2^{-9} ≈ 1.95c``), and the in-place ``+c, −2c, +c`` walk does not come back to
        ``θ``. Here, per sample:

        * ``θ₊ = rnd(θ₀ + cΔ)`` and ``θ₋ = rnd(θ₀ − cΔ)`` are computed in float32 from a copy
          ``θ₀`` of the parameters and rounded once; ``θ₀`` is copied back afterwards, so
          the parameters are restored bit for bit;
        * Rademacher: the realized difference ``d = θ₊ − θ₋`` (exact in float32) is
          ``Δᵢ·mᵢ`` with ``mᵢ ≥ 0`` fixed by ``θ₀``, so
          ``ĝᵢ = (f₊ − f₋)/dᵢ`` (0 where ``dᵢ = 0``) has ``E ĝᵢ = ∇ᵢf`` wherever the format can
          move ``θᵢ`` at all (``ĝᵢ = (f₊−f₋)/(2c)·Δᵢ`` when ``dᵢ = 2cΔᵢ``); Gaussian keeps
          ``(f₊ − f₋)/(2c)·Δᵢ`` (its quantisation is not corrected).

        Parameters are packed by (device, dtype) into packs of at most ``chunk`` elements (a
        larger parameter is a pack of its own) and each pack is handled with a few flat ops.
        Memory: a copy of the parameters in their dtype (one flat buffer per pack) for the
        step, plus temporaries of one pack in float32 (float64 for float64 parameters); ``Δ``
        is regenerated three times per sample. Used for every parameter when
        ``exact_restore`` is on (by default: when any parameter is bf16/fp16).
        """
        c, n = self.perturbation, self.samples
        packs = self._packs(entries)
        with torch.no_grad():
            saved = []  # θ₀ of each pack, flat, in the parameters' dtype
            for pack in packs:
                flat = torch.empty(sum(p.numel() for _, p, _ in pack),
                                   device=pack[0][1].device, dtype=pack[0][1].dtype)
                torch._foreach_copy_(self._views(flat, pack), [p for _, p, _ in pack])
                saved.append(flat)

        def place(sample: int, sign: float) -> None:
            for pack, theta in zip(packs, saved):
                # θ₀ + cΔ formed in the work dtype (c never rounded to bf16) and rounded
                # once by the copy into the parameters; θ₀ itself is never written
                moved = self._pack_direction(pack, sample).mul_(sign * c).add_(theta)
                torch._foreach_copy_([p for _, p, _ in pack], self._views(moved, pack))

        def restore() -> None:
            for pack, theta in zip(packs, saved):
                torch._foreach_copy_([p for _, p, _ in pack], self._views(theta, pack))

        total: Tensor | float = 0.0
        with torch.no_grad():
            for sample in range(n):
                try:
                    place(sample, 1.0)
                    f_plus = self._evaluate(closure)
                    place(sample, -1.0)
                    f_minus = self._evaluate(closure)
                finally:
                    restore()
                f_plus, f_minus = self._average_over_ranks(f_plus, f_minus, entries[0][1])
                for pack, theta in zip(packs, saved):
                    delta = self._pack_direction(pack, sample)
                    low = theta.dtype
                    if self.distribution == "rademacher":
                        # dᵢ = rnd(θ₀ + cΔᵢ) − rnd(θ₀ − cΔᵢ) = Δᵢ·mᵢ, exact in the work dtype
                        up = torch.add(theta, delta, alpha=c).to(low).to(delta.dtype)
                        down = torch.add(theta, delta, alpha=-c).to(low).to(delta.dtype)
                        realized = up.sub_(down)
                        moved = realized != 0
                        estimate = torch.where(moved, realized, 1.0).reciprocal_().mul_(moved)
                        estimate.mul_(_on(f_plus - f_minus, delta.device))
                    else:
                        estimate = delta.mul_(_on((f_plus - f_minus) / (2.0 * c), delta.device))
                    estimate.div_(n)
                    grads = [grad for _, _, grad in pack]
                    if sample == 0:
                        torch._foreach_copy_(grads, self._views(estimate, pack))
                    else:
                        torch._foreach_add_(grads, self._views(estimate, pack))
                total = total + (f_plus + f_minus) / (2.0 * n)
        return total

    # -- checkpoints -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"seed": int, "step": int}``: the whole random state (host integers)."""
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``seed`` and ``step``; an empty dict (a base-only checkpoint) changes nothing."""
        if not state_dict:
            return
        if not isinstance(state_dict, dict) or set(state_dict) != {"seed", "step"}:
            keys = sorted(state_dict) if isinstance(state_dict, dict) else state_dict
            raise ValueError(f"SPSA state dict must have keys ['seed', 'step'], got {keys}")
        seed, step = state_dict["seed"], state_dict["step"]
        if not _is_int(seed) or not _is_int(step) or step < 0:
            raise ValueError(
                f"SPSA state dict needs an integer seed and an integer step >= 0, got "
                f"seed={seed!r}, step={step!r}"
            )
        self.seed = int(seed) & _MASK64
        self.step = int(step)

    def __repr__(self) -> str:
        return (
            f"SPSA(perturbation={self.perturbation}, samples={self.samples}, "
            f"distribution={self.distribution!r}, seed={self.seed}, chunk={self.chunk}, "
            f"exact_restore={self.exact_restore}, fused={self.fused})"
        )


def _is_dtensor(t: object) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _shard_offset(p: Any, index: int) -> tuple[int, int]:
    """``(flat offset, numel)`` of a DTensor's local shard in the whole parameter's flattening.

    Supported placements: ``Shard(0)`` (FSDP2's default) and ``Replicate()``, for which the
    local shard is one contiguous slab of the row-major flattening.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for placement in p.placements:
        if not (isinstance(placement, Replicate) or
                (isinstance(placement, Shard) and placement.dim == 0)):
            raise TypeError(
                f"SPSA supports DTensor parameters sharded on dim 0 (FSDP2's default) or "
                f"replicated, got placements {p.placements} (param index {index})"
            )
    _, global_offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    row = p.numel() // p.shape[0] if p.dim() > 0 and p.shape[0] > 0 else 1
    offset = global_offset[0] * row if p.dim() > 0 else 0
    return int(offset), p.numel()


def _is_world(group: Any) -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and group is torch.distributed.group.WORLD
    )


def _check_process_group(group: Any) -> None:
    """``None`` (the world group when initialised), ``False`` (never communicate) or a group."""
    if group is None or group is False:
        return
    process_group_type = (
        getattr(torch.distributed, "ProcessGroup", None)
        if torch.distributed.is_available()
        else None
    )
    if process_group_type is None or not isinstance(group, process_group_type):
        raise TypeError(
            "SPSA process_group must be None (the world group when torch.distributed is "
            "initialised), False (no communication) or a torch.distributed ProcessGroup, got "
            f"{type(group).__name__}"
        )


def _on(scale: Tensor | float, device: torch.device, strict: bool = False) -> Tensor | float:
    """``scale`` usable with tensors on ``device`` without a device→host read (``strict``:
    a tensor is moved to ``device`` even when it is a CPU scalar, for compiled kernels)."""
    if not isinstance(scale, Tensor) or scale.device == device:
        return scale
    if scale.device.type == "cpu" and scale.dim() == 0 and not strict:
        return scale  # a CPU scalar is accepted by ops on any device
    return scale.to(device, non_blocking=True)

