"""Figures of the lab (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

DPI = 90


def _colors(n: int) -> list[Any]:
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def family(name: str) -> str:
    """The base an optimizer name adapts: ``e-adamw@0.01`` → ``adamw``, ``alto`` → ``lamb``."""
    base = name.split("@")[0].removeprefix("e-")
    return "lamb" if base == "alto" else base


def is_explored(name: str) -> bool:
    return name.startswith("e-") or name.split("@")[0] == "alto"


def loss_curves(
    curves: Mapping[str, Sequence[Mapping[str, Sequence[float]]]], path: Path, title: str
) -> Path:
    """Train loss (log scale) and test accuracy against epoch: mean over seeds, ±1 std band.

    ``curves[name]`` is a list (one per seed) of ``{"epoch", "train_loss", "test_acc"}``.
    """
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4.2))
    families = list(dict.fromkeys(family(name) for name in curves))
    palette = dict(zip(families, _colors(len(families))))
    for name, runs in curves.items():
        length = min(len(run["epoch"]) for run in runs)
        if length == 0:
            continue
        epochs = np.asarray(runs[0]["epoch"][:length])
        color = palette[family(name)]
        style = "-" if is_explored(name) else "--"
        for ax, key, scale in ((ax_loss, "train_loss", 1.0), (ax_acc, "test_acc", 100.0)):
            values = np.asarray([run[key][:length] for run in runs], dtype=float) * scale
            mean = values.mean(axis=0)
            ax.plot(epochs, mean, style, color=color, label=name, lw=1.5)
            if len(runs) > 1:
                std = values.std(axis=0)
                ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.15, lw=0)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("train loss (mini-batch mean)")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test accuracy (%)")
    # Zoom on the part that matters: from the worst accuracy a quarter of the way in.
    lows = [np.asarray(line.get_ydata())[len(line.get_ydata()) // 4] for line in
            ax_acc.get_lines()]
    if lows:
        ax_acc.set_ylim(max(0.0, min(lows) - 5.0), 100.5)
    ax_acc.legend(fontsize=8, loc="lower right")
    ax_loss.grid(alpha=0.3, which="both")
    ax_acc.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def trajectories(
    panels: Sequence[Mapping[str, Any]], path: Path, title: str
) -> Path:
    """One panel per landscape: loss contours, the valley, and each optimizer's path.

    ``panels[i]``: ``{"name", "grid": (X, Y, Z), "paths": {label: (N, 2) array},
    "start": (x, y), "valley": optional (M, 2) array, "marks": optional (K, 2) array}``.
    """
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(max(6.0, 5.2 * n), 5.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        x, y, z = panel["grid"]
        z = np.asarray(z, dtype=float)
        z = z - np.nanmin(z)
        # log contours resolve both the steep walls and the nearly flat valley floor
        shown = np.log10(z + 1e-3 * max(float(np.nanmedian(z)), 1e-12))
        top = np.nanquantile(shown, 0.9)
        levels = np.linspace(np.nanmin(shown), top, 28)
        ax.contourf(x, y, np.minimum(shown, top), levels=levels, cmap="Blues_r", alpha=0.9)
        ax.contour(x, y, shown, levels=levels[::3], colors="k", linewidths=0.3, alpha=0.4)
        valley = panel.get("valley")
        if valley is not None and len(valley):
            valley = np.asarray(valley)
            ax.plot(valley[:, 0], valley[:, 1], ":", color="gold", lw=1.2, label="valley")
        marks = panel.get("marks")
        if marks is not None and len(marks):
            marks = np.asarray(marks)
            ax.plot(marks[:, 0], marks[:, 1], "x", color="black", ms=8, mew=2,
                    label="known minima")
        paths = panel["paths"]
        for (label, path_xy), color in zip(paths.items(), _colors(len(paths))):
            path_xy = np.asarray(path_xy)
            style = "-" if label.lower().startswith("e-") else "--"
            ax.plot(path_xy[:, 0], path_xy[:, 1], style, color=color, lw=1.4, label=label)
            ax.plot(path_xy[-1, 0], path_xy[-1, 1], "o", color=color, ms=5)
        sx, sy = panel["start"]
        ax.plot(sx, sy, "*", color="red", ms=11, label="start")
        ax.set_xlim(x.min(), x.max())
        ax.set_ylim(y.min(), y.max())
        ax.set_title(panel["name"], fontsize=10)
        ax.set_aspect("equal", adjustable="box")
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=9, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def flatness_bars(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    """Top Hessian eigenvalue and test accuracy for each α (mean ± std over seeds)."""
    labels = [f"α = {row['alpha']:g}\nβ = {row['beta']:g}" for row in rows]
    fig, (ax_h, ax_a) = plt.subplots(1, 2, figsize=(8, 3.4))
    colors = _colors(len(rows))
    ax_h.bar(labels, [r["top_eig_mean"] for r in rows], yerr=[r["top_eig_std"] for r in rows],
             color=colors, capsize=4)
    ax_h.set_ylabel("top Hessian eigenvalue λ_max")
    ax_a.bar(labels, [100 * r["test_acc_mean"] for r in rows],
             yerr=[100 * r["test_acc_std"] for r in rows], color=colors, capsize=4)
    accs = [100 * r["test_acc_mean"] for r in rows]
    ax_a.set_ylim(max(0.0, min(accs) - 10.0), 100.0)
    ax_a.set_ylabel("test accuracy (%)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
