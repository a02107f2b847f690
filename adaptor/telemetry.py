"""Optional per-step telemetry of the replacement, kept on the device (no host reads).

For a research question such as "how large is the exploration term against the gradient?"
the explored optimizer can record, at every step::

    grad_norm  = ‖g_k‖                 (the estimator's gradient, before the replacement)
    accel_norm = ‖a_k‖                 (the EMA of gradient differences)
    ratio      = ‖α·a_k‖ / ‖g_k‖       (= |α|·‖a‖/‖g‖ when every group shares α)

Norms are over all parameters that have a gradient. With ``c_k`` the adaptor's buffer,
``a_k = c_k + (1-β)·g_k``. Reading the values (``.item()``) is the caller's choice and the
only synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _at_least_float32(norms: Tensor) -> Tensor:
    """Half/bfloat16 norms in float32, float64 norms kept in float64."""
    return norms.to(torch.promote_types(norms.dtype, torch.float32))


class Telemetry:
    """Accumulates squared norms bucket by bucket during one step."""

    def __init__(self) -> None:
        self.last: dict[str, Tensor] | None = None
        self._grad_sq: list[Tensor] = []
        self._accel_sq: list[Tensor] = []
        self._scaled_sq: list[Tensor] = []

    def begin(self) -> None:
        self._grad_sq, self._accel_sq, self._scaled_sq = [], [], []

    def observe(
        self, grads: Sequence[Tensor], buffers: Sequence[Tensor], alpha: float, beta: float
    ) -> None:
        """Record one (device, dtype) bucket; call before the replacement modifies it.

        Computed in the replacement's work dtype (the buffer's, at least float32).
        """
        work = torch.promote_types(buffers[0].dtype, torch.float32)
        grads = [g if g.dtype == work else g.to(work) for g in grads]
        buffers = [c if c.dtype == work else c.to(work) for c in buffers]
        accel = torch._foreach_add(buffers, grads, alpha=1.0 - beta)  # a_k = c_k + s·g_k
        grad_sq = _at_least_float32(torch.stack(torch._foreach_norm(grads))).square().sum()
        accel_sq = _at_least_float32(torch.stack(torch._foreach_norm(accel))).square().sum()
        self._grad_sq.append(grad_sq)
        self._accel_sq.append(accel_sq)
        self._scaled_sq.append(accel_sq * (alpha * alpha))

    def end(self) -> None:
        if not self._grad_sq:
            return
        device = self._grad_sq[0].device

        def total(parts: list[Tensor]) -> Tensor:
            return torch.stack([part.to(device, non_blocking=True) for part in parts]).sum()

        grad_norm = total(self._grad_sq).sqrt()
        self.last = {
            "grad_norm": grad_norm,
            "accel_norm": total(self._accel_sq).sqrt(),
            "ratio": total(self._scaled_sq).sqrt() / grad_norm.clamp_min(torch.finfo().tiny),
        }
