"""``explore demo``: the paper's Figure 1 on our 2-D valley landscapes.

For every landscape of ``theory.landscapes`` that carries demo settings (start, steps, learning
rates, α, β), SGD, E-SGD, Adam and E-Adam run full-batch from the same start. Plain
optimizers stop in the first minimum they reach; the explored ones (α < 0) keep moving along
the valley. Printed per run: the final loss, the path length along the valley and the known
minimum it ends nearest to. Written: ``trajectories.png`` (paths over log-loss contours),
``demo.csv`` and ``demo.json``.

*Path length along the valley*: ``Σ ‖θ_{k+1} − θ_k‖`` over the steps after the iterate first
reaches the valley floor, taken as the first step where ``‖∇f‖`` falls below a quarter of its
value at the start (the steep descent into the valley is over). The total path length is
reported beside it.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from lab import plots
from lab.outputs import write_csv, write_json

FLOOR_FRACTION = 0.25
GRID = 240


def valley_landscapes() -> list[str]:
    """Names of the landscapes that carry demo settings."""
    from theory import landscapes

    return [name for name in landscapes.names() if _has_demo(name)]


def _has_demo(name: str) -> bool:
    from theory import landscapes

    try:
        return landscapes.get(name).demo is not None
    except (TypeError, ValueError):
        return False


def _select(text: str | None) -> list[str]:
    from theory import landscapes

    available = valley_landscapes()
    if text is None:
        if not available:
            raise ValueError("theory.landscapes has no landscape with demo settings")
        return available
    chosen = [n.strip() for n in text.split(",") if n.strip()]
    if not chosen:
        raise ValueError(f"no landscape given; valley landscapes: {', '.join(available)}")
    for name in chosen:
        if name not in landscapes.names():
            raise ValueError(
                f"unknown landscape {name!r}; valley landscapes: {', '.join(available)}"
            )
        if name not in available:
            raise ValueError(
                f"landscape {name!r} has no demo settings; valley landscapes: "
                f"{', '.join(available)}"
            )
    return chosen


def path_lengths(landscape: Any, path: torch.Tensor) -> tuple[float, float]:
    """``(along the valley, total)``: see the module docstring."""
    steps = torch.linalg.vector_norm(path[1:] - path[:-1], dim=1)
    total = float(steps.sum())
    with torch.enable_grad():
        leaf = path.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(landscape.loss(leaf).sum(), leaf)
    grads = torch.linalg.vector_norm(grad, dim=1)  # the loss is per point: rows independent
    below = torch.nonzero(grads <= FLOOR_FRACTION * grads[0]).flatten()
    if below.numel() == 0:
        return 0.0, total
    first = int(below[0])
    return float(steps[first:].sum()), total


def nearest_minimum(landscape: Any, point: torch.Tensor) -> tuple[str, float, float]:
    """``(kind, value, distance)`` of the known minimum nearest to ``point``."""
    best = None
    for minimum in landscape.minima:
        distance = float(torch.linalg.vector_norm(
            point - torch.tensor(minimum.point, dtype=point.dtype)))
        if best is None or distance < best[2]:
            best = (minimum.kind, float(minimum.value), distance)
    return best if best is not None else ("-", math.nan, math.nan)


def run_demo(
    out: Path,
    *,
    landscapes: str | None = None,
    steps: int | None = None,
    alpha: float | None = None,
    beta: float | None = None,
    quiet: bool = False,
    stream: TextIO | None = None,
) -> dict[str, Any]:
    """Run the four optimizers on each valley landscape; print the table, write the files."""
    from adaptor import check_alpha_beta
    from theory import landscapes as registry

    stream = stream if stream is not None else sys.stdout
    names = _select(landscapes)
    chosen = []
    for name in names:
        land = registry.get(name)
        settings = land.demo
        overrides = {k: v for k, v in (("alpha", alpha), ("beta", beta), ("steps", steps))
                     if v is not None}
        settings = dataclasses.replace(settings, **overrides)
        check_alpha_beta(settings.alpha, settings.beta, where=f"landscape {name}")
        chosen.append((land, settings))
    out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    panels = []
    for land, settings in chosen:
        paths = {}
        for label, factory in settings.optimizers().items():
            path = registry.trajectory(land, factory, settings.steps, start=settings.start)
            paths[label] = path
            final = path[-1]
            along, total = path_lengths(land, path)
            kind, value, distance = nearest_minimum(land, final)
            base = label.removeprefix("E-")
            rows.append({
                "landscape": land.name,
                "optimizer": label,
                "lr": settings.lr[base],
                "alpha": settings.alpha if label.startswith("E-") else None,
                "beta": settings.beta if label.startswith("E-") else None,
                "steps": settings.steps,
                "final_x": float(final[0]),
                "final_y": float(final[1]),
                "final_loss": float(land.loss(final)),
                "valley_path": along,
                "total_path": total,
                "nearest_minimum": kind,
                "nearest_minimum_loss": value,
                "distance_to_it": distance,
            })
        (x_lo, x_hi), (y_lo, y_hi) = land.bounds
        xs = np.linspace(x_lo, x_hi, GRID)
        ys = np.linspace(y_lo, y_hi, GRID)
        X, Y = np.meshgrid(xs, ys)
        Z = land.loss_grid(torch.from_numpy(X), torch.from_numpy(Y)).numpy()
        Z = np.nan_to_num(Z - np.nanmin(Z), nan=np.nanmax(Z))
        panels.append({
            "name": f"{land.name}: {settings.steps} steps, E with α={settings.alpha:g}, "
                    f"β={settings.beta:g}",
            "grid": (X, Y, Z),
            "paths": {label: p.numpy() for label, p in paths.items()},
            "start": settings.start,
            "marks": np.array([m.point for m in land.minima]),
        })
    total_time = time.perf_counter() - started

    print("explore demo: SGD vs E-SGD and Adam vs E-Adam from the same start "
          "(the paper's Figure 1)", file=stream)
    print(format_table(rows), file=stream)
    write_csv(out / "demo.csv", rows)
    payload = {
        "command": "demo",
        "landscapes": [
            {"name": land.name, "description": land.description,
             "settings": dataclasses.asdict(settings)}
            for land, settings in chosen
        ],
        "valley_floor_rule": f"‖∇f‖ <= {FLOOR_FRACTION} ‖∇f(start)‖",
        "total_wall_time": total_time,
        "runs": rows,
    }
    write_json(out / "demo.json", payload)
    plots.trajectories(panels, out / "trajectories.png",
                       "explore demo — plain optimizers stop in the first minimum, "
                       "explored ones travel along the valley")
    print(f"wrote {out / 'trajectories.png'}, {out / 'demo.csv'}, {out / 'demo.json'} "
          f"({total_time:.0f} s)", file=stream)
    return payload


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ("landscape", "optimizer", "lr", "α / β", "final loss", "valley path",
              "total path", "ends near")
    table = [header]
    for r in rows:
        ab = "-" if r["alpha"] is None else f"{r['alpha']:g} / {r['beta']:g}"
        near = f"{r['nearest_minimum']} min (loss {r['nearest_minimum_loss']:.3g})"
        table.append((r["landscape"], r["optimizer"], f"{r['lr']:g}", ab,
                      f"{r['final_loss']:.4f}", f"{r['valley_path']:.3f}",
                      f"{r['total_path']:.3f}", near))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
