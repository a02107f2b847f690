"""Experiment tasks: real data (scikit-learn's bundled digits) and a generated one.

- ``digits``: 1,797 8×8 handwritten digits shipped with scikit-learn (no download);
  a stratified 80/20 split per seed (1,437 train / 360 test), pixels scaled to [0, 1].
- ``synthetic``: 5,000 points in 32-D labelled by a random two-layer teacher into 10 classes,
  with 10 % of the labels flipped; the data are fixed, the 80/20 split follows the seed.

Models: ``mlp`` (one hidden layer of 128 ReLU units) or ``cnn`` (two 3×3 convolutions and a
linear head, digits only).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

TASKS = ("digits", "synthetic")
MODELS = ("mlp", "cnn")


@dataclass
class Task:
    """A classification problem, already on tensors."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    image_shape: tuple[int, int] | None  # (H, W) when the inputs are images

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])

    def make_model(self, kind: str = "mlp", hidden: int = 128) -> nn.Module:
        """A fresh model (initialised from torch's global generator: seed it first)."""
        if kind == "mlp":
            return nn.Sequential(
                nn.Linear(self.num_features, hidden), nn.ReLU(), nn.Linear(hidden, self.num_classes)
            )
        if kind == "cnn":
            if self.image_shape is None:
                raise ValueError(f"model 'cnn' needs an image task, and {self.name!r} is not one")
            h, w = self.image_shape
            return nn.Sequential(
                nn.Unflatten(1, (1, h, w)),
                nn.Conv2d(1, 16, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(16, 32, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(32 * (h // 2) * (w // 2), self.num_classes),
            )
        raise ValueError(f"unknown model {kind!r}; available: {', '.join(MODELS)}")


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.data / 16.0).astype(np.float32), data.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _synthetic(n: int = 5000, dim: int = 32, classes: int = 10, noise: float = 0.1):
    rng = np.random.default_rng(12345)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    w1 = rng.standard_normal((dim, 64)) / np.sqrt(dim)
    w2 = rng.standard_normal((64, classes)) / np.sqrt(64)
    y = np.argmax(np.tanh(x @ w1) @ w2, axis=1)
    flip = rng.random(n) < noise
    y[flip] = rng.integers(0, classes, flip.sum())
    return x, y.astype(np.int64)


def load_task(name: str, seed: int = 0, test_fraction: float = 0.2) -> Task:
    """Task ``name`` with the train/test split of ``seed`` (stratified, deterministic)."""
    from sklearn.model_selection import train_test_split

    if name == "digits":
        x, y = _digits()
        image_shape: tuple[int, int] | None = (8, 8)
    elif name == "synthetic":
        x, y = _synthetic()
        image_shape = None
    else:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return Task(
        name=name,
        x_train=torch.from_numpy(np.ascontiguousarray(x_tr)),
        y_train=torch.from_numpy(np.ascontiguousarray(y_tr)),
        x_test=torch.from_numpy(np.ascontiguousarray(x_te)),
        y_test=torch.from_numpy(np.ascontiguousarray(y_te)),
        num_classes=int(y.max()) + 1,
        image_shape=image_shape,
    )
