"""Experiment tasks: real data (scikit-learn's digits, MNIST-1D), a generated one, and plug-ins.

- ``digits``: 1,797 8×8 handwritten digits shipped with scikit-learn (no download);
  a stratified 80/20 split per seed (1,437 train / 360 test), pixels scaled to [0, 1].
- ``synthetic``: 5,000 points in 32-D labelled by a random two-layer teacher into 10 classes,
  with 10 % of the labels flipped; the data are fixed, the 80/20 split follows the seed.
- ``mnist1d`` (``mnist1d@N`` for ``N`` samples in all; default 5,000): MNIST-1D
  (Greydanus 2020), 1-D signals of length 40 in 10 classes, *generated locally* by
  ``mnist1d.data.make_dataset`` with the package's default arguments and the run's seed
  (never its download helper: nothing touches the network or the disk). The seed fixes the
  whole data set (templates transformed at random, then shuffled); the first 80 % are the
  training set (4,000 / 1,000 at the default size, the paper's split). Generation takes a few
  seconds (about 0.6 ms a sample); a data set is kept in memory for the process's lifetime.
- ``module:function`` (or ``path/to/file.py:function``): a plug-in. ``function(seed)`` returns
  a :class:`Task` (its splits and, optionally, its own model factories in ``Task.models``);
  see ``examples/custom_task.py``. The module is imported from the current directory too.

Models: ``mlp`` (one hidden layer of 128 ReLU units, on flat inputs) or ``cnn`` (two 3×3
convolutions and a linear head, digits only). For ``mnist1d`` the two reference models of its paper:
``mlp`` = 40 → 100 → 100 → 10 with ReLU (the second hidden layer residual, as in the
reference code), ``cnn`` = three 1-D convolutions of 25 channels (kernel 5 then 3 and 3,
stride 2, padding 1, ReLU) and a linear layer on the flattened 25 × 5 features.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import random
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

TASKS = ("digits", "synthetic", "mnist1d")
MODELS = ("mlp", "cnn")
MNIST1D_DEFAULT_SAMPLES = 5000
MNIST1D_MIN_SAMPLES = 20  # two per class at least, so that both splits are non-empty


@dataclass
class Task:
    """A classification problem, already on tensors.

    Attributes:
        name: shown in tables and titles.
        x_train, y_train, x_test, y_test: inputs (floating, first dimension the sample) and
            integer class labels ``0 … num_classes-1`` (1-D, int64).
        num_classes: the number of classes.
        image_shape: ``(H, W)`` when the flat inputs are images (enables the built-in ``cnn``).
        models: model factories by name, ``models[kind]()`` → a fresh ``nn.Module`` mapping
            inputs to logits; a name here overrides the built-in model of that name.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    image_shape: tuple[int, int] | None = None  # (H, W) when the inputs are images
    models: Mapping[str, Callable[[], nn.Module]] = field(default_factory=dict)

    @property
    def num_features(self) -> int:
        return int(self.x_train[0].numel())

    def model_names(self) -> list[str]:
        """The names :meth:`make_model` accepts for this task."""
        builtin = ["mlp"] + (["cnn"] if self.image_shape is not None else [])
        return list(self.models) + [n for n in builtin if n not in self.models]

    def make_model(self, kind: str = "mlp", hidden: int = 128) -> nn.Module:
        """A fresh model (initialised from torch's global generator: seed it first)."""
        if kind in self.models:
            model = self.models[kind]()
            if not isinstance(model, nn.Module):
                raise TypeError(f"task {self.name!r}: models[{kind!r}]() returned "
                                f"{type(model).__name__}, expected a torch.nn.Module")
            return model
        if kind == "mlp":
            return nn.Sequential(
                nn.Linear(self.num_features, hidden), nn.ReLU(), nn.Linear(hidden, self.num_classes)
            )
        if kind == "cnn" and self.image_shape is not None:
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
        if kind == "cnn":
            raise ValueError(f"model 'cnn' needs an image task, and {self.name!r} is not one")
        raise ValueError(f"unknown model {kind!r} for task {self.name!r}; available: "
                         f"{', '.join(self.model_names())}")


# -- built-in data ------------------------------------------------------------------------------


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


@functools.lru_cache(maxsize=8)
def _mnist1d(samples: int, seed: int, train_split: float) -> dict[str, np.ndarray]:
    """``mnist1d.data.make_dataset`` with the package's default arguments and ``seed``.

    The package seeds numpy's and Python's global generators; their states are restored
    afterwards so that generating data leaves the caller's randomness alone.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as error:
        raise ImportError(
            "task 'mnist1d' needs the mnist1d package: pip install 'explore-optim[lab]' "
            f"(or pip install mnist1d) ({error})"
        ) from error
    args = get_dataset_args()
    args.num_samples = samples
    args.seed = seed
    args.train_split = train_split
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    out = {key: np.array(data[key], copy=True) for key in ("x", "y", "x_test", "y_test")}
    for array in out.values():
        array.setflags(write=False)  # cached: nobody may change it in place
    return out


def mnist1d_mlp(length: int = 40, classes: int = 10, hidden: int = 100) -> nn.Module:
    """MNIST-1D's reference MLP: ``h₁ = relu(W₁x)``, ``h₂ = h₁ + relu(W₂h₁)``, ``W₃h₂``."""
    return _ResidualMLP(length, classes, hidden)


class _ResidualMLP(nn.Module):
    def __init__(self, length: int, classes: int, hidden: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(length, hidden)
        self.linear2 = nn.Linear(hidden, hidden)
        self.linear3 = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.linear1(x.flatten(1)).relu()
        h = h + self.linear2(h).relu()
        return self.linear3(h)


def mnist1d_cnn(length: int = 40, classes: int = 10, channels: int = 25) -> nn.Module:
    """MNIST-1D's reference 1-D CNN: conv(k5) → conv(k3) → conv(k3), each ``channels`` wide,
    stride 2, padding 1, ReLU; then a linear layer on the flattened features.

    Each convolution maps length ``L`` to ``⌊(L + 2 − k)/2⌋ + 1``: 40 → 19 → 10 → 5.
    """
    out = length
    for kernel in (5, 3, 3):
        out = (out + 2 - kernel) // 2 + 1
    return nn.Sequential(
        nn.Unflatten(1, (1, length)),
        nn.Conv1d(1, channels, 5, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * out, classes),
    )


def _mnist1d_samples(spec: str) -> int:
    """``mnist1d`` → the default size; ``mnist1d@N`` → ``N`` (checked)."""
    _, at, text = spec.partition("@")
    if not at:
        return MNIST1D_DEFAULT_SAMPLES
    try:
        samples = int(text)
    except ValueError:
        raise ValueError(f"task {spec!r}: the size after '@' must be an integer number of "
                         f"samples, e.g. mnist1d@{MNIST1D_DEFAULT_SAMPLES}") from None
    if samples < MNIST1D_MIN_SAMPLES:
        raise ValueError(f"task {spec!r}: mnist1d needs >= {MNIST1D_MIN_SAMPLES} samples, "
                         f"got {samples}")
    return samples


def _load_mnist1d(spec: str, seed: int, test_fraction: float) -> Task:
    samples = _mnist1d_samples(spec)
    data = _mnist1d(samples, int(seed), 1.0 - test_fraction)
    length = int(data["x"].shape[1])
    name = "mnist1d" if samples == MNIST1D_DEFAULT_SAMPLES else f"mnist1d@{samples}"
    return Task(
        name=name,
        x_train=torch.tensor(data["x"], dtype=torch.float32),
        y_train=torch.tensor(data["y"], dtype=torch.int64),
        x_test=torch.tensor(data["x_test"], dtype=torch.float32),
        y_test=torch.tensor(data["y_test"], dtype=torch.int64),
        num_classes=10,
        image_shape=None,
        models={"mlp": functools.partial(mnist1d_mlp, length, 10),
                "cnn": functools.partial(mnist1d_cnn, length, 10)},
    )


# -- plug-ins -----------------------------------------------------------------------------------


def is_plugin(spec: str) -> bool:
    """``module:function`` or ``file.py:function`` (a colon, not a built-in name)."""
    return ":" in spec


def _import_plugin(spec: str) -> Callable[..., object]:
    """The callable named by ``module:function`` / ``path/to/file.py:function``."""
    module_name, _, attribute = spec.rpartition(":")
    if not module_name or not attribute:
        raise ValueError(f"task {spec!r}: a plug-in task is module:function (e.g. "
                         "examples.custom_task:make_task or examples/custom_task.py:make_task)")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ValueError(f"task {spec!r}: no such file {module_name!r}")
        unique = f"_explore_task_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(unique, path)
        if module_spec is None or module_spec.loader is None:
            raise ValueError(f"task {spec!r}: cannot load {module_name!r} as a Python module")
        module = sys.modules.get(unique)
        if module is None:
            module = importlib.util.module_from_spec(module_spec)
            try:
                module_spec.loader.exec_module(module)
            except Exception as error:
                raise ValueError(f"task {spec!r}: importing {module_name!r} failed: "
                                 f"{type(error).__name__}: {error}") from error
            sys.modules[unique] = module
    else:
        # The current directory first, as `python -m` would have it: the `explore` script's
        # sys.path holds its own folder instead.
        added = os.getcwd() not in sys.path
        if added:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ValueError(f"task {spec!r}: cannot import module {module_name!r} "
                             f"({error})") from error
        except Exception as error:
            raise ValueError(f"task {spec!r}: importing {module_name!r} failed: "
                             f"{type(error).__name__}: {error}") from error
        finally:
            if added:
                sys.path.remove(os.getcwd())
    function = getattr(module, attribute, None)
    if function is None:
        raise ValueError(f"task {spec!r}: module {module_name!r} has no attribute "
                         f"{attribute!r}")
    if not callable(function):
        raise ValueError(f"task {spec!r}: {module_name}:{attribute} is a "
                         f"{type(function).__name__}, not a function")
    return function


def _check_plugin_task(spec: str, task: object, seed: int) -> Task:
    where = f"task {spec!r}: {spec.rpartition(':')[2]}(seed={seed})"
    if not isinstance(task, Task):
        raise TypeError(f"{where} returned {type(task).__name__}, expected lab.tasks.Task")
    if not isinstance(task.num_classes, int) or task.num_classes < 2:
        raise ValueError(f"{where}: num_classes must be an integer >= 2, got "
                         f"{task.num_classes!r}")
    for split in ("train", "test"):
        x, y = getattr(task, f"x_{split}"), getattr(task, f"y_{split}")
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise TypeError(f"{where}: x_{split} and y_{split} must be tensors, got "
                            f"{type(x).__name__} and {type(y).__name__}")
        if not x.is_floating_point() or x.dim() < 2:
            raise ValueError(f"{where}: x_{split} must be floating with a sample dimension "
                             f"first, got {x.dtype} of shape {tuple(x.shape)}")
        if y.dtype != torch.int64 or y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"{where}: y_{split} must be int64 class labels of shape "
                             f"({x.shape[0]},), got {y.dtype} of shape {tuple(y.shape)}")
        if y.numel() == 0:
            raise ValueError(f"{where}: the {split} split is empty")
        low, high = torch.aminmax(y)
        if int(low) < 0 or int(high) >= task.num_classes:
            raise ValueError(f"{where}: y_{split} must lie in 0 … {task.num_classes - 1}, got "
                             f"{int(low)} … {int(high)}")
    if tuple(task.x_train.shape[1:]) != tuple(task.x_test.shape[1:]):
        raise ValueError(f"{where}: x_train and x_test samples differ in shape: "
                         f"{tuple(task.x_train.shape[1:])} vs {tuple(task.x_test.shape[1:])}")
    for kind, factory in task.models.items():
        if not callable(factory):
            raise TypeError(f"{where}: models[{kind!r}] must be a callable returning a "
                            f"module, got {type(factory).__name__}")
    return task


# -- entry points -------------------------------------------------------------------------------


def check_task(spec: str) -> str:
    """Validate a task name without building its data (a plug-in is imported, not called).

    Returns the name as given; raises ``ValueError`` (naming the task) for a bad one.
    """
    if not isinstance(spec, str):
        raise TypeError(f"task must be a string, got {type(spec).__name__}")
    if is_plugin(spec):
        _import_plugin(spec)
    elif spec.partition("@")[0] == "mnist1d":
        _mnist1d_samples(spec)
    elif spec not in TASKS:
        raise ValueError(f"unknown task {spec!r}; available: {', '.join(TASKS)}, "
                         "mnist1d@N (N samples) or a plug-in module:function")
    return spec


def check_task_model(spec: str, model: str) -> None:
    """Validate a (task, model) pair without building data; plug-in models are checked when
    the task is loaded (``Task.make_model``)."""
    check_task(spec)
    if is_plugin(spec):
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a non-empty name, got {model!r}")
        return
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; available: {', '.join(MODELS)}")
    if model == "cnn" and spec == "synthetic":
        raise ValueError(f"model 'cnn' needs an image task (digits) or a sequence task "
                         f"(mnist1d); {spec!r} is neither")


def resolve_task(spec: str, seed: int = 0, test_fraction: float = 0.2) -> Task:
    """The task named ``spec`` for ``seed``: a built-in name, ``mnist1d@N`` or a plug-in
    ``module:function`` (called as ``function(seed)``, its result checked).

    ``test_fraction`` applies to the built-in tasks; a plug-in owns its split.
    """
    check_task(spec)
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if is_plugin(spec):
        function = _import_plugin(spec)
        return _check_plugin_task(spec, function(seed), seed)
    if spec.partition("@")[0] == "mnist1d":
        return _load_mnist1d(spec, seed, test_fraction)
    from sklearn.model_selection import train_test_split

    if spec == "digits":
        x, y = _digits()
        image_shape: tuple[int, int] | None = (8, 8)
    else:
        x, y = _synthetic()
        image_shape = None
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return Task(
        name=spec,
        x_train=torch.from_numpy(np.ascontiguousarray(x_tr)),
        y_train=torch.from_numpy(np.ascontiguousarray(y_tr)),
        x_test=torch.from_numpy(np.ascontiguousarray(x_te)),
        y_test=torch.from_numpy(np.ascontiguousarray(y_te)),
        num_classes=int(y.max()) + 1,
        image_shape=image_shape,
    )


def load_task(name: str, seed: int = 0, test_fraction: float = 0.2) -> Task:
    """Task ``name`` with the split of ``seed`` (deterministic); see :func:`resolve_task`."""
    return resolve_task(name, seed, test_fraction)
