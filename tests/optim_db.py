"""The capability table: one ``OptimizerInfo`` per optimizer of the library.

Like torch's own ``OptimizerInfo`` database, every entry gets the generic tests of
``tests/test_optimizers.py`` (meta-device step, host-read probe, bit-exact resume,
``grad=None``, param groups, error messages, α = 0 equals the base). Entries live in the
modules of ``tests/infos/`` (one per family); each module defines ``INFOS``. Adding an
optimizer to the generic tests means adding one entry there.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

Params = Any  # an iterable of tensors or of param-group dicts
Factory = Callable[..., Optimizer]


@dataclass(frozen=True)
class OptimizerInfo:
    """What the generic tests need to know about one optimizer.

    Attributes:
        name: test id.
        build: ``build(params, **overrides) -> Optimizer`` with the entry's default settings.
        base: for explored optimizers, ``base(params, **overrides)`` builds the same optimizer
            without the adaptor; ``build(params, alpha=0.0)`` must then equal it bit for bit.
        closure_kind: ``"backward"`` (the closure calls backward; step may also run without a
            closure) or ``"loss"`` (a zero-order estimator: the closure only returns the
            loss, and step requires it).
        supports_complex: complex parameters are allowed.
        matrix_only: every parameter must be at least 2-D.
        group_override: hyperparameters given to a second param group in the param-group test.
        groups_independent: the update of one group does not depend on the other group's
            parameters (false for estimators that perturb all parameters together).
        invalid: ``(make, exception, match)``: ``make(params)`` must raise ``exception`` whose
            message matches ``match`` (a regex naming the argument and its range).
        fused_compile: the entry compiles a kernel on first use (seconds to tens of seconds
            on CPU). Such entries take part only in the float32 tests that reuse the compiled
            kernels (a new dtype or ``torch.compile`` around the step would compile again), and
            their tests share one xdist group so that one worker compiles each kernel once.
        shapes: the parameter shapes ``make_params`` builds (``None``: a few small tensors).
            Fused entries use tensors of at least ``adaptor.replacement.FUSED_MIN_NUMEL``
            elements, the size at which the compiled kernels are taken.
    """

    name: str
    build: Factory
    base: Factory | None = None
    closure_kind: str = "backward"
    supports_complex: bool = True
    matrix_only: bool = False
    group_override: dict[str, Any] = field(default_factory=lambda: {"lr": 3e-3})
    groups_independent: bool = True
    invalid: Sequence[tuple[Callable[[Params], Any], type[BaseException], str]] = ()
    fused_compile: bool = False
    shapes: tuple[tuple[int, ...], ...] | None = None

    def __str__(self) -> str:
        return self.name


def _collect() -> list[OptimizerInfo]:
    import tests.infos as package

    infos: list[OptimizerInfo] = []
    for module in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        infos.extend(importlib.import_module(f"tests.infos.{module.name}").INFOS)
    names = [info.name for info in infos]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise RuntimeError(f"duplicate OptimizerInfo names: {sorted(duplicates)}")
    return infos


def __getattr__(name: str) -> Any:
    # Collected on first use, not at import: an entry module may import this module first.
    if name == "OPTIMIZERS":
        value: Any = _collect()
    elif name == "EXPLORED":
        value = [info for info in __getattr__("OPTIMIZERS") if info.base is not None]
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


# -- a small deterministic problem shared by the generic tests ------------------------------


def make_params(
    info: OptimizerInfo,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> list[Tensor]:
    """A handful of parameters of assorted shapes (only matrices for matrix-only entries)."""
    if info.shapes is not None:
        shapes = list(info.shapes)
    elif info.matrix_only:
        shapes = [(6, 5), (4, 6), (3, 2, 2, 2)]
    else:
        shapes = [(6, 5), (6,), (4, 6), (4,)]
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(shape, generator=generator, dtype=dtype).to(device).requires_grad_()
        for shape in shapes
    ]


def loss_fn(params: Sequence[Tensor], step: int) -> Tensor:
    """A smooth non-quadratic loss whose data changes with ``step`` (deterministically)."""
    generator = torch.Generator().manual_seed(1000 + step)
    total = torch.zeros((), device=params[0].device, dtype=params[0].dtype)
    for p in params:
        target = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
        diff = p - target
        total = total + (diff * diff).sum() + 0.1 * torch.cos(p).sum()
    return total


def make_closure(
    info: OptimizerInfo, optimizer: Optimizer, params: Sequence[Tensor], step: int
) -> Callable[[], Tensor]:
    """The closure for ``step``: autograd entries backprop, zero-order entries only evaluate."""
    if info.closure_kind == "loss":

        def evaluate() -> Tensor:
            return loss_fn(params, step)

        return evaluate

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = loss_fn(params, step)
        loss.backward()
        return loss

    return closure


def run_steps(
    info: OptimizerInfo,
    optimizer: Optimizer,
    params: Sequence[Tensor],
    steps: range,
) -> None:
    for step in steps:
        optimizer.step(make_closure(info, optimizer, params, step))


# -- parametrisation and comparison helpers shared by the generic test files ----------------

FUSED_GROUP = "fused-compile"


def entries(
    infos: Sequence[OptimizerInfo] | None = None,
    *,
    fused: bool = True,
    when: Callable[[OptimizerInfo], bool] | None = None,
) -> list[Any]:
    """``pytest.param``\\ s over ``infos`` (default: every entry).

    ``fused=False`` leaves out the entries that compile kernels (see
    ``OptimizerInfo.fused_compile``); the others get the ``xdist_group`` that keeps their
    compiles on one worker. ``when`` filters on capability flags.
    """
    import pytest

    selected = []
    for info in __getattr__("OPTIMIZERS") if infos is None else infos:
        if info.fused_compile and not fused:
            continue
        if when is not None and not when(info):
            continue
        marks = [pytest.mark.xdist_group(FUSED_GROUP)] if info.fused_compile else []
        selected.append(pytest.param(info, id=info.name, marks=marks))
    return selected


def all_params(optimizer: Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def state_snapshot(optimizer: Optimizer) -> dict[Any, Any]:
    """A deep copy of ``state_dict()`` (torch's state dict holds the live state tensors)."""
    import copy

    return copy.deepcopy(optimizer.state_dict())


def assert_same(actual: Any, expected: Any, where: str = "state_dict") -> None:
    """Bit-identical nested dicts/lists/tensors (NaN equal to NaN), with the path in errors."""
    if isinstance(expected, Tensor):
        assert isinstance(actual, Tensor), f"{where}: {type(actual).__name__}, expected a tensor"
        assert actual.dtype == expected.dtype, f"{where}: dtype {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{where}: shape {actual.shape} != {expected.shape}"
        assert actual.device == expected.device, f"{where}: device {actual.device}"
        assert torch.equal(_bits(actual), _bits(expected)), (
            f"{where}: values differ (max |diff| {(actual - expected).abs().max()})"
        )
    elif isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: {type(actual).__name__}, expected a dict"
        assert set(actual) == set(expected), (
            f"{where}: keys {sorted(map(str, actual))} != {sorted(map(str, expected))}"
        )
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), (
            f"{where}: {actual!r} != {expected!r}"
        )
        for i, (a, b) in enumerate(zip(actual, expected)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert actual == expected or (actual != actual and expected != expected), (
            f"{where}: {actual!r} != {expected!r}"
        )


def _bits(t: Tensor) -> Tensor:
    """The bytes of ``t``: bit-identity (NaN payloads, the sign of zero) rather than ``==``."""
    flat = t.detach().reshape(-1).contiguous()
    return flat.view(torch.uint8) if flat.dtype.is_floating_point or flat.is_complex() else flat


def clone_params(params: Sequence[Tensor]) -> list[Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def step_with_empty_grads(
    info: OptimizerInfo, optimizer: Optimizer, params: Sequence[Tensor], steps: range
) -> None:
    """Steps that need no data (for ``meta`` parameters): autograd entries get ``empty_like``
    gradients, zero-order entries evaluate their closure."""
    for step in steps:
        if info.closure_kind == "loss":
            optimizer.step(make_closure(info, optimizer, params, step))
        else:
            for p in params:
                p.grad = torch.empty_like(p)
            optimizer.step()
