"""``explore flatness``: the sign of α against the flatness of the minimum found.

For each α (default −5, 0, 0.5) and seed, train ``E(optimizer)`` with that α and a shared β,
then measure the top eigenvalue ``λ_max`` of the Hessian of the full training loss at the
final parameters (``theory.flatness.top_hessian_eigenvalue``, Hessian-vector products) and the
test accuracy. The paper (Remark 2.1, Fig. 3) predicts: α < 0 explores and ends flatter
(smaller ``λ_max``) but converges more slowly; α > 0 exploits and ends sharper.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from torch import nn
from torch.nn import functional as F

from adaptor.presets import LARGE_BATCH_PRESET, SMALL_BATCH_PRESET
from lab import plots, registry
from lab.compare import _mean_std, describe
from lab.outputs import write_csv, write_json
from lab.tasks import Task, load_task
from lab.train import TrainConfig, train

DEFAULT_ALPHAS = (-5.0, 0.0, 0.5)


def paired_beta(alpha: float) -> float:
    """The paper's pairing: β = 0.99 with α ≤ 0 (explore), β = 0.01 with α > 0 (exploit)."""
    return (SMALL_BATCH_PRESET if alpha > 0 else LARGE_BATCH_PRESET)["beta"]


def explored_name(optimizer: str) -> str:
    """``adamw`` → ``e-adamw``; ``alto`` (the adaptor built in) stays ``alto``."""
    spec, _ = registry.resolve(optimizer)
    if spec.takes_alpha:
        return spec.name
    if spec.zeroth_order:
        raise ValueError(
            f"flatness needs a first-order optimizer, got {optimizer!r} (SPSA is zeroth order)"
        )
    return registry.EXPLORE_PREFIX + spec.name


def top_eigenvalue(model: nn.Module, task: Task, iters: int, seed: int) -> float:
    """``λ_max`` of the Hessian of the mean cross-entropy over the whole training set
    (Lanczos on Hessian-vector products, ``theory.flatness``)."""
    from theory.flatness import model_top_eigenvalue

    return float(model_top_eigenvalue(model, F.cross_entropy, task.x_train, task.y_train,
                                      iters=iters, seed=seed))


def run_flatness(
    config: TrainConfig,
    optimizer: str,
    alphas: Sequence[float],
    beta: float | None,
    seeds: Sequence[int],
    out: Path,
    *,
    hessian_iters: int = 50,
    quiet: bool = False,
    stream: TextIO | None = None,
) -> dict[str, Any]:
    """Train and measure for every α × seed; print the table; write CSV, JSON and a plot."""
    from tqdm import tqdm

    stream = stream if stream is not None else sys.stdout
    name = explored_name(optimizer)
    if not alphas:
        raise ValueError("give at least one α")
    if len(set(alphas)) != len(alphas):
        raise ValueError(f"α values must be distinct, got {list(alphas)}")
    betas = {a: paired_beta(a) if beta is None else float(beta) for a in alphas}
    for alpha in alphas:
        registry.alpha_beta(config.batch_size, alpha, betas[alpha])
    configs = {a: dataclasses.replace(config, alpha=float(a), beta=betas[a]) for a in alphas}
    for c in configs.values():
        c.validate()
    out.mkdir(parents=True, exist_ok=True)
    tasks = {seed: load_task(config.task, seed) for seed in seeds}
    n_train = int(tasks[seeds[0]].x_train.shape[0])
    shared = "β paired with α as in the paper" if beta is None else f"β = {beta:g}"
    print(f"explore flatness: {name}, {shared}; {describe(config, n_train, len(seeds))}",
          file=stream)

    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    bar = tqdm(total=len(alphas) * len(seeds) * config.epochs, disable=quiet, file=sys.stderr,
               unit="epoch", dynamic_ncols=True)
    with bar:
        for alpha, run_config in configs.items():
            for seed in seeds:
                bar.set_description(f"α={alpha:g} seed {seed}")
                measured: dict[str, float] = {}

                def hook(model: nn.Module, task: Task, seed: int = seed, alpha: float = alpha,
                         measured: dict[str, float] = measured) -> None:
                    bar.set_description(f"α={alpha:g} seed {seed}: λ_max")
                    measured["top_eig"] = top_eigenvalue(model, task, hessian_iters, seed)

                def on_epoch(epoch: int, loss: float) -> None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

                result = train(name, run_config, seed, task=tasks[seed], on_epoch=on_epoch,
                               model_hook=hook)
                bar.update(config.epochs - len(result.curves["epoch"]))
                records.append({**result.row(), "alpha": float(alpha),
                                "beta": betas[alpha], "top_eig": measured["top_eig"]})
    total = time.perf_counter() - started

    rows = []
    for alpha in alphas:
        mine = [r for r in records if r["alpha"] == float(alpha)]
        row: dict[str, Any] = {"alpha": float(alpha), "beta": betas[alpha], "seeds": len(mine)}
        for key in ("top_eig", "test_acc", "train_loss"):
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([r[key] for r in mine])
        rows.append(row)
    print(format_table(rows), file=stream)

    write_csv(out / "results.csv", records)
    payload = {
        "command": "flatness",
        "optimizer": name,
        "config": dataclasses.asdict(config),
        "alphas": [float(a) for a in alphas],
        "beta": beta,
        "betas": [betas[a] for a in alphas],
        "seeds": list(seeds),
        "hessian_iters": hessian_iters,
        "total_wall_time": total,
        "summary": rows,
        "runs": records,
    }
    write_json(out / "summary.json", payload)
    plots.flatness_bars(rows, out / "flatness.png",
                        f"explore flatness — {name}, {shared}, {config.task}, batch "
                        f"{min(config.batch_size, n_train)}")
    print(f"wrote {out / 'results.csv'}, {out / 'summary.json'}, {out / 'flatness.png'} "
          f"({total:.0f} s)", file=stream)
    return payload


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    header = ("α", "β", "top Hessian eigenvalue", "test acc (%)", "train loss")
    table = [header]
    for r in rows:
        table.append((
            f"{r['alpha']:g}",
            f"{r['beta']:g}",
            f"{r['top_eig_mean']:.3f} ± {r['top_eig_std']:.3f}",
            f"{100 * r['test_acc_mean']:.2f} ± {100 * r['test_acc_std']:.2f}",
            f"{r['train_loss_mean']:.4f} ± {r['train_loss_std']:.4f}",
        ))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
