"""SPSA's last pass fused into E's fast path (``adaptor.estimators.DeferredRestore``).

With one sample, ``explore(SPSA(fused=True), SGD/Adam/AdamW, fused=True)`` leaves the
restore ``θ ← θ + cΔ`` and the gradient ``g = (f₊ − f₋)/(2c)·Δ`` of its large whole-word
parameters to the fast path's kernel, which forms both in registers. These tests pin:

* the result equals the unfused sequence (SPSA's own restore pass, then the fast path) bit
  for bit, parameters and gradients, for every base kind, in float32 and float64;
* a float64 reference written from the formulas (SPSA's estimate with the documented
  signs, the paper's replacement, SGD with momentum);
* a step that raises after the estimate leaves no parameter perturbed;
* nothing is deferred when something reads the gradients first (``skip_nonfinite``,
  telemetry).
"""

from __future__ import annotations

import pytest
import torch

from adaptor import explore, fastpath
from adaptor.explore import ExploredOptimizer
from backends.zeroth_order import SPSA
from tests.adaptor.reference import TwoBufferReference
from tests.backends.test_spsa_packed import _reference_signs

# A whole-word large tensor (deferred), a large one with a partial last word (SPSA's own
# restore pass, then the fast path) and a small one (generic path).
SHAPES = ((256, 320), (300, 257), (10,))
WHOLE_WORDS = 1  # how many of SHAPES the fast path takes with a deferred restore

BASES = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-2),
    "sgd-nesterov-wd": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True,
                                                  weight_decay=0.1),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw-amsgrad": lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True, weight_decay=0.1),
}


def _run(base, dtype, steps=5, **options):
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=generator, dtype=dtype).requires_grad_() for s in SHAPES]
    weights = [torch.randn(s, generator=generator, dtype=dtype) for s in SHAPES]
    optimizer = explore(SPSA(seed=3, fused=True), BASES[base](params), alpha=0.5, beta=0.1,
                        fused=True, **options)
    for _ in range(steps):
        optimizer.step(lambda: sum((w * p.sin()).sum() for w, p in zip(weights, params)))
    return params


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("base", sorted(BASES))
def test_fused_restore_equals_the_separate_passes_bit_for_bit(monkeypatch, base, dtype):
    before = dict(fastpath.counters)
    fused = _run(base, dtype)
    deferred = fastpath.counters["deferred"] - before["deferred"]
    # every step after the first (which creates the state) defers the whole-word tensor
    assert deferred == WHOLE_WORDS * 4
    monkeypatch.setattr(ExploredOptimizer, "_may_defer", lambda self: False)
    before = dict(fastpath.counters)
    separate = _run(base, dtype)
    assert fastpath.counters["deferred"] == before["deferred"]
    assert fastpath.counters["fast"] - before["fast"] == 2 * 4  # both large tensors, still
    for a, b in zip(fused, separate):
        assert torch.equal(a, b)
        assert torch.equal(a.grad, b.grad)


def test_fused_restore_matches_a_float64_reference():
    """Three steps of E(SGD(momentum)) on SPSA estimates, one 128×512 float64 parameter
    (whole words): steps 2 and 3 take the fused restore. The reference perturbs an exact
    θ and follows the paper's two-buffer replacement and torch's SGD with momentum. The
    in-place walk moves θ by an ulp, which moves ``f₊ − f₋`` by ~1e-14 and the estimate,
    divided by 2c, by ~1e-11 (|f| ~ 100): the tolerances sit just above that, while a restore left
    out moves θ by c = 1e-3 and a wrong coefficient by ~lr·|g| ~ 1e-2."""
    c, lr, momentum, alpha, beta, seed = 1e-3, 1e-4, 0.9, 0.5, 0.1, 7
    generator = torch.Generator().manual_seed(1)
    start = torch.randn(128, 512, generator=generator, dtype=torch.float64)
    weight = torch.randn(128, 512, generator=generator, dtype=torch.float64)

    def loss(theta):
        return (weight * theta.sin()).sum()

    param = start.clone().requires_grad_()
    optimizer = explore(SPSA(perturbation=c, seed=seed, fused=True),
                        torch.optim.SGD([param], lr=lr, momentum=momentum), alpha=alpha,
                        beta=beta, fused=True)
    before = fastpath.counters["deferred"]
    for _ in range(3):
        optimizer.step(lambda: loss(param))
    assert fastpath.counters["deferred"] - before == 2

    theta, replace, buffer = start.reshape(-1).clone(), TwoBufferReference(), None
    for step in range(3):
        delta = _reference_signs(seed, step, 0, 0, theta.numel(), 1 << 20)
        plus = loss((theta + c * delta).reshape(128, 512))
        minus = loss((theta - c * delta).reshape(128, 512))
        g = (plus - minus) / (2 * c) * delta
        g_tilde = replace(g, alpha, beta)
        buffer = g_tilde.clone() if buffer is None else momentum * buffer + g_tilde
        theta = theta - lr * buffer
    # observed: 1.4e-14 on θ (|θ| ~ 1), 3e-11 on g (|g| ~ 90)
    torch.testing.assert_close(param.detach().reshape(-1), theta, rtol=0, atol=1e-12)
    # p.grad holds the last estimate g (not g̃), as SPSA writes it
    torch.testing.assert_close(param.grad.reshape(-1), g, rtol=0, atol=1e-9)


def test_a_step_that_raises_after_the_estimate_leaves_no_parameter_perturbed(monkeypatch):
    """The fast path's kernel raises on the second step: the deferred restore is finished
    by SPSA's own pass, so the parameters and gradients are bit for bit what
    ``SPSA.estimate`` alone leaves (not ``θ − cΔ``)."""
    generator = torch.Generator().manual_seed(2)
    param = torch.randn(256, 256, generator=generator).requires_grad_()
    optimizer = explore(SPSA(seed=4, fused=True), torch.optim.SGD([param], lr=1e-2),
                        alpha=0.5, beta=0.1, fused=True)
    optimizer.step(lambda: param.sin().sum())  # state created (generic path)

    twin = param.detach().clone().requires_grad_()
    spsa = SPSA(seed=4, fused=True)
    spsa.load_state_dict(optimizer.estimator.state_dict())

    def broken(*args, **kwargs):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(fastpath, "_kernel", lambda *args, **kwargs: broken)
    with pytest.raises(RuntimeError, match="kernel failed"):
        optimizer.step(lambda: param.sin().sum())
    spsa.estimate(lambda: twin.sin().sum(), [{"params": [twin]}])
    assert torch.equal(param.detach(), twin.detach())
    assert torch.equal(param.grad, twin.grad)


@pytest.mark.parametrize("option", [{"skip_nonfinite": True}, {"telemetry": True}])
def test_nothing_is_deferred_when_the_gradients_are_read_first(option):
    before = fastpath.counters["deferred"]
    _run("sgd", torch.float32, steps=3, **option)
    assert fastpath.counters["deferred"] == before


def test_a_subclass_that_overrides_estimate_alone_is_called():
    """``estimate_deferred`` would bypass an overridden ``estimate``: such a subclass is
    estimated through its own ``estimate`` (nothing deferred)."""
    calls = []

    class Counting(SPSA):
        def estimate(self, closure, param_groups):
            calls.append(1)
            return super().estimate(closure, param_groups)

    param = torch.randn(256, 256).requires_grad_()
    optimizer = explore(Counting(seed=1, fused=True), torch.optim.SGD([param], lr=1e-2),
                        alpha=0.5, beta=0.1, fused=True)
    before = fastpath.counters["deferred"]
    for _ in range(3):
        optimizer.step(lambda: param.sin().sum())
    assert len(calls) == 3
    assert fastpath.counters["deferred"] == before


def test_the_cuda_scalar_form_agrees_and_does_not_recompile_as_c_changes():
    """On CUDA the fused restore gets ``c`` as a Python float (``kernel_scalars`` off CPU)
    and ``w`` as the loss's 0-d tensor. The same compiled kernel, given that form here on
    CPU tensors, equals the CPU form (``c`` a 0-d tensor), bit for bit, and a new ``c`` at
    every call does not recompile it (the float is an input, not a constant of the graph)."""
    from torch._dynamo.utils import counters

    from adaptor.replacement import pack_scalars
    from adaptor.signs import blocks

    cpu = torch.device("cpu")
    kernel = fastpath._kernel("sgd", cpu, ("cuda-form-test", True))
    generator = torch.Generator().manual_seed(6)
    n = 1 << 16
    start = [torch.randn(n, generator=generator) for _ in range(3)]  # θ, g, c
    words = torch.empty(n // 64, dtype=torch.int64).random_(-(2**63), None,
                                                           generator=generator)
    float_form = [t.clone() for t in start]
    tensor_form = [t.clone() for t in start]
    named = {"k1": 1.05, "alpha": 0.5, "pc": 0.9, "qc": 0.05, "neg_lr": -0.01, "wd": None,
             "momentum": None, "damp1": None}
    values, layout = pack_scalars(cpu, torch.float32, named)
    graphs = []
    for k in range(6):
        c = 1e-3 * (1 + k)
        weight = torch.tensor(0.3 + k, dtype=torch.float64)  # a float64 loss difference
        for form, shift, w in ((float_form, c, weight),
                               (tensor_form, torch.tensor(c, dtype=torch.float32),
                                weight.to(torch.float32))):
            ps, gs, cs = ([blocks(t)] for t in form)
            kernel(ps, gs, cs, None, None, values, ([words], shift, w), layout=layout,
                   maximize=False, nesterov=False)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[-1], f"recompiled as c changed: {graphs}"
    for a, b in zip(float_form, tensor_form):
        assert torch.equal(a, b)
