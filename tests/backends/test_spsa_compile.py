"""``torch.compile`` of a training step that calls ``explore(SPSA(...), SGD(...)).step(closure)``.

The direction draws (seeding a ``torch.Generator``) and the step counter run eagerly
(``torch.compiler.disable``); the closure's forward passes and the foreach perturbations are
traced. One small model, one test: compiling is slow.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from adaptor import explore
from backends import SPSA

STEPS = 5


def _problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    generator = torch.Generator().manual_seed(1)
    return model, torch.randn(32, 8, generator=generator), torch.randn(32, 2, generator=generator)


@pytest.mark.parametrize("samples", [1, 2])
def test_compiled_step_agrees_with_eager_and_stops_recompiling(samples):
    """Compiled and eager runs of 5 steps agree (float32: losses to rtol 1e-5, parameters to
    atol 3e-6); after the second step (``p.grad`` goes from ``None`` to a tensor) nothing
    recompiles.

    The tolerance: inductor's fused forward may round the loss (|f| ≈ 1.2) differently from
    eager by an ulp or so (1.2e-7; it depends on the CPU's vector width: 0 on some machines,
    1-2 ulp on AVX-512 ones). The estimate divides the difference of two such losses by
    ``2c = 2e-2``: up to 1.2e-5 per element of ``g``, times ``1 + |α|(1-β) = 1.05`` through
    the replacement and lr 0.05 per step, so at most ~6e-7 per step and 3e-6 over 5 steps
    (1.1e-6 observed with 2 samples on an AVX-512 CPU). A wrong step moves parameters by
    ~lr·|g| ~ 1e-2. Mutation caught: ``_advance`` (``step += 1``) traced instead of run
    eagerly — the graph then guards on the step counter and recompiles every step.
    """
    torch._dynamo.reset()
    model, x, y = _problem()
    twin = copy.deepcopy(model)

    def build(m):
        return explore(SPSA(perturbation=1e-2, samples=samples, seed=0),
                       torch.optim.SGD(m.parameters(), lr=0.05))  # default α, β, fused

    optimizer, eager_optimizer = build(model), build(twin)

    def train_step():
        return optimizer.step(lambda: torch.nn.functional.mse_loss(model(x), y))

    compiled = torch.compile(train_step)
    counters.clear()
    losses, eager_losses, graphs = [], [], []
    for _ in range(STEPS):
        losses.append(compiled())
        graphs.append(counters["stats"]["unique_graphs"])
        eager_losses.append(
            eager_optimizer.step(lambda: torch.nn.functional.mse_loss(twin(x), y))
        )
    torch.testing.assert_close(torch.stack(losses), torch.stack(eager_losses),
                               rtol=1e-5, atol=0.0)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0.0, atol=3e-6)
    assert optimizer.estimator.step == eager_optimizer.estimator.step == STEPS
    assert graphs[1] == graphs[-1], f"recompiled after the second step: {graphs}"
