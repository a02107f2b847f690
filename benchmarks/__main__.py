"""``python -m benchmarks [--suite NAME ...] [--model NAME ...] [--device cuda]``: print the
ratio tables (time, state memory and the peak bytes one step allocates, per row).

``--dry-run`` prints the plan (suites, models, rows), checks that every suite imports and
that its rows name known models, and runs one step of each suite's baseline row on a tiny
CPU model through the same timing and allocation-counting code: seconds, for CI.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys

import torch

from benchmarks import suites
from benchmarks.harness import DRY_RUN_MODEL, MODELS, Suite, run_suite


def _suite(name: str) -> Suite:
    return importlib.import_module(f"benchmarks.suites.{name}").SUITE


def _plan(names: list[str], models: list[str]) -> list[str]:
    """The plan's lines; raises ``ValueError`` for a suite whose rows name unknown models."""
    lines = []
    for name in names:
        suite = _suite(name)
        if not isinstance(suite, Suite):
            raise ValueError(f"benchmarks.suites.{name}.SUITE is not a harness Suite")
        unknown = {m for m in suite.models if m not in MODELS}
        for row in [suite.baseline, *suite.rows]:
            unknown |= {m for m in (row.models or ()) if m not in MODELS}
        if unknown:
            raise ValueError(f"suite {name!r} names unknown models {sorted(unknown)}")
        earlier: set[str] = set()
        for row in [suite.baseline, *suite.rows]:
            if row.versus is not None and row.versus not in earlier:
                raise ValueError(f"suite {name!r}: row {row.name!r} is measured versus "
                                 f"{row.versus!r}, which is not an earlier row")
            earlier.add(row.name)
        chosen = [m for m in models if m in suite.models]
        lines.append(f"suite {name}: {suite.name}; models {', '.join(chosen) or '(none)'}")
        for row in [suite.baseline, *suite.rows]:
            only = [m for m in chosen if row.models is None or m in row.models]
            lines.append(f"  {row.name}  [{', '.join(only) or 'skipped'}]")
    return lines


def main(argv: list[str] | None = None) -> int:
    available = sorted(m.name for m in pkgutil.iter_modules(suites.__path__))
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", action="append", choices=available,
                        help="suite to run (repeatable; default: all)")
    parser.add_argument("--model", action="append", choices=list(MODELS),
                        help="model to run (repeatable; default: every model a suite lists)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where parameters and state live (cuda: CUDA-event timing, "
                             "torch.cuda.max_memory_allocated per step)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--interleave", action="store_true",
                        help="build every row of a table first, then time them round-robin "
                             "(one step of each per round): fairer ratios on a loaded machine")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the step-allocation count (one extra step per row)")
    parser.add_argument("--threads", type=int,
                        help="torch intra-op threads (default: torch's); 1 gives steadier "
                             "ratios on a loaded machine")
    parser.add_argument("--row", action="append", metavar="TEXT",
                        help="run only the rows whose name contains TEXT (repeatable; the "
                             "suite's baseline always runs): more rounds for the rows at "
                             "issue in the same time")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--dry-run", action="store_true",
                        help="print and check the plan, run one tiny CPU step per suite")
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.repeats < 1:
        parser.error("--warmup must be >= 0 and --repeats >= 1")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    names = args.suite or available
    models = args.model or list(MODELS)
    if args.dry_run:
        print(f"dry run: torch {torch.__version__}, device {args.device} "
              f"(cuda available: {torch.cuda.is_available()}), warmup {args.warmup}, "
              f"repeats {args.repeats}, interleave {args.interleave}")
        for line in _plan(names, models):
            print(line)
        results = []
        for name in names:
            suite = _suite(name)
            results += run_suite(suite, [DRY_RUN_MODEL], warmup=1, repeats=1, device="cpu",
                                 memory=not args.no_memory, rows=[suite.baseline])
        if len(results) != len(names):
            print(f"dry run: {len(names) - len(results)} suite baseline(s) failed")
            return 1
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(results, handle, indent=2)
        print("dry run: ok")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    where = args.device
    if args.device == "cuda":
        where = f"cuda ({torch.cuda.get_device_name()})"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {where}, "
          f"{'interleaved rounds' if args.interleave else 'rows in turn'}")
    results = []
    for name in names:
        suite = _suite(name)
        rows = [suite.baseline, *suite.rows]
        if args.row:
            rows = [suite.baseline] + [
                row for row in suite.rows if any(text in row.name for text in args.row)
            ]
        results += run_suite(suite, models, args.warmup, args.repeats,
                             device=args.device, interleave=args.interleave,
                             memory=not args.no_memory, rows=rows)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
