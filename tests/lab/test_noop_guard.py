"""Every optimizer name of the lab must train: a short full-batch run lowers the full-batch
training loss below its value at initialisation. A registered optimizer whose step does
nothing (alone or under the adaptor) fails that check."""

from __future__ import annotations

import pytest
import torch
from torch.optim import Optimizer

from lab import registry
from lab.tasks import load_task
from lab.train import TrainConfig, evaluate, train

FULL_BATCH = 10**6  # >= the training set: every step sees all of it

# Drop of the full-batch training loss (nats) required; a no-op step gives exactly 0.
# Measured on digits from ln 10 ≈ 2.31 (seed 0): 2 full-batch steps drop it by 0.056 (Lamb,
# ALTO, E-SGD) to 0.27 (AdaBelief); 30 SPSA steps by 0.029 (SGD) to 0.088 (Adam), seeds 0
# and 1. 10 SPSA steps are too few: one random direction stream raised SPSA+Adam's loss by
# 0.007 at seed 0 (Adam moves every coordinate by ~lr whatever the estimate's size).
MIN_DROP = {"first": 0.02, "zeroth": 0.01}
ZEROTH_ORDER_STEPS = 30


def full_batch_drop(name: str, seed: int = 0) -> tuple[float, float]:
    """``(initial, final)`` full-batch training loss of a short full-batch run of ``name``."""
    spec, _ = registry.resolve(name)
    epochs = ZEROTH_ORDER_STEPS if spec.zeroth_order else 2
    config = TrainConfig(epochs=epochs, batch_size=FULL_BATCH, warmup_epochs=0)
    task = load_task("digits", seed)
    torch.manual_seed(seed)  # the initialisation train() starts from
    initial, _ = evaluate(task.make_model("mlp"), task.x_train, task.y_train)
    result = train(name, config, seed, task=task)
    assert result.steps == epochs  # full batch: one step an epoch
    return float(initial), result.train_loss


def check_lowers_loss(name: str) -> None:
    """The guard: ``AssertionError`` naming the optimizer unless its run lowers the loss."""
    spec, _ = registry.resolve(name)
    initial, final = full_batch_drop(name)
    margin = MIN_DROP["zeroth" if spec.zeroth_order else "first"]
    assert final < initial - margin, (
        f"{name}: full-batch training loss {initial:.4f} -> {final:.4f} (needs a drop of "
        f"{margin:g}); its step does not train"
    )


@pytest.mark.parametrize("name", registry.available())
def test_every_optimizer_lowers_the_full_batch_loss(name):
    check_lowers_loss(name)


class NoOp(Optimizer):
    """An optimizer whose step evaluates the closure and changes nothing."""

    def __init__(self, params, lr: float = 1e-3) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()


def test_a_registered_noop_is_caught(monkeypatch):
    """Mutation check of the guard: register ``noop`` (and so ``e-noop``, E over it, which the
    parametrized test above would pick up from ``registry.available()``): both fail it."""
    spec = registry.Spec("noop", "does nothing", 1e-2, 0.0,
                         lambda model, lr, weight_decay, **_: NoOp(model.parameters(), lr=lr))
    monkeypatch.setitem(registry.SPECS, "noop", spec)
    assert {"noop", "e-noop"} <= set(registry.available())
    for name in ("noop", "e-noop"):
        with pytest.raises(AssertionError, match=f"{name}: full-batch training loss"):
            check_lowers_loss(name)
        initial, final = full_batch_drop(name)
        assert final == initial  # nothing moved at all
