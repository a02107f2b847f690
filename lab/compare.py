"""``explore compare``: several optimizers × seeds on one task; table, CSV, JSON and a plot."""

from __future__ import annotations

import dataclasses
import math
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from lab import plots, registry
from lab.outputs import write_csv, write_json
from lab.tasks import load_task
from lab.train import REFERENCE_BATCH, RunResult, TrainConfig, effective_batch, train

DEFAULT_OPTIMIZERS = "sgd,e-sgd,adamw,e-adamw,lamb,alto"


def parse_optimizers(text: str) -> list[tuple[str, float | None]]:
    """``"adamw,e-adamw@3e-3"`` → ``[("adamw", None), ("e-adamw", 3e-3)]`` (``@lr`` optional).

    Every name is checked against the registry; duplicates are an error.
    """
    entries: list[tuple[str, float | None]] = []
    for raw in text.split(","):
        item = raw.strip().lower()
        if not item:
            continue
        name, _, lr_text = item.partition("@")
        name = name.strip()
        registry.resolve(name)
        lr: float | None = None
        if lr_text:
            try:
                lr = float(lr_text)
            except ValueError:
                raise ValueError(f"bad learning rate {lr_text!r} in {item!r}") from None
            if not (math.isfinite(lr) and lr > 0):
                raise ValueError(f"learning rate must be > 0, got {lr_text} in {item!r}")
        if item in (label(n, r) for n, r in entries):
            raise ValueError(f"optimizer {item!r} is listed twice")
        entries.append((name, lr))
    if not entries:
        raise ValueError(
            f"no optimizer given in {text!r}; available: {', '.join(registry.available())}"
        )
    return entries


def label(name: str, lr: float | None) -> str:
    return name if lr is None else f"{name}@{lr:g}"


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        return math.nan, math.nan
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return float(array.mean()), std


def summarize(runs: Sequence[RunResult]) -> dict[str, Any]:
    """Mean and (sample) standard deviation over seeds of the headline metrics."""
    out: dict[str, Any] = {"seeds": len(runs), "diverged": sum(r.diverged for r in runs)}
    for key in ("test_acc", "test_loss", "train_loss", "wall_time"):
        mean, std = _mean_std([getattr(r, key) for r in runs])
        out[f"{key}_mean"], out[f"{key}_std"] = mean, std
    first = runs[0]
    out.update(lr=first.lr, weight_decay=first.weight_decay, alpha=first.alpha, beta=first.beta)
    return out


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    """The printed table: one row per optimizer, mean ± std over seeds."""
    header = ("optimizer", "lr", "α / β", "test acc (%)", "train loss", "wall (s)")
    rows = [header]
    for name, s in summary.items():
        ab = "-" if s["alpha"] is None else f"{s['alpha']:g} / {s['beta']:g}"
        acc = f"{100 * s['test_acc_mean']:.2f} ± {100 * s['test_acc_std']:.2f}"
        loss = f"{s['train_loss_mean']:.4f} ± {s['train_loss_std']:.4f}"
        if s["diverged"]:
            loss += f" ({s['diverged']} diverged)"
        wall = f"{s['wall_time_mean']:.1f} ± {s['wall_time_std']:.1f}"
        rows.append((name, f"{s['lr']:.3g}", ab, acc, loss, wall))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def describe(config: TrainConfig, n_train: int, seeds: int) -> str:
    batch = effective_batch(config.batch_size, n_train)
    steps = max(1, n_train // batch)
    full = " (full batch)" if batch >= n_train else ""
    return (
        f"{config.task} ({config.model}), {n_train} train samples, batch {batch}{full}, "
        f"{steps} step{'s' if steps > 1 else ''}/epoch, {config.epochs} epochs, {seeds} "
        f"seed{'s' if seeds > 1 else ''}; lr: {config.lr_scaling} scaling from batch "
        f"{REFERENCE_BATCH}, {config.warmup_epochs:g} warm-up epochs, {config.schedule} schedule"
    )


def run_compare(
    config: TrainConfig,
    optimizers: Sequence[tuple[str, float | None]],
    seeds: Sequence[int],
    out: Path,
    *,
    quiet: bool = False,
    stream: TextIO | None = None,
) -> dict[str, Any]:
    """Train every optimizer with every seed; write ``results.csv``, ``summary.json``,
    ``loss_curves.png`` under ``out`` and print the table. Returns the summary."""
    from tqdm import tqdm

    stream = stream if stream is not None else sys.stdout
    config.validate()
    out.mkdir(parents=True, exist_ok=True)
    tasks = {seed: load_task(config.task, seed) for seed in seeds}
    n_train = int(tasks[seeds[0]].x_train.shape[0])
    print(f"explore compare: {describe(config, n_train, len(seeds))}", file=stream)

    runs: dict[str, list[RunResult]] = {}
    bar = tqdm(
        total=len(optimizers) * len(seeds) * config.epochs,
        disable=quiet,
        file=sys.stderr,
        unit="epoch",
        dynamic_ncols=True,
    )
    started = time.perf_counter()
    with bar:
        for name, lr in optimizers:
            key = label(name, lr)
            run_config = dataclasses.replace(config, lr=lr if lr is not None else config.lr)
            for seed in seeds:
                bar.set_description(f"{key} seed {seed}")

                def on_epoch(epoch: int, loss: float) -> None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

                result = train(name, run_config, seed, task=tasks[seed], on_epoch=on_epoch)
                result.optimizer = key
                bar.update(config.epochs - len(result.curves["epoch"]))  # diverged early
                runs.setdefault(key, []).append(result)
    total = time.perf_counter() - started

    summary = {key: summarize(results) for key, results in runs.items()}
    print(format_table(summary), file=stream)

    write_csv(out / "results.csv", [r.row() for results in runs.values() for r in results])
    payload = {
        "command": "compare",
        "config": dataclasses.asdict(config),
        "seeds": list(seeds),
        "n_train": n_train,
        "description": describe(config, n_train, len(seeds)),
        "total_wall_time": total,
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
        },
        "summary": summary,
        "runs": [dataclasses.asdict(r) for results in runs.values() for r in results],
    }
    write_json(out / "summary.json", payload)
    plots.loss_curves(
        {key: [r.curves for r in results] for key, results in runs.items()},
        out / "loss_curves.png",
        "explore compare — dashed: base, solid: with the adaptor (alto = E over lamb); mean "
        f"± std over seeds\n{describe(config, n_train, len(seeds))}",
    )
    print(
        f"wrote {out / 'results.csv'}, {out / 'summary.json'}, {out / 'loss_curves.png'} "
        f"({total:.0f} s)",
        file=stream,
    )
    return payload
