"""Bring your own data set and model to the lab: a plug-in task.

    explore compare --task examples/custom_task.py:make_task --model polar
    explore compare --task examples.custom_task:make_task          # as a module, from here
    explore flatness --task examples/custom_task.py:make_task --epochs 30

The lab calls ``make_task(seed)`` once per seed and expects a ``lab.tasks.Task``: training and
test tensors (inputs floating, sample dimension first; labels int64 in ``0 … num_classes-1``)
and, optionally, model factories by name in ``models`` (``--model`` picks one; ``mlp``, the
lab's one-hidden-layer MLP on flat inputs, is always there unless you override it). The seed
should fix everything random in the data (here: the split); the lab seeds torch itself before
each model is built, so the factories need no seed.

This example: two interleaved noisy spirals in 2-D, three arms each, as a 2-class problem,
with a small MLP and a second model that sees the inputs' polar coordinates.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lab.tasks import Task


def _spirals(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` points per class on two interleaved spirals with Gaussian noise 0.15."""
    t = torch.rand(2 * n, generator=generator) * 3 * math.pi + 0.5
    labels = torch.arange(2).repeat_interleave(n)
    angle = t + math.pi * labels
    x = torch.stack([t * torch.cos(angle), t * torch.sin(angle)], dim=1) / (3 * math.pi)
    x = x + 0.03 * torch.randn(x.shape, generator=generator)
    return x.float(), labels


class PolarNet(nn.Module):
    """Logits from ``(x, y, r, sin θ, cos θ)``: the spirals are nearly linear in these."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, hidden), nn.Tanh(), nn.Linear(hidden, 2))

    def forward(self, x: Tensor) -> Tensor:
        r = x.norm(dim=1, keepdim=True)
        angle = torch.atan2(x[:, 1:2], x[:, 0:1])
        return self.net(torch.cat([x, r, torch.sin(angle), torch.cos(angle)], dim=1))


def make_task(seed: int) -> Task:
    """2,000 points (1,600 train / 400 test); ``seed`` draws the points and the split."""
    generator = torch.Generator().manual_seed(seed)
    x, y = _spirals(1000, generator)
    order = torch.randperm(len(y), generator=generator)
    train, test = order[:1600], order[1600:]
    return Task(
        name="spirals",
        x_train=x[train],
        y_train=y[train],
        x_test=x[test],
        y_test=y[test],
        num_classes=2,
        models={
            "polar": PolarNet,
            "tiny_mlp": lambda: nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 2)),
        },
    )
