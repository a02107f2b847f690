"""What a compiled (``fused=True``) path costs on its first step, with and without a warm
persistent compile cache.

``python -m benchmarks.compile_cost [--threads 1] [--case NAME ...]``

For each case, three fresh processes run three steps each on the 16.8M-parameter model
and print the first and the later steps' times:

1. ``fused=False`` (nothing to compile);
2. ``fused=True`` with an empty inductor cache (``TORCHINDUCTOR_CACHE_DIR`` set to a new
   folder: the FX graph cache and the compiled kernels start empty);
3. ``fused=True`` again with the same folder (a second process: the FX graph and kernel
   caches are warm; Dynamo still traces).

The first-step excess of (2) and (3) over (1), divided by the per-step gain, is the number
of steps a run needs before the compiled path pays off.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

CASES = ("spsa_sgd", "e_adamw", "e_sgd")


def _build(case: str, fused: bool):
    import torch

    from adaptor import E, explore
    from backends.zeroth_order import SPSA
    from benchmarks.harness import model_params
    from benchmarks.suites.zeroth_order import _loss

    params = model_params("mlp16m")
    if case == "spsa_sgd":
        optimizer = explore(SPSA(seed=0, fused=fused), torch.optim.SGD(params, lr=1e-4),
                            fused=fused)
        return lambda: optimizer.step(lambda: _loss(params))
    if case == "e_adamw":
        optimizer = E(torch.optim.AdamW(params, lr=1e-3, fused=True), fused=fused)
    else:
        optimizer = E(torch.optim.SGD(params, lr=1e-3, momentum=0.9, fused=True), fused=fused)
    return optimizer.step


def _child(case: str, fused: bool, steps: int) -> None:
    step = _build(case, fused)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(json.dumps(times))


def _run(case: str, fused: bool, cache: str, threads: int, steps: int) -> list[float]:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "PYTHONPATH": os.getcwd()}
    code = (f"import torch; torch.set_num_threads({threads}); "
            f"from benchmarks.compile_cost import _child; _child({case!r}, {fused}, {steps})")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_cost",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", choices=CASES)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args(argv)
    for case in args.case or CASES:
        with tempfile.TemporaryDirectory() as cache:
            eager = _run(case, False, cache, args.threads, args.steps)
            cold = _run(case, True, cache, args.threads, args.steps)
            warm = _run(case, True, cache, args.threads, args.steps)
        later = {name: statistics.median(t[1:]) for name, t in
                 (("eager", eager), ("cold", cold), ("warm", warm))}
        gain = later["eager"] - (later["cold"] + later["warm"]) / 2
        print(f"{case}: first step eager {eager[0]:.2f} s, fused cold cache {cold[0]:.2f} s, "
              f"fused warm cache (2nd process) {warm[0]:.2f} s; later steps (medians) eager "
              f"{later['eager'] * 1e3:.0f} ms, fused {later['cold'] * 1e3:.0f} / "
              f"{later['warm'] * 1e3:.0f} ms; gain {gain * 1e3:.0f} ms/step; break-even after "
              + (f"{(cold[0] - eager[0]) / gain:.0f} steps (cold), "
                 f"{(warm[0] - eager[0]) / gain:.0f} steps (warm)" if gain > 0 else "never"),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
