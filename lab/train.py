"""The lab's training loop: LR scaling rule, warm-up, schedule, seeds, one host read per epoch.

``lr = lr₀ · rule(B / B_ref)`` with ``rule`` linear (Goyal et al.), square root (Krizhevsky;
the usual choice for adaptive methods) or none, ``B_ref = 128``; then a linear warm-up
from 0 over the first ``warmup_epochs`` and a cosine decay to 0, or steps of ×0.1 at 50 %
and 75 % of training, or a constant rate. A batch size at least the training-set size means
full batch; otherwise every epoch draws ``⌊n / B⌋`` disjoint batches of exactly ``B`` from a
fresh permutation (the remainder is left out), so every step sees the batch size asked for.

The seed fixes the train/test split, the initialisation, the batch order and the optimizer's
randomness (SPSA). Losses are accumulated on the device and read once per epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lab import registry
from lab.tasks import Task, load_task

REFERENCE_BATCH = 128
SCALINGS = ("sqrt", "linear", "none")
SCHEDULES = ("cosine", "step", "constant")


@dataclass
class TrainConfig:
    """What one training run needs besides the optimizer name and the seed."""

    task: str = "digits"
    model: str = "mlp"
    batch_size: int = 1024
    epochs: int = 150
    lr: float | None = None  # None: the optimizer's default at REFERENCE_BATCH
    lr_scaling: str = "sqrt"
    warmup_epochs: float = 10.0
    schedule: str = "cosine"
    weight_decay: float | None = None
    alpha: float | None = None  # None: adaptor.preset(batch_size)
    beta: float | None = None

    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` for anything a run cannot use."""
        from lab.tasks import check_task_model

        check_task_model(self.task, self.model)
        _positive_int("batch size", self.batch_size)
        _positive_int("epochs", self.epochs)
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"learning rate must be > 0, got {self.lr}")
        if self.lr_scaling not in SCALINGS:
            raise ValueError(
                f"unknown LR scaling rule {self.lr_scaling!r}; available: {', '.join(SCALINGS)}"
            )
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"unknown schedule {self.schedule!r}; available: {', '.join(SCHEDULES)}"
            )
        if not (math.isfinite(self.warmup_epochs) and self.warmup_epochs >= 0):
            raise ValueError(f"warm-up epochs must be >= 0, got {self.warmup_epochs}")
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise ValueError(f"weight decay must be >= 0, got {self.weight_decay}")
        # |α| < 1/(1-β) with the preset filling what is not given.
        registry.alpha_beta(self.batch_size, self.alpha, self.beta)


def _positive_int(what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{what} must be >= 1, got {value}")


def scaled_lr(lr: float, batch_size: int, rule: str, reference: int = REFERENCE_BATCH) -> float:
    """``lr · (B/B_ref)`` (linear), ``lr · √(B/B_ref)`` (sqrt) or ``lr`` (none)."""
    ratio = batch_size / reference
    if rule == "linear":
        return lr * ratio
    if rule == "sqrt":
        return lr * math.sqrt(ratio)
    if rule == "none":
        return lr
    raise ValueError(f"unknown LR scaling rule {rule!r}; available: {', '.join(SCALINGS)}")


def lr_multiplier(schedule: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """``step -> factor`` for step 0..total-1: linear warm-up, then the schedule."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule == "step":
            return 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
        raise ValueError(f"unknown schedule {schedule!r}")

    return factor


@dataclass
class RunResult:
    """One optimizer, one seed."""

    optimizer: str
    seed: int
    batch_size: int
    lr: float
    weight_decay: float
    alpha: float | None
    beta: float | None
    test_acc: float
    test_loss: float
    train_loss: float  # on the whole training set at the end
    wall_time: float
    diverged: bool
    steps: int
    curves: dict[str, list[float]] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """Flat fields for the CSV (no curves)."""
        out = asdict(self)
        out.pop("curves")
        return out


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, chunk: int = 2048) -> tuple[Tensor, Tensor]:
    """``(mean cross-entropy, accuracy)`` as 0-d tensors (no host read)."""
    was_training = model.training
    model.eval()
    loss = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    for start in range(0, x.shape[0], chunk):
        logits = model(x[start : start + chunk])
        target = y[start : start + chunk]
        loss += F.cross_entropy(logits, target, reduction="sum").double()
        correct += (logits.argmax(dim=1) == target).sum()
    model.train(was_training)
    n = x.shape[0]
    return loss / n, correct.double() / n


def effective_batch(batch_size: int, n_train: int) -> int:
    return min(batch_size, n_train)


def make_optimizer(
    name: str, model: nn.Module, config: TrainConfig, batch_size: int, seed: int
) -> registry.Built:
    spec, _ = registry.resolve(name)
    lr0 = spec.lr if config.lr is None else config.lr
    lr = scaled_lr(lr0, batch_size, config.lr_scaling)
    return registry.build(
        name,
        model,
        batch_size=batch_size,
        lr=lr,
        weight_decay=config.weight_decay,
        alpha=config.alpha,
        beta=config.beta,
        seed=seed,
    )


def train(
    name: str,
    config: TrainConfig,
    seed: int,
    *,
    task: Task | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    model_hook: Callable[[nn.Module, Task], None] | None = None,
    on_start: Callable[[nn.Module], None] | None = None,
    on_order: Callable[[Tensor], None] | None = None,
    epoch_hook: Callable[[int, nn.Module], None] | None = None,
) -> RunResult:
    """Train optimizer ``name`` on ``config.task`` with ``seed``; return metrics and curves.

    The model and the batches live on the device of ``task.x_train`` (move the task to run on
    a GPU). ``on_epoch(epoch, train_loss)`` is called after every epoch (progress bars).
    ``model_hook(model, task)`` sees the trained model (e.g. for a Hessian). ``on_start(model)``
    sees the initial model and ``on_order(permutation)`` each epoch's sample order (CPU tensor;
    not called at full batch): ``explore sweep`` checks with them that paired runs share both.
    ``epoch_hook(epoch, model)`` sees the model at initialisation (epoch 0) and after every
    epoch (e.g. to keep checkpoints).
    """
    config.validate()
    task = task if task is not None else load_task(config.task, seed)
    torch.manual_seed(seed)
    device = task.x_train.device
    model = task.make_model(config.model).to(device)  # initialised on the CPU generator
    if on_start is not None:
        on_start(model)
    n = task.x_train.shape[0]
    batch = effective_batch(config.batch_size, n)
    built = make_optimizer(name, model, config, batch, seed)
    optimizer = built.optimizer
    steps_per_epoch = max(1, n // batch)
    total = steps_per_epoch * config.epochs
    warmup = min(round(config.warmup_epochs * steps_per_epoch), total - 1)
    factor = lr_multiplier(config.schedule, total, warmup)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    generator = torch.Generator().manual_seed(seed)
    x_train, y_train = task.x_train, task.y_train

    batch_x: Tensor = x_train
    batch_y: Tensor = y_train
    last_loss: list[Tensor] = []

    if built.closure_kind == "loss":

        @torch.no_grad()
        def closure() -> Tensor:
            loss = F.cross_entropy(model(batch_x), batch_y)
            last_loss[:] = [loss]
            return loss

    else:

        def closure() -> Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(batch_x), batch_y)
            loss.backward()
            last_loss[:] = [loss]
            return loss

    curves: dict[str, list[float]] = {"epoch": [], "train_loss": [], "test_loss": [],
                                      "test_acc": []}
    diverged = False
    step = 0
    start = time.perf_counter()
    model.train()
    if epoch_hook is not None:
        epoch_hook(0, model)
    for epoch in range(1, config.epochs + 1):
        running = torch.zeros((), dtype=torch.float64, device=device)
        order = torch.randperm(n, generator=generator) if batch < n else None
        if order is not None and on_order is not None:
            on_order(order)
        for i in range(steps_per_epoch):
            if order is not None:
                index = order[i * batch : (i + 1) * batch].to(device)
                batch_x, batch_y = x_train[index], y_train[index]
            scale = factor(step)
            for group, lr in zip(optimizer.param_groups, base_lrs):
                group["lr"] = lr * scale
            returned = optimizer.step(closure)
            loss = returned if isinstance(returned, Tensor) else last_loss[0]
            running += loss.detach().double()
            step += 1
        test_loss, test_acc = evaluate(model, task.x_test, task.y_test)
        train_mean, test_loss_f, test_acc_f = torch.stack(
            [running / steps_per_epoch, test_loss, test_acc]
        ).tolist()  # the one host read of the epoch
        curves["epoch"].append(epoch)
        curves["train_loss"].append(train_mean)
        curves["test_loss"].append(test_loss_f)
        curves["test_acc"].append(test_acc_f)
        if on_epoch is not None:
            on_epoch(epoch, train_mean)
        if epoch_hook is not None:
            epoch_hook(epoch, model)
        if not math.isfinite(train_mean):
            diverged = True
            break
    wall = time.perf_counter() - start
    train_loss, _ = evaluate(model, x_train, y_train)
    test_loss, test_acc = evaluate(model, task.x_test, task.y_test)
    if model_hook is not None:
        model_hook(model, task)
    return RunResult(
        optimizer=name,
        seed=seed,
        batch_size=batch,
        lr=built.lr,
        weight_decay=built.weight_decay,
        alpha=built.alpha,
        beta=built.beta,
        test_acc=float(test_acc),
        test_loss=float(test_loss),
        train_loss=float(train_loss),
        wall_time=wall,
        diverged=diverged or not math.isfinite(float(train_loss)),
        steps=step,
        curves=curves,
    )
