"""SPSA step time as a multiple of one forward pass of the same model.

The baseline row is one forward pass (``no_grad``) of the benchmark model on a batch of
``BATCH`` inputs; every SPSA row evaluates that same forward in its closure, so its
``x baseline`` column *is* the step time in forward passes. The floor is ``2 × samples``
(two evaluations per direction); the excess is the perturbation (three in-place passes
over the parameters per sample), drawing ``Δ``, scaling the gradient, the replacement and
the base update. ``exact_restore=True`` (the path bf16/fp16 models take by default)
perturbs from a saved copy and regenerates ``Δ`` three times. A backprop step (forward +
backward + E(SGD)) is shown for comparison. The ``SPSA fused`` rows take the packed
one-pass kernels (``SPSA(fused=True)``: three passes over the parameters per sample, the
gradient written in the last) and E's fast path (``fused=True``); they compile on their
first (warm-up) step.
``state B/param B`` counts optimizer state only (the gradients SPSA writes are not state).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from adaptor import E, explore
from backends.zeroth_order import SPSA
from benchmarks.harness import DRY_RUN_MODEL, Row, Suite, build_model
from benchmarks.twins import TrafficTwin

BATCH = 64
_MODELS: dict[tuple, tuple[nn.Module, list[str], torch.Tensor]] = {}


def _shapes(params) -> tuple:
    return tuple(tuple(p.shape) for p in params)


def _model_for(params) -> tuple[nn.Module, list[str], torch.Tensor]:
    """The harness model whose parameters these are (on their device), its parameter names
    and an input."""
    params = list(params)
    device = params[0].device
    key = (_shapes(params), device)
    if key not in _MODELS:
        for name in ("mlp16m", "small200", DRY_RUN_MODEL):
            module = build_model(name)
            if _shapes(module.parameters()) == key[0]:
                names = [n for n, _ in module.named_parameters()]
                width = module[0].in_features
                inputs = torch.randn(BATCH, width, generator=torch.Generator().manual_seed(2))
                _MODELS[key] = (module.to(device), names, inputs.to(device))
                break
        else:
            raise ValueError("parameters of an unknown benchmark model")
    return _MODELS[key]


def _loss(params) -> torch.Tensor:
    module, names, inputs = _model_for(params)
    return functional_call(module, dict(zip(names, params)), (inputs,)).square().mean()


def _forward(_optimizer, params) -> None:
    with torch.no_grad():
        _loss(params)


def _closure_step(optimizer, params) -> object:
    return optimizer.step(lambda: _loss(params))


def _backprop_step(optimizer, params) -> object:
    def closure():
        optimizer.zero_grad()
        loss = _loss(params)
        loss.backward()
        return loss

    return optimizer.step(closure)


class SPSAThenBase:
    """SPSA and a base optimizer without the adaptor (no explore buffer)."""

    def __init__(self, estimator: SPSA, base: torch.optim.Optimizer) -> None:
        self.estimator, self.base = estimator, base

    def step(self, closure):
        loss = self.estimator.estimate(closure, self.base.param_groups)
        self.base.step()
        return loss


class SPSATwin:
    """The traffic twin of ``SPSA(fused=True)`` + ``E(SGD, fused=True)`` with one sample: the
    same two forward passes, and copy passes (``benchmarks.twins.TrafficTwin``,
    four large tensors per call) that move the arrays its three passes move: θ read and
    written before each evaluation, then θ and E's buffer c read and θ, c and g written (the
    update with SPSA's restore and gradient write fused in: 9 arrays). No random words, no
    arithmetic beyond a mean, no Python beyond the calls: its ratio is what the evaluations
    and the traffic alone cost on this machine, a floor for that row."""

    def __init__(self, params) -> None:
        self.perturb = TrafficTwin(params, (("p", "p"),))
        self.update = TrafficTwin(params, (("p c", "p c g"),))
        self.state = self.update.state  # c, as E's buffer: the state column reads 1.0

    @torch.no_grad()
    def step(self, closure):
        self.perturb.step()
        loss = closure()
        self.perturb.step()
        closure()
        self.update.step()
        return loss


def _sgd(params):
    return torch.optim.SGD(params, lr=1e-4)


def _adam(params):
    return torch.optim.Adam(params, lr=1e-4, foreach=True)


def _forward_only(params):
    _model_for(params)  # build the model outside the timed steps
    return torch.optim.SGD(params, lr=0.0)  # never stepped: a placeholder with no state


SUITE = Suite(
    name=f"zeroth_order: SPSA step in forward passes (batch {BATCH})",
    baseline=Row("one forward pass (no_grad)", _forward_only, step=_forward),
    rows=[
        Row("SPSA + SGD, no adaptor (floor 2x)", lambda p: SPSAThenBase(SPSA(seed=0), _sgd(p)),
            step=_closure_step),
        Row("SPSA+E(SGD) (floor 2x)", lambda p: explore(SPSA(seed=0), _sgd(p)),
            step=_closure_step),
        Row("SPSA+E(Adam) (floor 2x)", lambda p: explore(SPSA(seed=0), _adam(p)),
            step=_closure_step),
        Row("SPSA gaussian+E(SGD) (floor 2x)",
            lambda p: explore(SPSA(distribution="gaussian", seed=0), _sgd(p)),
            step=_closure_step),
        Row("SPSA fused + SGD, no adaptor (floor 2x)",
            lambda p: SPSAThenBase(SPSA(seed=0, fused=True), _sgd(p)), step=_closure_step),
        Row("SPSA fused+E(SGD) fused (floor 2x)",
            lambda p: explore(SPSA(seed=0, fused=True), _sgd(p), fused=True),
            step=_closure_step),
        Row("traffic twin of SPSA fused+E(SGD) fused: 2 forwards, copies of its 9 arrays",
            SPSATwin, step=_closure_step),
        Row("SPSA fused+E(Adam) fused (floor 2x)",
            lambda p: explore(SPSA(seed=0, fused=True), _adam(p), fused=True),
            step=_closure_step),
        Row("SPSA fused 4 samples+E(SGD) fused (floor 8x)",
            lambda p: explore(SPSA(samples=4, seed=0, fused=True), _sgd(p), fused=True),
            step=_closure_step),
        Row("SPSA 4 samples+E(SGD) (floor 8x)",
            lambda p: explore(SPSA(samples=4, seed=0), _sgd(p)), step=_closure_step),
        Row("SPSA exact_restore+E(SGD) (floor 2x)",
            lambda p: explore(SPSA(seed=0, exact_restore=True), _sgd(p)), step=_closure_step),
        Row("backprop E(SGD): forward+backward", lambda p: E(_sgd(p)), step=_backprop_step),
    ],
    notes=[
        "x baseline = SPSA step time in forward passes of the same model and batch",
        "floor: 2 x samples forward passes; the rest is perturbation, drawing Δ, the update",
        "state: E's one buffer per parameter (1.0); SPSA itself keeps two Python integers",
        "traffic twin: the same two forward passes and copy kernels that move the 9 arrays of "
        "the fused one-sample step (θ before each evaluation; θ, c read and θ, c, g written): "
        "what the evaluations and the traffic alone cost here, a floor for the row above it",
    ],
)
