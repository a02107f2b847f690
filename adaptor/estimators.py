"""Gradient estimators: step 1 of the generic algorithm, ``g_k = φ(θ_k, Z_k)``.

An estimator leaves ``g_k`` in ``p.grad`` for the parameters it estimates and returns the
loss (or ``None``). The explored optimizer then replaces the gradients in place and calls
the base optimizer. The protocol is deliberately small so that users can write their own:

    class MyEstimator(GradEstimator):
        requires_closure = True
        def estimate(self, closure, param_groups):
            ...                     # write p.grad for every parameter of param_groups
            return loss             # a tensor on the device, or None

Estimators must not read device values on the host (no ``.item()``, ``bool(tensor)``):
the explored optimizer's ``step()`` stays free of host synchronisation.

An estimator may also offer ``estimate_deferred(closure, param_groups) -> (loss, pending)``:
the same estimate with its last pass over some parameters left undone and described by a
:class:`DeferredRestore` (or ``None``), which the explored optimizer's fast path fuses into
its update kernel (SPSA does: its restore and gradient write, see ``adaptor.fastpath``).
"""

from __future__ import annotations

from collections.abc import Callable, Container, Sequence
from typing import Any

import torch

Closure = Callable[[], Any]


class GradEstimator:
    """Base class (and protocol) of gradient estimators.

    Attributes:
        requires_closure: ``True`` when ``estimate`` cannot work without a closure
            (finite-difference estimators evaluate the loss themselves).
    """

    requires_closure: bool = False

    def estimate(self, closure: Closure | None, param_groups: Sequence[dict]) -> Any:
        """Leave ``g_k`` in ``p.grad`` of the parameters in ``param_groups``; return the loss."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Whatever the estimator needs to resume bit-exactly (e.g. a random state)."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state_dict:
            raise ValueError(
                f"{type(self).__name__} keeps no state but the state dict holds "
                f"{sorted(state_dict)}"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Autograd(GradEstimator):
    """First-order estimation by backpropagation: ``g_k = ∇ℓ(θ_k, Z_k)``.

    Without a closure the gradients already in ``p.grad`` (from the user's
    ``loss.backward()``) are used as they are. With a closure, the closure is run under
    ``torch.enable_grad()`` and must call ``backward()`` itself, as torch's closures do.
    """

    requires_closure = False

    def estimate(self, closure: Closure | None, param_groups: Sequence[dict]) -> Any:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()


def check_estimator(estimator: object) -> GradEstimator:
    """Validate the estimator argument of :func:`adaptor.explore`."""
    if isinstance(estimator, type):
        raise TypeError(
            f"grad_estimator must be an instance, got the class {estimator.__name__}; "
            f"write {estimator.__name__}()"
        )
    if not callable(getattr(estimator, "estimate", None)):
        raise TypeError(
            "grad_estimator must implement estimate(closure, param_groups) "
            f"(see adaptor.GradEstimator), got {type(estimator).__name__}"
        )
    missing = [
        name
        for name in ("state_dict", "load_state_dict")
        if not callable(getattr(estimator, name, None))
    ]
    if missing:  # checkpoints call them; fail here, not at the first save
        raise TypeError(
            f"grad_estimator {type(estimator).__name__} lacks {' and '.join(missing)}; "
            "subclass adaptor.GradEstimator, which provides stateless defaults"
        )
    return estimator  # type: ignore[return-value]


class DeferredRestore:
    """The last pass of an estimate, left for the explored optimizer's fast path to fuse.

    SPSA with one sample ends with a pass that restores ``θ ← θ + c·Δ`` (the parameters
    are at ``θ − c·Δ`` after the second evaluation) and writes ``g = w·Δ`` into
    ``p.grad``, ``w = (f₊ − f₋)/(2c)``; the fast path then reads ``θ`` and ``g`` again.
    :meth:`SPSA.estimate_deferred <backends.zeroth_order.SPSA.estimate_deferred>` leaves
    that pass undone for its large packed-sign parameters and returns this record of it:
    the fast path's kernel (:mod:`adaptor.fastpath`) restores ``θ`` and forms ``g`` in
    registers (writing ``g`` to ``p.grad`` as the estimator would), three array passes
    fewer per parameter. Whatever it does not take, :meth:`finish` completes with the
    estimator's own kernel, before anything reads those gradients; :func:`adaptor.explore`
    also calls it when the step raises, so that no parameter is left perturbed.

    ``Δ`` of a parameter is given by its packed words (:mod:`adaptor.signs`), one int64
    word per 64 elements (the parameters here hold whole words); ``scalars(device, dtype)``
    gives ``c`` and ``w`` as that estimator's kernels take them (rounded once to
    ``dtype``), so that the fused pass gives the same bits.
    """

    def __init__(
        self,
        words: dict[int, Any],
        scalars: Callable[[torch.device, torch.dtype], tuple[Any, Any]],
        finish: Callable[[list[Any]], None],
    ) -> None:
        self._words = words  # id(parameter) -> (parameter, its words)
        self.scalars = scalars
        self._finish = finish

    def words(self, p: torch.Tensor) -> torch.Tensor | None:
        """The packed words of ``p``'s direction, or None when ``p`` is not pending."""
        entry = self._words.get(id(p))
        return None if entry is None else entry[1]

    def done(self, params: Sequence[torch.Tensor]) -> None:
        """``params`` were restored and given their gradient by the caller's kernel."""
        for p in params:
            self._words.pop(id(p), None)

    def finish(self, keep: Container[int] = ()) -> None:
        """Restore and write the gradient of every parameter still pending, except those
        whose ``id`` is in ``keep`` (the caller's kernel takes them)."""
        pending = [p for key, (p, _) in self._words.items() if key not in keep]
        self._words = {key: entry for key, entry in self._words.items() if key in keep}
        if pending:
            self._finish(pending)
