"""The benchmark harness on CPU: the per-step memory count, the dry runs (``python -m
benchmarks --dry-run`` and ``benchmarks/device_check.py --dry-run``), interleaved rounds.

No timing is asserted; everything runs on tiny tensors in seconds.
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import device_check
from benchmarks.__main__ import main as bench_main
from benchmarks.harness import DRY_RUN_MODEL, Row, Suite, run_suite, step_allocations

CPU = torch.device("cpu")
N = 1 << 16  # float32: 256 KiB, far above the profiler's bookkeeping of a few bytes


def test_step_peak_counts_new_storage_not_views_and_is_a_peak_not_a_sum():
    """Views and in-place ops allocate nothing; ``x + 1`` allocates ``x``'s bytes; two
    temporaries alive one after the other peak at one, alive together at two.

    Mutations caught: counting an op's inclusive memory (nested ops' allocations again), summing
    allocations without the frees, per-op memory placed at the op's start (a free inside a
    region such as ``Optimizer.step`` then lands before the allocation: peak 0)."""
    x = torch.randn(N)
    size = x.numel() * x.element_size()

    def views():
        x.view(-1)[1:].t().add_(1.0).mul_(2.0)

    def one():
        return x + 1

    def sequential():
        a = x + 1
        del a
        b = x * 2
        del b

    def together():
        a, b = x + 1, x * 2
        return a, b

    assert step_allocations(views, CPU) < 1024
    # to → _to_copy → empty_strided: one allocation seen by three nested ops
    assert 2 * size <= step_allocations(lambda: x.double(), CPU) < 2 * size + 1024

    def in_a_region():  # as Optimizer.step: a temporary freed inside a profiled region
        with torch.profiler.record_function("outer"):
            a = x + 1
            del a

    assert size <= step_allocations(in_a_region, CPU) < size + 1024
    assert size <= step_allocations(one, CPU) < size + 1024
    assert size <= step_allocations(sequential, CPU) < size + 1024
    assert 2 * size <= step_allocations(together, CPU) < 2 * size + 1024


def test_benchmarks_dry_run_prints_the_plan_and_steps_every_suite(capsys, tmp_path):
    path = tmp_path / "dry.json"
    assert bench_main(["--dry-run", "--device", "cuda", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "dry run: ok" in out
    for suite in ("core", "zeroth_order", "first_order", "matrix", "second_order"):
        assert f"suite {suite}:" in out
    results = json.loads(path.read_text())
    assert {r["model"] for r in results} == {DRY_RUN_MODEL}
    assert all(r["device"] == "cpu" and r["step_alloc_bytes"] is not None for r in results)


def test_device_check_dry_run_writes_a_plan_within_its_budget(tmp_path, capsys):
    assert device_check.main(["--dry-run", "--out", str(tmp_path), "--budget", "540"]) == 0
    plan = (tmp_path / "plan.txt").read_text().splitlines()
    assert plan[0].startswith("tests.log:") and "pytest" in plan[0]
    bench = [line for line in plan if line.startswith("bench-")]
    assert bench and all("--device cuda" in line for line in bench)
    limits = [float(line.rsplit("(limit ", 1)[1].split(" s)")[0]) for line in plan]
    assert sum(limits) <= 540 + len(limits)  # each rounded to whole seconds
    assert (tmp_path / "dry-run.txt").read_text().rstrip().endswith("dry run: ok")


def test_interleaved_rounds_time_every_row_and_report_failures(capsys):
    calls = []

    def step(optimizer, params):
        calls.append(len(calls))
        optimizer.step()

    def broken(params):
        raise RuntimeError("no such optimizer")

    suite = Suite(
        name="test", models=(DRY_RUN_MODEL,),
        baseline=Row("sgd", lambda p: torch.optim.SGD(p, lr=0.1), step=step),
        rows=[Row("adam", lambda p: torch.optim.Adam(p, lr=0.1)), Row("broken", broken)],
    )
    results = run_suite(suite, [DRY_RUN_MODEL], warmup=1, repeats=3, interleave=True)
    assert [r["optimizer"] for r in results] == ["sgd", "adam"]
    assert results[0]["ratio"] == 1.0
    assert len(calls) == 1 + 1 + 3  # warm-up, the memory-counted step, three rounds
    assert results[1]["state_ratio"] == 2.0
    assert "broken" in capsys.readouterr().out


def test_a_row_is_reported_over_the_row_it_wraps_with_its_traffic_floor(capsys):
    suite = Suite(
        name="test", models=(DRY_RUN_MODEL,),
        baseline=Row("sgd", lambda p: torch.optim.SGD(p, lr=0.1), floor=3),
        rows=[
            Row("adam", lambda p: torch.optim.Adam(p, lr=0.1), floor=7),
            Row("adam again", lambda p: torch.optim.Adam(p, lr=0.1), versus="adam", floor=9),
            Row("no floor", lambda p: torch.optim.Adam(p, lr=0.1), versus="sgd"),
        ],
    )
    for interleave in (False, True):
        results = run_suite(suite, [DRY_RUN_MODEL], warmup=1, repeats=2, interleave=interleave)
        by_name = {r["optimizer"]: r for r in results}
        again, adam = by_name["adam again"], by_name["adam"]
        assert again["versus"] == "adam"
        assert again["versus_ratio"] == again["median_ms"] / adam["median_ms"]
        assert again["floor_ratio"] == 9 / 7
        assert by_name["no floor"]["floor_ratio"] is None
        assert by_name["adam"]["versus_ratio"] is None
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("adam again"))
    assert "9 (1.29)" in line


def test_the_plan_refuses_a_row_measured_versus_no_earlier_row():
    from benchmarks import __main__ as cli

    suite = Suite(
        name="test", models=("mlp16m",),
        baseline=Row("sgd", lambda p: torch.optim.SGD(p, lr=0.1)),
        rows=[Row("e", lambda p: torch.optim.SGD(p, lr=0.1), versus="later"),
              Row("later", lambda p: torch.optim.SGD(p, lr=0.1))],
    )
    original = cli._suite
    cli._suite = lambda name: suite
    try:
        with pytest.raises(ValueError, match="'e' is measured versus 'later'"):
            cli._plan(["test"], ["mlp16m"])
    finally:
        cli._suite = original


def test_traffic_twins_read_and_write_exactly_the_arrays_they_name():
    """ALTO's twin: pass 1 reads θ, g, c, m, v and writes c, m, v (their mean); pass 2 reads
    θ, m, v and writes θ (their mean). Starting from zero state: c = m = v = (θ + g)/5, then
    θ ← (θ + m + v)/3; g is only read."""
    from adaptor.replacement import FUSED_MIN_NUMEL
    from benchmarks.twins import TrafficTwin

    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(FUSED_MIN_NUMEL + k, generator=generator) for k in range(4)]
    params.append(torch.randn(10, generator=generator))  # small: left alone, as ours
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    start = [(p.clone(), p.grad.clone()) for p in params]
    twin = TrafficTwin(params, (("p g c m v", "c m v"), ("p m v", "p")))
    twin.step()
    for (p0, g0), p in zip(start, params):
        if p.numel() < FUSED_MIN_NUMEL:
            assert torch.equal(p, p0)
            continue
        torch.testing.assert_close(p, (p0 + 2 * (p0 + g0) / 5) / 3)
        assert torch.equal(p.grad, g0)
    for name in "cmv":
        for (p0, g0), array in zip(start, twin.state[name]):
            torch.testing.assert_close(array, (p0 + g0) / 5)


def test_state_column_counts_the_adaptors_buffer_beside_the_bases_state():
    """State bytes per parameter byte, after a step: E's buffer (1 per parameter) is counted
    with the base's state, seen through ``E.state``'s merged entries, and each tensor once
    (the base's m and v are reachable from both). The expected numbers are the state layout:
    SGD 0, SGD with momentum 1 (its buffer), Adam 2 (m, v), each + 1 under E; ALTO 3.

    Mutation caught: counting ``dict`` entries only (E's entries are a Mapping view: E(SGD)
    read 0.0, E(Adam) 2.0)."""
    from adaptor import explore
    from adaptor.estimators import Autograd
    from backends import ALTO
    from benchmarks.harness import state_bytes_per_param_byte

    def step(optimizer, params):
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.step()
        return state_bytes_per_param_byte(optimizer, params)

    def params():
        return [torch.zeros(8, 4, requires_grad=True), torch.zeros(4, requires_grad=True)]

    cases = {
        "SGD": (lambda ps: torch.optim.SGD(ps, lr=0.1), 0.0),
        "SGD momentum": (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), 1.0),
        "Adam": (lambda ps: torch.optim.Adam(ps), 2.0),
        "E(SGD)": (lambda ps: explore(Autograd(), torch.optim.SGD(ps, lr=0.1)), 1.0),
        "E(SGD momentum)": (
            lambda ps: explore(Autograd(), torch.optim.SGD(ps, lr=0.1, momentum=0.9)), 2.0
        ),
        "E(Adam)": (lambda ps: explore(Autograd(), torch.optim.Adam(ps)), 3.0),
        "ALTO": (lambda ps: ALTO(ps), 3.0),
    }
    for name, (make, expected) in cases.items():
        ps = params()
        assert step(make(ps), ps) == expected, name


def test_spsa_twin_evaluates_twice_and_moves_the_nine_arrays_it_names():
    """Two evaluations, θ read and written before each (negated: ``θ ← θ`` would be folded
    into no pass), then θ, c ← (θ + c)/2 and g ← (θ + c)/2 with c starting at 0; small
    tensors left alone, as ours. Mutation caught: a pass dropped or its arrays swapped."""
    from adaptor.replacement import FUSED_MIN_NUMEL
    from benchmarks.suites.zeroth_order import SPSATwin

    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(FUSED_MIN_NUMEL + k, generator=generator) for k in range(5)]
    params.append(torch.randn(10, generator=generator))
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    start = [(p.clone(), p.grad.clone()) for p in params]
    twin = SPSATwin(params)
    calls, perturbs, seen = [], [], []
    kernel = twin.perturb.kernel
    twin.perturb.kernel = lambda *a, **k: perturbs.append(len(a[0])) or kernel(*a, **k)

    def closure():  # records θ as each evaluation sees it
        seen.append([p.clone() for p in params[:5]])
        calls.append(1)
        return torch.tensor(float(len(calls)))

    assert twin.step(closure) == 1.0
    assert len(calls) == 2 and len(seen) == 2
    assert all(torch.equal(x, -p0) for x, (p0, _) in zip(seen[0], start[:5]))
    assert perturbs == [4, 1, 4, 1]  # θ in place before each evaluation, four tensors a call
    for (p0, g0), p, c in zip(start, params, twin.update.state["c"] + [None]):
        if c is None:
            assert torch.equal(p, p0) and torch.equal(p.grad, g0)
            continue
        torch.testing.assert_close(p, p0 / 2)
        torch.testing.assert_close(p.grad, p0 / 2)
        torch.testing.assert_close(c, p0 / 2)
