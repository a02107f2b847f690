"""One call on a CUDA machine: the test suite, then the benchmarks, results written to a folder.

``python -m benchmarks.device_check [--out DIR] [--budget SECONDS] [--dry-run]``

Runs, each in its own process with its own time limit (the whole stays within ``--budget``,
default 540 s, so one 10-minute call fits with room to spare):

1. ``env.txt``: torch, CUDA and the GPU's name;
2. ``tests.log``: ``pytest -n WORKERS --dist loadgroup`` over ``tests/`` (the ``device``
   fixture adds the CUDA cases when torch sees a GPU), limited to ``TEST_SHARE`` of the
   budget;
3. ``bench.txt`` and ``bench.json``: ``python -m benchmarks --device cuda --interleave`` on
   the 16.8M-parameter model, one process per suite (most important first) so that a slow
   suite cannot take the others' time; each gets an equal share of what is left.

``--out`` defaults to ``$OUT`` when set (the device tool's result folder), else
``device-check-results``. At most 8 files are written (what the device tool brings back).
Peers missing on the machine (``pytorch-optimizer``, ``e-optimizer-adaptor``) print as
failed rows; nothing else depends on them.

``--dry-run`` (CPU, seconds; exercised by the test suite): writes the plan (every command
with its time limit) to ``plan.txt``, checks that every suite imports, and runs the
benchmarks' own dry run (one tiny CPU step per suite) in-process.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pkgutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# The suites in the order they run: the README's table first.
SUITE_ORDER = ("core", "zeroth_order", "first_order", "matrix", "second_order")
TEST_SHARE = 0.45
WORKERS = 8
MODEL = "mlp16m"


def _suites() -> list[str]:
    from benchmarks import suites

    present = sorted(m.name for m in pkgutil.iter_modules(suites.__path__))
    ordered = [name for name in SUITE_ORDER if name in present]
    return ordered + [name for name in present if name not in ordered]


def plan(
    out: Path, budget: float, python: str = sys.executable
) -> list[tuple[str, list[str], float]]:
    """``(log name, command, seconds)`` for each step, in order."""
    if budget < 60:
        raise ValueError(f"--budget must be at least 60 seconds, got {budget}")
    tests = budget * TEST_SHARE
    steps = [("tests.log", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "-n", str(WORKERS), "--dist", "loadgroup", "tests"], tests)]
    names = _suites()
    share = (budget - tests) / len(names)
    for name in names:
        steps.append((f"bench-{name}", [
            python, "-m", "benchmarks", "--device", "cuda", "--suite", name, "--model", MODEL,
            "--warmup", "3", "--repeats", "20", "--interleave",
            "--json", str(out / f"bench-{name}.json"),
        ], share))
    return steps


def _run(command: list[str], seconds: float, log: io.TextIOBase) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    log.write(f"$ {' '.join(command)}  (limit {seconds:.0f} s)\n")
    log.flush()
    start = time.monotonic()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=seconds)
        output, code = done.stdout, done.returncode
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout if isinstance(expired.stdout, str) else (
            (expired.stdout or b"").decode(errors="replace"))
        code = 124
    # the profiler's start/stop trace lines (kineto, one pair per CPU memory count) are noise
    log.write("".join(line for line in output.splitlines(keepends=True)
                      if not line.startswith("USDT:")))
    log.write(f"\n[exit {code} after {time.monotonic() - start:.0f} s]\n")
    log.flush()
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.device_check",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or "device-check-results")
    parser.add_argument("--budget", type=float, default=540.0,
                        help="seconds for everything (default 540: a 600 s call with room)")
    parser.add_argument("--dry-run", action="store_true",
                        help="write and check the plan, run the benchmarks' dry run (CPU)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = plan(out, args.budget)
    with open(out / "plan.txt", "w") as handle:
        for name, command, seconds in steps:
            handle.write(f"{name}: {' '.join(command)}  (limit {seconds:.0f} s)\n")
    print((out / "plan.txt").read_text(), end="")
    if args.dry_run:
        from benchmarks.__main__ import main as bench_main

        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            code = bench_main(["--dry-run", "--device", "cuda"])
        (out / "dry-run.txt").write_text(buffer.getvalue())
        print(buffer.getvalue().splitlines()[-1])
        return code
    if not torch.cuda.is_available():
        print("device_check: torch sees no CUDA device (use --dry-run on CPU)", file=sys.stderr)
        return 2
    with open(out / "env.txt", "w") as handle:
        handle.write(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
                     f"{torch.cuda.get_device_name()}, python {sys.version.split()[0]}\n")
    codes = {}
    with open(out / "tests.log", "w") as log:
        codes["tests"] = _run(steps[0][1], steps[0][2], log)
    deadline = time.monotonic() + sum(seconds for _, _, seconds in steps[1:])
    results = []
    with open(out / "bench.txt", "w") as log:
        for index, (name, command, _) in enumerate(steps[1:]):
            left = deadline - time.monotonic()
            share = left / (len(steps) - 1 - index)  # unused time passes to later suites
            codes[name] = _run(command, share, log)
            path = out / f"{name}.json"
            if path.exists():
                results += json.loads(path.read_text())
                path.unlink()  # one bench.json, within the device tool's 8 files
    (out / "bench.json").write_text(json.dumps(results, indent=2))
    (out / "exit-codes.json").write_text(json.dumps(codes, indent=2))
    print(json.dumps(codes))
    return 0 if all(code == 0 for code in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
