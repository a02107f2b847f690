"""``python -m benchmarks [--suite NAME ...] [--model NAME ...]``: print the ratio tables."""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys

import torch

from benchmarks import suites
from benchmarks.harness import MODELS, run_suite


def main(argv: list[str] | None = None) -> int:
    available = sorted(m.name for m in pkgutil.iter_modules(suites.__path__))
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--suite", action="append", choices=available,
                        help="suite to run (repeatable; default: all)")
    parser.add_argument("--model", action="append", choices=list(MODELS),
                        help="model to run (repeatable; default: every model a suite lists)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int,
                        help="torch intra-op threads (default: torch's); 1 gives steadier "
                             "ratios on a loaded machine")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    results = []
    for name in args.suite or available:
        suite = importlib.import_module(f"benchmarks.suites.{name}").SUITE
        results += run_suite(suite, args.model or list(MODELS), args.warmup, args.repeats)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
