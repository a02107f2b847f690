"""Timing and memory measurement shared by the benchmark suites.

A suite (``benchmarks/suites/<name>.py``) defines ``SUITE``: a baseline row and the rows to
measure beside it, each a factory ``make(params) -> Optimizer``. For every model the
harness builds fresh parameters on the run's device, gives them fixed random gradients, times
``step()`` (median over repeats after warm-up) and reports, per byte of parameters:

* ``state B/param B``: the bytes of tensors the optimizer keeps as state;
* ``step peak B/param B``: the peak bytes allocated inside one ``step()`` (after warm-up)
  above what was allocated before it (:func:`step_allocations`: the profiler's memory
  events on CPU, ``torch.cuda.max_memory_allocated()`` on CUDA). Views and in-place results
  count nothing.

Timing: ``time.perf_counter`` on CPU; CUDA events around each step on CUDA. With
``interleave=True`` every row of a (suite, model) is built and warmed up first, then the
timed steps go round-robin, one step of each row per round, so that a change of load on a
shared machine hits all rows alike. Ratios are against the suite's baseline measured in the
same run. Timings are noisy on shared machines: compare ratios, not absolute numbers across
runs.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

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
    # The row (by name, earlier in the same table) this one is measured against, e.g. the
    # base optimizer E wraps: the table then prints this row's time over that row's.
    versus: str | None = None
    # The traffic floor: parameter-sized arrays a step must read and write at least
    # (None: not stated). Printed beside the time, with its ratio to ``versus``'s floor.
    floor: int | None = None


@dataclass
class Suite:
    name: str
    baseline: Row
    rows: list[Row]
    models: tuple[str, ...] = ("mlp16m", "small200")
    notes: list[str] = field(default_factory=list)


MODELS = ("mlp16m", "blocks12", "small200", "many64")
# ``tiny``: the dry run's model (a few hundred parameters); not in MODELS (never benchmarked).
DRY_RUN_MODEL = "tiny"


def build_model(name: str) -> nn.Module:
    """``mlp16m``: ~16.8M parameters in 8 tensors; ``blocks12``: 11.0M parameters in 120
    tensors, the weights of 12 transformer-like blocks (48 matrices of 196k-262k elements,
    72 vectors of 256-1024: the per-tensor and per-call costs matter there); ``small200``: 200
    small tensors (~0.2M); ``many64``: 200 same-shaped 64×64 matrices (batching matters
    there); ``tiny``: two 16×16 layers, for the dry run."""
    torch.manual_seed(0)
    if name == DRY_RUN_MODEL:
        return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    if name == "mlp16m":
        return nn.Sequential(
            nn.Linear(1024, 2048), nn.ReLU(),
            nn.Linear(2048, 2048), nn.ReLU(),
            nn.Linear(2048, 2048), nn.ReLU(),
            nn.Linear(2048, 2048),
        )
    if name == "blocks12":
        layers: list[nn.Module] = []
        for _ in range(12):  # attention in/out projections, MLP up/down, a norm
            layers += [nn.Linear(256, 768), nn.Linear(768, 256), nn.Linear(256, 1024),
                       nn.Linear(1024, 256), nn.LayerNorm(256)]
        return nn.Sequential(*layers)
    if name == "small200":
        return nn.Sequential(*[nn.Linear(32, 32) for _ in range(100)])
    if name == "many64":
        return nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(200)])
    raise ValueError(f"unknown benchmark model {name!r}; choose one of {MODELS}")


def model_params(name: str, device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """The model's parameters on ``device`` with fixed random gradients (drawn on CPU, so the
    values do not depend on the device)."""
    params = [
        p.detach().to(device, copy=True).requires_grad_() for p in build_model(name).parameters()
    ]
    generator = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=generator) * 1e-2).to(device)
    return params


def _peak_from_profile(profiler: Any) -> int:
    """The peak of the running sum of the allocator's records, in time order: ``+n`` for an
    allocation, ``−n`` for a free (the raw ``[memory]`` records; the per-op memory columns
    would misplace frees made inside an enclosing region such as ``Optimizer.step``)."""
    records = sorted(
        (event.start_ns(), event.nbytes())
        for event in profiler.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    current = peak = 0
    for _, change in records:
        current += change
        peak = max(peak, current)
    return peak


def step_allocations(step: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated during one call of ``step`` above what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: ``torch.profiler`` with
    ``profile_memory=True`` (the allocator reports every allocation and free, compiled
    kernels' buffers included); a ``TorchDispatchMode`` counter cannot be used, as
    ``torch.compile`` refuses to run under one ("non-infra torch dispatch mode present") and
    the compiled rows would then fail or run uncompiled. Views and in-place results allocate
    nothing; a temporary freed before the next one is allocated does not add to the peak.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return max(torch.cuda.max_memory_allocated(device) - start, 0)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    return _peak_from_profile(profiler)


def state_tensors(optimizer: object, seen: set[int] | None = None) -> Iterable[torch.Tensor]:
    """Tensors held as state by an optimizer and the optimizers it wraps (deduplicated).

    Any mapping counts, not only dicts: ``E.state[p]`` is a view merging the adaptor's
    buffer with the base's entry (counted as a dict only, the adaptor's buffer was missed)."""
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
        elif isinstance(value, Mapping):
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


class _Runner:
    """One row on one model: its optimizer, parameters and gradients, and its timed steps."""

    def __init__(self, row: Row, params: list[torch.Tensor]) -> None:
        self.row, self.params = row, params
        self.optimizer = row.make(params)
        self._step = row.step or (lambda opt, _params: opt.step())
        self.grads = [p.grad.clone() for p in params]
        self.times: list[float] = []
        self.alloc_bytes: int | None = None

    def reset_grads(self) -> None:  # some optimizers replace or modify p.grad
        for p, g in zip(self.params, self.grads):
            if p.grad is None or p.grad.data_ptr() == g.data_ptr():
                p.grad = g.clone()
            else:
                p.grad.copy_(g)

    def step(self) -> None:
        self.reset_grads()
        self._step(self.optimizer, self.params)

    def timed_step(self) -> None:
        self.reset_grads()
        if self.params[0].is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self._step(self.optimizer, self.params)
            end.record()
            end.synchronize()
            self.times.append(start.elapsed_time(end) / 1e3)
            return
        start_s = time.perf_counter()
        self._step(self.optimizer, self.params)
        self.times.append(time.perf_counter() - start_s)

    def count_allocations(self) -> None:
        """One step (after warm-up, before the timed ones) with its allocations counted."""
        self.reset_grads()
        self.alloc_bytes = step_allocations(
            lambda: self._step(self.optimizer, self.params), self.params[0].device
        )


def time_steps(
    row: Row, params: list[torch.Tensor], warmup: int, repeats: int
) -> tuple[float, Optimizer]:
    """Median seconds of ``repeats`` steps after ``warmup`` ones, and the optimizer."""
    runner = _Runner(row, params)
    for _ in range(warmup):
        runner.step()
    for _ in range(repeats):
        runner.timed_step()
    return statistics.median(runner.times), runner.optimizer


def _result(suite: Suite, model: str, runner: _Runner, baseline: float | None,
            device: torch.device, earlier: Iterable[dict] = ()) -> dict:
    """One row's numbers; ``earlier``: the table's rows so far (for ``Row.versus``)."""
    seconds = statistics.median(runner.times)
    param_bytes = sum(p.numel() * p.element_size() for p in runner.params)
    alloc = None if runner.alloc_bytes is None else runner.alloc_bytes / param_bytes
    row = runner.row
    base = next((r for r in earlier if r["optimizer"] == row.versus), None)
    return {
        "suite": suite.name, "model": model, "optimizer": row.name,
        "device": device.type, "median_ms": seconds * 1e3,
        "ratio": seconds / (baseline if baseline is not None else seconds),
        "state_ratio": state_bytes_per_param_byte(runner.optimizer, runner.params),
        "step_alloc_bytes": runner.alloc_bytes, "step_alloc_ratio": alloc,
        "param_bytes": param_bytes,
        "versus": None if base is None else base["optimizer"],
        "versus_ratio": None if base is None else seconds * 1e3 / base["median_ms"],
        "floor": row.floor,
        "floor_ratio": (
            None if base is None or row.floor is None or base["floor"] is None
            else row.floor / base["floor"]
        ),
    }


HEADER = (f"{'optimizer':<46} {'median ms':>10} {'x baseline':>11} {'x versus':>11} "
          f"{'floor':>12} {'state B/param B':>16} {'step peak B/param B':>21}")


def _print_row(result: dict) -> None:
    alloc = result["step_alloc_ratio"]
    alloc_text = "-" if alloc is None else f"{alloc:.3f}"
    versus = result.get("versus_ratio")
    versus_text = "" if versus is None else f"{versus:.2f}"
    floor, floor_ratio = result.get("floor"), result.get("floor_ratio")
    floor_text = "" if floor is None else str(floor)
    if floor_ratio is not None:
        floor_text += f" ({floor_ratio:.2f})"
    print(f"{result['optimizer']:<46} {result['median_ms']:>10.2f} {result['ratio']:>11.2f} "
          f"{versus_text:>11} {floor_text:>12} {result['state_ratio']:>16.2f} "
          f"{alloc_text:>21}")


def run_suite(
    suite: Suite,
    models: Iterable[str],
    warmup: int,
    repeats: int,
    *,
    device: str | torch.device = "cpu",
    interleave: bool = False,
    memory: bool = True,
    rows: Iterable[Row] | None = None,
) -> list[dict]:
    """Run ``suite`` on ``models`` and print one table per model; return the rows as dicts.

    ``device``: where parameters, gradients and state live. ``interleave``: time the rows
    round-robin (see the module docstring). ``memory``: count one step's allocations.
    ``rows``: the rows to run (default: the baseline and every row of the suite).
    """
    device = torch.device(device)
    selected = list(rows) if rows is not None else [suite.baseline, *suite.rows]
    results = []
    for model in models:
        if model not in suite.models and model != DRY_RUN_MODEL:
            continue
        print(f"\n## {suite.name} — model {model} ({device.type})")
        print(HEADER)
        print("-" * len(HEADER))
        runnable = []
        for row in selected:
            if row.models is not None and model not in row.models:
                print(f"{row.name:<46} skipped on {model} (runs on {', '.join(row.models)})")
                continue
            runnable.append(row)
        if interleave:
            results += _run_interleaved(suite, model, runnable, warmup, repeats, device, memory)
        else:
            results += _run_in_turn(suite, model, runnable, warmup, repeats, device, memory)
        for note in suite.notes:
            print(f"  note: {note}")
    return results


def _prepare(row: Row, model: str, warmup: int, device: torch.device,
             memory: bool) -> _Runner | None:
    try:
        runner = _Runner(row, model_params(model, device))
        for _ in range(warmup):
            runner.step()
        if memory:
            runner.count_allocations()
    except Exception as error:  # a peer that fails is reported, not fatal
        print(f"{row.name:<46} failed: {type(error).__name__}: {error}")
        return None
    return runner


def _report(suite: Suite, model: str, runner: _Runner, device: torch.device,
            results: list[dict]) -> None:
    """Print the row's result and append it to ``results``, the table so far (its first row
    is the baseline)."""
    baseline = results[0]["median_ms"] / 1e3 if results else None
    result = _result(suite, model, runner, baseline, device, results)
    _print_row(result)
    results.append(result)


def _run_in_turn(suite, model, rows, warmup, repeats, device, memory) -> list[dict]:
    results: list[dict] = []
    for row in rows:
        runner = _prepare(row, model, warmup, device, memory)
        if runner is None:
            continue
        try:
            for _ in range(repeats):
                runner.timed_step()
        except Exception as error:
            print(f"{row.name:<46} failed: {type(error).__name__}: {error}")
            continue
        _report(suite, model, runner, device, results)
        del runner
        gc.collect()
    return results


def _run_interleaved(suite, model, rows, warmup, repeats, device, memory) -> list[dict]:
    runners = [r for r in (_prepare(row, model, warmup, device, memory) for row in rows) if r]
    failed: set[int] = set()
    for _ in range(repeats):
        for i, runner in enumerate(runners):
            if i in failed:
                continue
            try:
                runner.timed_step()
            except Exception as error:
                print(f"{runner.row.name:<46} failed: {type(error).__name__}: {error}")
                failed.add(i)
    results: list[dict] = []
    for i, runner in enumerate(runners):
        if i in failed:
            continue
        _report(suite, model, runner, device, results)
    del runners
    gc.collect()
    return results
