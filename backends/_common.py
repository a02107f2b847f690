"""Small pieces the backends share: step-counter dtype and Adam's bias corrections on device."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def step_dtype(p: Tensor) -> torch.dtype:
    """Step counters count exactly in float32 up to 2**24 steps; float64 params get float64."""
    return torch.float64 if p.dtype in (torch.float64, torch.complex128) else torch.float32


def adam_bias_corrections(
    beta1: float, beta2: float, steps: Sequence[Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    """``(1 − β₁ᵗ, 1 − β₂ᵗ)`` for each step counter, as device tensors (no host read)."""
    corrections = []
    for beta in (beta1, beta2):
        correction = torch._foreach_pow(beta, steps)
        torch._foreach_neg_(correction)
        torch._foreach_add_(correction, 1.0)
        corrections.append(correction)
    return corrections[0], corrections[1]
