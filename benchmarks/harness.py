"""Timing and state-memory measurement shared by the benchmark suites.

A suite (``benchmarks/suites/<name>.py``) defines ``SUITE``: a baseline row and the rows to
measure beside it, each a factory ``make(params) -> Optimizer``. For every model the
harness builds fresh parameters, gives them fixed random gradients, times ``step()`` (median
over repeats after warm-up) and counts the bytes of tensors the optimizer keeps as state,
per byte of parameters. Ratios are against the suite's baseline measured in the same run.
Timings are noisy on shared machines: compare ratios, not absolute numbers across runs.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.optim import Optimizer

Factory = Callable[[list[torch.Tensor]], Optimizer]


@dataclass
class Row:
    name: str
    make: Factory
    # A callable that runs one step; default: optimizer.step() on preset gradients.
    step: Callable[[Optimizer, list[torch.Tensor]], object] | None = None
    # The models this row runs on (default: all of the suite's); a row too slow for a
    # model is printed as skipped there.
    models: tuple[str, ...] | None = None


@dataclass
class Suite:
    name: str
    baseline: Row
    rows: list[Row]
    models: tuple[str, ...] = ("mlp16m", "small200")
    notes: list[str] = field(default_factory=list)


MODELS = ("mlp16m", "small200", "many64")


def build_model(name: str) -> nn.Module:
    """``mlp16m``: ~16.8M parameters in 8 tensors; ``small200``: 200 small tensors (~0.2M);
    ``many64``: 200 same-shaped 64×64 matrices (batching matters there)."""
    torch.manual_seed(0)
    if name == "mlp16m":
        return nn.Sequential(
            nn.Linear(1024, 2048), nn.ReLU(),
            nn.Linear(2048, 2048), nn.ReLU(),
            nn.Linear(2048, 2048), nn.ReLU(),
            nn.Linear(2048, 2048),
        )
    if name == "small200":
        return nn.Sequential(*[nn.Linear(32, 32) for _ in range(100)])
    if name == "many64":
        return nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(200)])
    raise ValueError(f"unknown benchmark model {name!r}; choose one of {MODELS}")


def model_params(name: str) -> list[torch.Tensor]:
    params = [p.detach().clone().requires_grad_() for p in build_model(name).parameters()]
    generator = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * 1e-2
    return params


def state_tensors(optimizer: object, seen: set[int] | None = None) -> Iterable[torch.Tensor]:
    """Tensors held as state by an optimizer and the optimizers it wraps (deduplicated)."""
    seen = set() if seen is None else seen
    if id(optimizer) in seen:
        return
    seen.add(id(optimizer))
    state = getattr(optimizer, "state", {})
    stack = list(state.values())
    while stack:
        value = stack.pop()
        if isinstance(value, torch.Tensor):
            if id(value) not in seen:
                seen.add(id(value))
                yield value
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
    for attribute in vars(optimizer).values():
        if isinstance(attribute, Optimizer):
            yield from state_tensors(attribute, seen)


def state_bytes_per_param_byte(optimizer: Optimizer, params: list[torch.Tensor]) -> float:
    """Bytes of parameter-sized state (0-d scalars such as step counters excluded)."""
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    state = sum(t.numel() * t.element_size() for t in state_tensors(optimizer) if t.dim() > 0)
    return state / param_bytes


def time_steps(
    row: Row, params: list[torch.Tensor], warmup: int, repeats: int
) -> tuple[float, Optimizer]:
    optimizer = row.make(params)
    step = row.step or (lambda opt, _params: opt.step())
    grads = [p.grad.clone() for p in params]

    def reset_grads() -> None:  # some optimizers replace or modify p.grad
        for p, g in zip(params, grads):
            if p.grad is None or p.grad.data_ptr() == g.data_ptr():
                p.grad = g.clone()
            else:
                p.grad.copy_(g)

    for _ in range(warmup):
        reset_grads()
        step(optimizer, params)
    times = []
    for _ in range(repeats):
        reset_grads()
        start = time.perf_counter()
        step(optimizer, params)
        if params[0].is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), optimizer


def run_suite(suite: Suite, models: Iterable[str], warmup: int, repeats: int) -> list[dict]:
    results = []
    for model in models:
        if model not in suite.models:
            continue
        print(f"\n## {suite.name} — model {model}")
        baseline_time = None
        header = f"{'optimizer':<42} {'median ms':>10} {'x baseline':>11} {'state B/param B':>16}"
        print(header)
        print("-" * len(header))
        for row in [suite.baseline, *suite.rows]:
            if row.models is not None and model not in row.models:
                print(f"{row.name:<42} skipped on {model} (runs on {', '.join(row.models)})")
                continue
            params = model_params(model)
            try:
                seconds, optimizer = time_steps(row, params, warmup, repeats)
            except Exception as error:  # a peer that fails is reported, not fatal
                print(f"{row.name:<42} failed: {type(error).__name__}: {error}")
                continue
            memory = state_bytes_per_param_byte(optimizer, params)
            if baseline_time is None:
                baseline_time = seconds
            ratio = seconds / baseline_time
            print(f"{row.name:<42} {seconds * 1e3:>10.2f} {ratio:>11.2f} {memory:>16.2f}")
            results.append(
                {"suite": suite.name, "model": model, "optimizer": row.name,
                 "median_ms": seconds * 1e3, "ratio": ratio, "state_ratio": memory}
            )
            del optimizer, params
            gc.collect()
        for note in suite.notes:
            print(f"  note: {note}")
    return results
