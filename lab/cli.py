"""``explore``: the lab's command line (also ``python -m lab``).

    explore demo                       Figure 1: SGD/Adam vs E-SGD/E-Adam on 2-D valleys
    explore compare [options]          optimizers × seeds on digits (real data) or synthetic
    explore flatness [options]         α ∈ {-5, 0, 0.5}: λ_max and tr H at equal training loss
    explore sweep [--quick] [options]  batch-size sweep, E vs its base, paired statistics
    explore optimizers                 the selectable optimizer names

Bad input (an unknown optimizer or task, a negative batch size, an inadmissible α, ...)
prints one line ``explore: error: ...`` on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

PROG = "explore"
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _int_arg(what: str, minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{what} must be >= {minimum}, got {value}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


def _float_arg(what: str, *, positive: bool = False, nonnegative: bool = False):
    def parse(text: str) -> float:
        import math

        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{what} must be finite, got {text}")
        if positive and value <= 0:
            raise argparse.ArgumentTypeError(f"{what} must be > 0, got {text}")
        if nonnegative and value < 0:
            raise argparse.ArgumentTypeError(f"{what} must be >= 0, got {text}")
        return value

    parse.__name__ = what
    return parse


def _task_arg(text: str) -> str:
    """``--task``: a built-in name, ``mnist1d@N`` or ``module:function`` (imported here, so a
    bad plug-in is reported before anything runs)."""
    from lab.tasks import check_task

    try:
        return check_task(text)
    except (ValueError, TypeError, ImportError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None


_task_arg.__name__ = "task"


def _add_common(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument(
        "--out", type=Path, default=None, help=f"output folder (default: runs/{command})"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--threads", type=_int_arg("threads", 1), default=1,
        help="torch intra-op threads (default: 1, fastest for these small models, "
             "and robust on a busy machine)",
    )


def _add_training(parser: argparse.ArgumentParser, *, batch: int, epochs: int, seeds: int,
                  warmup: float) -> None:
    from lab.tasks import MODELS, TASKS
    from lab.train import REFERENCE_BATCH, SCALINGS, SCHEDULES

    parser.add_argument("--task", type=_task_arg, default="digits",
                        help=f"{', '.join(TASKS)} (default: digits, scikit-learn's bundled "
                             "set); mnist1d@N for N samples (default 5000: 4000 train, 1000 "
                             "test, generated locally); or a plug-in module:function (or "
                             "file.py:function) whose function(seed) returns a lab.tasks.Task, "
                             "e.g. examples/custom_task.py:make_task")
    parser.add_argument("--model", default="mlp",
                        help=f"{' or '.join(MODELS)} (default: mlp); mnist1d: its paper's MLP "
                             "and 1-D CNN; a plug-in task may name its own models")
    parser.add_argument("--batch-size", type=_int_arg("batch size", 1), default=batch,
                        help=f"mini-batch size; >= the training set means full batch "
                             f"(default: {batch})")
    parser.add_argument("--epochs", type=_int_arg("epochs", 1), default=epochs,
                        help=f"(default: {epochs})")
    parser.add_argument("--seeds", type=_int_arg("seeds", 1), default=seeds,
                        help=f"number of seeds (split, init, batches, SPSA) (default: {seeds})")
    parser.add_argument("--first-seed", type=_int_arg("first seed", 0), default=0,
                        help="seeds are first-seed, first-seed+1, ... (default: 0)")
    parser.add_argument("--lr", type=_float_arg("learning rate", positive=True), default=None,
                        help=f"learning rate at batch {REFERENCE_BATCH} for every optimizer, "
                             "before the scaling rule (default: each optimizer's own)")
    parser.add_argument("--lr-scaling", default="sqrt", choices=SCALINGS,
                        help=f"scale the lr by B/{REFERENCE_BATCH} (linear), its square root "
                             "(sqrt, default) or not at all (none)")
    parser.add_argument("--warmup-epochs", type=_float_arg("warm-up epochs", nonnegative=True),
                        default=warmup, help=f"linear warm-up length (default: {warmup:g})")
    parser.add_argument("--schedule", default="cosine", choices=SCHEDULES,
                        help="after warm-up: cosine to 0 (default), step (×0.1 at 50%% and "
                             "75%%) or constant")
    parser.add_argument("--weight-decay", type=_float_arg("weight decay", nonnegative=True),
                        default=None, help="(default: each optimizer's own)")


def build_parser() -> argparse.ArgumentParser:
    from lab.compare import DEFAULT_OPTIMIZERS
    from lab.flatness import DEFAULT_ALPHAS

    parser = _Parser(
        prog=PROG,
        description="The exploration adaptor E in the lab: see what it does to an optimizer.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    demo = sub.add_parser("demo", help="Figure 1: trajectories along 2-D valleys",
                          description="SGD vs E-SGD and Adam vs E-Adam from the same start on "
                                      "2-D valley landscapes (the paper's Figure 1).")
    demo.add_argument("--landscapes", default=None,
                      help="comma-separated landscape names (default: every valley landscape)")
    demo.add_argument("--steps", type=_int_arg("steps", 1), default=None,
                      help="override each landscape's number of steps")
    demo.add_argument("--alpha", type=float, default=None,
                      help="override each landscape's α of the explored optimizers")
    demo.add_argument("--beta", type=float, default=None,
                      help="override each landscape's β of the explored optimizers")
    _add_common(demo, "demo")

    compare = sub.add_parser("compare", help="optimizers × seeds on real data",
                             description="Train a small model with several optimizers and "
                                         "seeds; print mean ± std, write CSV, JSON and a plot.")
    _add_training(compare, batch=1024, epochs=150, seeds=5, warmup=10.0)
    compare.add_argument("--optimizers", default=DEFAULT_OPTIMIZERS,
                         help="comma-separated names, each optionally name@lr (default: "
                              f"{DEFAULT_OPTIMIZERS}); see `explore optimizers`")
    compare.add_argument("--alpha", type=float, default=None,
                         help="α of e-* optimizers and alto (default: preset(batch size))")
    compare.add_argument("--beta", type=float, default=None,
                         help="β of e-* optimizers and alto (default: preset(batch size))")
    _add_common(compare, "compare")

    flat = sub.add_parser("flatness", help="α vs the curvature, at equal training loss",
                          description="Train E(optimizer) with each α (α = 0: the base) and "
                                      "compare the top Hessian eigenvalue and the Hessian "
                                      "trace of the training loss at checkpoints of equal "
                                      "training loss (the first epoch at or below each "
                                      "threshold), and at the end (the paper's Figure 3 on a "
                                      "small scale).")
    _add_training(flat, batch=1024, epochs=150, seeds=5, warmup=10.0)
    flat.add_argument("--optimizer", default="adamw",
                      help="the base optimizer to adapt (default: adamw); alto also works")
    flat.add_argument("--alphas", type=float, nargs="+", default=list(DEFAULT_ALPHAS),
                      help="α values (default: -5 0 0.5)")
    flat.add_argument("--beta", type=float, default=None,
                      help="one β for every α (default: the paper's pairing, β = 0.99 for "
                           "α <= 0 and β = 0.01 for α > 0)")
    flat.add_argument("--hessian-iters", type=_int_arg("hessian iterations", 1), default=50,
                      help="restarts of the top-eigenvalue solver (Lanczos, scipy's eigsh; "
                           "default: 50)")
    flat.add_argument("--loss-thresholds", type=_float_arg("loss threshold", positive=True),
                      nargs="+", default=None,
                      help="full-batch training losses at which to compare the curvature "
                           "(each run's first epoch at or below each; default: --thresholds "
                           "values log-spaced from the initial loss to the lowest loss every "
                           "run reached)")
    flat.add_argument("--thresholds", type=_int_arg("thresholds", 1), default=4,
                      help="number of automatic loss thresholds (default: 4)")
    flat.add_argument("--trace-probes", type=_int_arg("trace probes", 1), default=32,
                      help="Rademacher probes of Hutchinson's Hessian-trace estimate; exact "
                           "trace when the model has at most this many parameters "
                           "(default: 32)")
    _add_common(flat, "flatness")

    _add_sweep(sub)

    sub.add_parser("optimizers", help="list the selectable optimizer names")
    return parser


def _list_arg(what: str, item):
    def parse(text: str) -> tuple:
        values = []
        for part in text.split(","):
            if part.strip():
                values.append(item(part.strip()))
        if not values:
            raise argparse.ArgumentTypeError(f"{what}: give at least one value, got {text!r}")
        return tuple(values)

    parse.__name__ = what
    return parse


def _add_sweep(sub) -> None:
    from lab.sweep import DEFAULT, QUICK, batch_label

    def show(values) -> str:
        return ",".join(f"{v:.3g}" if isinstance(v, float) else batch_label(v) for v in values)

    def both(field: str, fmt=str) -> str:
        d, q = getattr(DEFAULT, field), getattr(QUICK, field)
        return f"default: {fmt(d)}" + ("" if d == q else f"; --quick: {fmt(q)}")

    sweep = sub.add_parser(
        "sweep", help="batch-size sweep: E vs its base, paired statistics (the paper's Table 16)",
        description="For each batch size and optimizer pair: tune the lr on a validation split "
                    "carved from the training set, train every optimizer with K paired seeds "
                    "(same initialisation and batch order on both sides), report test accuracy "
                    "and training loss as mean ± t-interval and the paired difference E − base "
                    "with a paired t-test and a Wilcoxon test. Writes table.csv, runs.csv, "
                    "sweep.json and sweep.png.")
    sweep.add_argument("--quick", action="store_true",
                       help="the small preset (under 3 minutes on 2 CPU cores); explicit "
                            "options still override it")
    sweep.add_argument("--task", type=_task_arg, default=None,
                       help=f"the task (default: {DEFAULT.task}); see `explore compare --help`")
    sweep.add_argument("--model", default=None, help=f"the model ({both('model')})")
    sweep.add_argument("--batch-sizes", type=_list_arg("batch sizes", _batch_item), default=None,
                       help=f"comma-separated, 'full' = the whole training split "
                            f"({both('batch_sizes', show)})")
    sweep.add_argument("--pairs", default=None,
                       help="comma-separated base:explored optimizer pairs (default: "
                            + ",".join(f"{b}:{e}" for b, e in DEFAULT.pairs) + ")")
    sweep.add_argument("--epochs", type=_int_arg("epochs", 1), default=None,
                       help=f"epochs of every run ({both('epochs')})")
    sweep.add_argument("--warmup-epochs", type=_float_arg("warm-up epochs", nonnegative=True),
                       default=None,
                       help=f"linear warm-up ({both('warmup_epochs', '{:g}'.format)})")
    sweep.add_argument("--schedule", default=None, choices=("cosine", "step", "constant"),
                       help=f"after warm-up ({both('schedule')})")
    sweep.add_argument("--lr-factors", default=None,
                       type=_list_arg("lr factors", _float_arg("lr factor", positive=True)),
                       help="the lr grid: multiples of each optimizer's default lr scaled to the "
                            f"batch size ({both('lr_factors', show)})")
    sweep.add_argument("--lr-scaling", default=None, choices=("sqrt", "linear", "none"),
                       help=f"scaling of the default lr to the batch size from batch 128 "
                            f"({both('lr_scaling')})")
    sweep.add_argument("--seeds", type=_int_arg("seeds", 2), default=None,
                       help=f"paired seeds of the final runs ({both('seeds')})")
    sweep.add_argument("--first-seed", type=_int_arg("first seed", 0), default=None,
                       help="final seeds are first-seed, first-seed+1, ... (default: 0)")
    sweep.add_argument("--tune-seeds", type=_int_arg("tune seeds", 1), default=None,
                       help=f"seeds per lr of the grid ({both('tune_seeds')})")
    sweep.add_argument("--val-fraction", type=_float_arg("validation fraction", positive=True),
                       default=None, help="part of the training split held out to choose the "
                                          f"lr ({both('val_fraction')})")
    sweep.add_argument("--data-seed", type=_int_arg("data seed", 0), default=None,
                       help="the train/test split and the validation split (default: 0)")
    sweep.add_argument("--alphas", type=_float_arg("alpha"), nargs="+", default=None,
                       help="α values of the explored side, space-separated (--alphas -5 "
                            "0.5), each its own variant (default: the paper's preset per "
                            "batch size: 0.5 below 1024, -5 from 1024)")
    sweep.add_argument("--betas", type=_float_arg("beta"), nargs="+", default=None,
                       help="β values (default: the preset per batch size: 0.01 below 1024, "
                            "0.99 from 1024)")
    sweep.add_argument("--weight-decay", type=_float_arg("weight decay", nonnegative=True),
                       default=None, help="(default: each optimizer's own)")
    sweep.add_argument("--confidence", type=_float_arg("confidence", positive=True),
                       default=None, help="level of the intervals (default: 0.95)")
    sweep.add_argument("--device", default=None,
                       help="cpu (default) or cuda[:index] where a GPU exists")
    sweep.add_argument("--workers", type=_int_arg("workers", 1), default=None,
                       help="training processes, each with --threads threads (default: 1; "
                            "2 uses both cores of a 2-core machine)")
    _add_common(sweep, "sweep")


def _batch_item(text: str) -> int:
    from lab.sweep import parse_batch_sizes

    try:
        return parse_batch_sizes(text)[0]
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _sweep_config(args: argparse.Namespace):
    import dataclasses

    from lab.sweep import DEFAULT, QUICK, parse_pairs

    base = QUICK if args.quick else DEFAULT
    given = {
        "task": args.task, "model": args.model, "batch_sizes": args.batch_sizes,
        "epochs": args.epochs, "warmup_epochs": args.warmup_epochs, "schedule": args.schedule,
        "lr_factors": args.lr_factors, "lr_scaling": args.lr_scaling, "seeds": args.seeds,
        "first_seed": args.first_seed, "tune_seeds": args.tune_seeds,
        "val_fraction": args.val_fraction, "data_seed": args.data_seed,
        "alphas": None if args.alphas is None else tuple(args.alphas),
        "betas": None if args.betas is None else tuple(args.betas),
        "weight_decay": args.weight_decay,
        "confidence": args.confidence, "device": args.device, "workers": args.workers,
    }
    if args.pairs is not None:
        given["pairs"] = parse_pairs(args.pairs)
    config = dataclasses.replace(base, threads=args.threads,
                                 **{k: v for k, v in given.items() if v is not None})
    config.validate()
    return config


def _seeds(args: argparse.Namespace) -> list[int]:
    return list(range(args.first_seed, args.first_seed + args.seeds))


def _train_config(args: argparse.Namespace, **extra):
    from lab.train import TrainConfig

    config = TrainConfig(
        task=args.task,
        model=args.model,
        batch_size=args.batch_size,
        epochs=args.epochs,
        lr=args.lr,
        lr_scaling=args.lr_scaling,
        warmup_epochs=args.warmup_epochs,
        schedule=args.schedule,
        weight_decay=args.weight_decay,
        **extra,
    )
    config.validate()
    return config


def _out(args: argparse.Namespace) -> Path:
    out = args.out if args.out is not None else Path("runs") / args.command
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    return out


def _run(args: argparse.Namespace) -> int:
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)

    if args.command == "optimizers":
        from lab import registry
        from lab.train import REFERENCE_BATCH

        for name in registry.available():
            spec, explored = registry.resolve(name)
            what = f"the adaptor E over {spec.name}" if explored else spec.summary
            print(f"{name:14s} lr {spec.lr:<7g} at batch {REFERENCE_BATCH}  {what}")
        return 0

    if args.command == "compare":
        from lab.compare import parse_optimizers, run_compare

        optimizers = parse_optimizers(args.optimizers)
        config = _train_config(args, alpha=args.alpha, beta=args.beta)
        run_compare(config, optimizers, _seeds(args), _out(args), quiet=args.quiet)
        return 0

    if args.command == "flatness":
        from lab.flatness import run_flatness

        config = _train_config(args)
        run_flatness(config, args.optimizer, args.alphas, args.beta, _seeds(args), _out(args),
                     hessian_iters=args.hessian_iters, loss_thresholds=args.loss_thresholds,
                     thresholds=args.thresholds, trace_probes=args.trace_probes,
                     quiet=args.quiet)
        return 0

    if args.command == "sweep":
        from lab.sweep import run_sweep

        run_sweep(_sweep_config(args), _out(args), quiet=args.quiet)
        return 0

    if args.command == "demo":
        from lab.demo import run_demo

        run_demo(_out(args), landscapes=args.landscapes, steps=args.steps, alpha=args.alpha,
                 beta=args.beta, quiet=args.quiet)
        return 0

    raise UsageError("a command is required: demo, compare, flatness, sweep or optimizers "
                     "(see explore --help)")


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{PROG}: error: {text}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 2 bad input, 130 interrupted)."""
    debug = os.environ.get("EXPLORE_DEBUG", "") not in ("", "0")
    try:
        args = build_parser().parse_args(list(argv) if argv is not None else None)
        return _run(args)
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `explore demo | head`: stop quietly, as other tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except (UsageError, ValueError, TypeError, FileNotFoundError, PermissionError,
            NotADirectoryError, ImportError) as error:
        if debug:
            raise
        print(_one_line(error), file=sys.stderr)
        return EXIT_USAGE
