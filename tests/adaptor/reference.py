"""An independent float64 reference of the paper's two-buffer replacement, for the tests.

Written from the paper's formulas (Algorithm 5), not from ``adaptor.replacement``::

    a_k = β·a_{k-1} + (1-β)·(g_k - g_{k-1}),    g̃_k = g_k + α·a_k,    a_0 = g_0 = 0

A change of β between steps follows the documented behaviour of the adaptor: the part of
``a_k`` carried over from the past, ``β·a_{k-1} - (1-β)·g_{k-1}``, was formed at step ``k-1``
under the β of that step; only the weight of the new gradient uses the new β::

    a_k = β_{k-1}·a_{k-1} - (1-β_{k-1})·g_{k-1} + (1-β_k)·g_k

For a constant β this is exactly the paper's recursion.
"""

from __future__ import annotations

import torch
from torch import Tensor


class TwoBufferReference:
    """The paper's replacement for one tensor, in float64, keeping ``a`` and ``g_{k-1}``."""

    def __init__(self) -> None:
        self.accel: Tensor | None = None  # a_{k-1}
        self.prev_grad: Tensor | None = None  # g_{k-1}
        self.prev_beta: float = 0.0  # irrelevant at k = 1 (a_0 = g_0 = 0)

    def __call__(self, grad: Tensor, alpha: float, beta: float) -> Tensor:
        """Return ``g̃_k`` for ``g_k = grad`` (any dtype; computed in float64)."""
        g = grad.detach().to(torch.float64)
        if self.accel is None:
            self.accel = torch.zeros_like(g)
            self.prev_grad = torch.zeros_like(g)
        carried = self.prev_beta * self.accel - (1.0 - self.prev_beta) * self.prev_grad
        accel = carried + (1.0 - beta) * g
        self.accel, self.prev_grad, self.prev_beta = accel, g.clone(), beta
        return g + alpha * accel

    def scale(self, grad: Tensor, alpha: float) -> float:
        """``‖g‖ + |α|·‖a‖`` for the last call: the size of the summands of ``g̃``."""
        g = grad.detach().to(torch.float64)
        return float(g.norm()) + abs(alpha) * float(self.accel.norm())


def relative_error(actual: Tensor, expected: Tensor, scale: float) -> float:
    """``‖actual - expected‖ / scale`` in float64 (``scale`` > 0: the size of the operands)."""
    diff = actual.detach().to(torch.float64) - expected.to(torch.float64)
    return float(diff.norm()) / max(scale, 1e-300)
