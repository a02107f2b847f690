"""Packed Rademacher signs: the arithmetic shared by SPSA's kernels and the fast path.

A direction ``Δ ∈ {±1}ⁿ`` is stored as ``⌈n/64⌉`` int64 words: element ``e`` is
``Δ_e = 2·b − 1`` with ``b`` bit ``e mod 64`` (least significant first) of word ``e // 64``.
``backends.zeroth_order`` draws the words and perturbs with them; :mod:`adaptor.fastpath`
finishes SPSA's last pass (the restore ``θ + cΔ`` and the gradient ``w·Δ``) inside its own
update kernel (:class:`adaptor.estimators.DeferredRestore`). Both use these functions, so
that the two give the same bits.
"""

from __future__ import annotations

import torch
from torch import Tensor

WORD_BITS = 64


def positive(words: Tensor) -> Tensor:
    """``Δ > 0`` for the ``64·len(words)`` elements, shape ``(len(words), 2, 32)``.

    Each int64 word is read as its two int32 halves (low half first: the little-endian
    layout), so that bit ``e mod 64`` of word ``e // 64`` is bit ``e mod 32`` of half
    ``(e mod 64) // 32``: inductor vectorises 32-bit shifts on CPU, not 64-bit ones (a
    64-bit form ran 30 times slower). The bit is shifted into the sign position and tested
    with ``< 0``: a shift and a compare per vector, where ``(h >> e) & 1 != 0`` took four
    operations (AVX2 has no integer ``!=``). Inside a compiled kernel nothing of parameter
    size is materialised.
    """
    halves = words.view(torch.int32).view(-1, 2, 1)
    shifts = torch.arange(31, -1, -1, dtype=torch.int32, device=words.device)  # 31 − e
    return (halves << shifts) < 0


def shift(p: Tensor, positive: Tensor, scale: Tensor | float) -> Tensor:
    """``θ + scale·Δ``."""
    # θ ± scale selected, not θ + (±1)·scale formed: the same rounding (both are θ ± scale
    # rounded once), one conversion and one product fewer per element (~15% on CPU)
    return torch.where(positive, p + scale, p - scale)


def signed(positive: Tensor, weight: Tensor | float, dtype: torch.dtype) -> Tensor:
    """``weight·Δ`` in ``dtype``."""
    # Δ = ±1 is exact in any dtype: rounds as the eager ``Δ·weight`` does
    return torch.where(positive, 1.0, -1.0).to(dtype) * weight


def blocks(t: Tensor) -> Tensor:
    """A contiguous tensor of whole words (``numel`` a multiple of 64) in the shape
    :func:`positive` gives, ``(numel/64, 2, 32)``; detached, so that it is not a view for
    dynamo (which would guard its base's shape: see ``adaptor.replacement.flat``)."""
    return t.view(-1, 2, 32).detach()
