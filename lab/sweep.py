"""``explore sweep``: the paper's batch-size sweep (its Table 16) at toy scale, with statistics.

For every batch size and every optimizer pair (base vs the adaptor over it: ``lamb`` vs
``alto``, ``adamw`` vs ``e-adamw``, ``sgd`` vs ``e-sgd`` by default):

1. **Learning rate, on a validation split.** A stratified ``val_fraction`` of the *training*
   split is held out (fixed by ``data_seed``); each optimizer trains on the rest with every lr
   of the grid ``lr_c · f`` (``f`` in ``lr_factors``, ``lr_c`` the optimizer's default lr
   scaled to the batch size by ``lr_scaling``) and ``tune_seeds`` seeds; the lr with the best
   mean validation accuracy wins (ties: lower validation loss, then smaller lr). The function
   that does this, :func:`select_learning_rates`, receives only the training split, so the
   test split cannot influence the choice.
2. **Final runs.** Each optimizer trains on the whole training split with its chosen lr and
   ``seeds`` seeds. A seed fixes the initialisation and the batch order, so the two sides of a
   pair with the same seed start from the same weights and see the same batches (checked on
   every run from digests of the initial weights and of each epoch's permutation; a mismatch
   is an error). The test split is evaluated here and only here.
3. **Statistics** (``lab.stats``): test accuracy and final training loss (whole training
   split) as mean ± ``confidence`` t-interval over seeds, and the paired difference
   (E − base) with its t-interval, the paired t-test and the Wilcoxon signed-rank test.

α and β of the explored side default to ``adaptor.preset(batch)`` at each batch size (batch
< 1024: α = 0.5, β = 0.01; otherwise α = −5, β = 0.99); ``alphas``/``betas`` sweep them
(every combination becomes its own E variant, paired with the same base runs).

Outputs under ``out``: ``table.csv`` (one row per batch size and pair), ``runs.csv`` (every
run of both phases), ``sweep.json`` (configuration, lr selection scores, table, runs) and
``sweep.png`` (test accuracy and paired gap against batch size).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from lab import registry
from lab.outputs import write_csv, write_json
from lab.stats import Interval, paired_difference, t_interval
from lab.tasks import Task, load_task
from lab.train import SCALINGS, SCHEDULES, TrainConfig, scaled_lr, train

FULL = 0  # batch size "full": the whole training split of the phase
DEFAULT_PAIRS = (("lamb", "alto"), ("adamw", "e-adamw"), ("sgd", "e-sgd"))
TUNE_SEED_OFFSET = 1000  # tuning seeds are 1000, 1001, ...: independent of the final seeds


@dataclass
class SweepConfig:
    """Everything ``explore sweep`` needs; :data:`DEFAULT` and :data:`QUICK` are the presets."""

    task: str = "mnist1d"
    model: str = "mlp"
    batch_sizes: tuple[int, ...] = (128, 512, 1024, FULL)
    pairs: tuple[tuple[str, str], ...] = DEFAULT_PAIRS
    epochs: int = 100
    warmup_epochs: float = 5.0
    schedule: str = "cosine"
    lr_scaling: str = "sqrt"
    # the registry's default lrs sit low for AdamW and SGD here: with ⅓..3 their best lr was at
    # the top of the grid at almost every batch size (measured on MNIST-1D)
    lr_factors: tuple[float, ...] = (1 / 3, 1.0, 3.0, 9.0)
    seeds: int = 6  # 6 pairs: the smallest n at which a two-sided Wilcoxon p can be < 0.05
    first_seed: int = 0
    tune_seeds: int = 1
    val_fraction: float = 0.2
    data_seed: int = 0
    alphas: tuple[float, ...] | None = None  # None: preset(batch) for every batch size
    betas: tuple[float, ...] | None = None
    weight_decay: float | None = None
    confidence: float = 0.95
    device: str = "cpu"
    workers: int = 1
    threads: int = 1

    def validate(self) -> None:
        """``ValueError``/``TypeError`` naming the setting and its allowed range."""
        if not self.batch_sizes:
            raise ValueError("batch sizes: give at least one (an integer >= 1 or 'full')")
        for b in self.batch_sizes:
            if isinstance(b, bool) or not isinstance(b, int) or b < 0:
                raise ValueError(f"batch size must be an integer >= 1 or 'full', got {b!r}")
        if len(set(self.batch_sizes)) != len(self.batch_sizes):
            raise ValueError(f"batch sizes are listed twice: {self.batch_sizes}")
        if not self.pairs:
            raise ValueError("pairs: give at least one base:explored pair")
        for base, explored in self.pairs:
            check_pair(base, explored)
        for what, value, low in (("epochs", self.epochs, 1), ("seeds", self.seeds, 1),
                                 ("tune seeds", self.tune_seeds, 1),
                                 ("first seed", self.first_seed, 0),
                                 ("data seed", self.data_seed, 0),
                                 ("workers", self.workers, 1), ("threads", self.threads, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{what} must be an integer >= {low}, got {value!r}")
        if not (math.isfinite(self.warmup_epochs) and self.warmup_epochs >= 0):
            raise ValueError(f"warm-up epochs must be >= 0, got {self.warmup_epochs}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; available: "
                             f"{', '.join(SCHEDULES)}")
        if self.lr_scaling not in SCALINGS:
            raise ValueError(f"unknown LR scaling rule {self.lr_scaling!r}; available: "
                             f"{', '.join(SCALINGS)}")
        if not self.lr_factors or not all(math.isfinite(f) and f > 0 for f in self.lr_factors):
            raise ValueError(f"lr factors must be numbers > 0, got {self.lr_factors}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"validation fraction must be in (0, 1), got {self.val_fraction}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise ValueError(f"weight decay must be >= 0, got {self.weight_decay}")
        for what, values in (("alphas", self.alphas), ("betas", self.betas)):
            if values is not None and (not values or not all(math.isfinite(v) for v in values)):
                raise ValueError(f"{what} must be finite numbers, got {values}")
        check_device(self.device)


DEFAULT = SweepConfig()
QUICK = SweepConfig(batch_sizes=(128, 1024, FULL), epochs=20, warmup_epochs=2.0,
                    lr_factors=(0.5, 2.0), seeds=3)


def check_device(device: str) -> torch.device:
    """``torch.device(device)``; a clear ``ValueError`` if it is not usable here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu' or 'cuda[:index]', got {device!r}") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"device must be 'cpu' or 'cuda[:index]', got {device!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA device is available here "
                         "(torch.cuda.is_available() is False); use --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA "
                         "device(s) here")
    return dev


def family(name: str) -> str:
    """The base an optimizer name adapts: ``e-adamw`` → ``adamw``, ``alto`` → ``lamb``."""
    spec, _ = registry.resolve(name)
    return "lamb" if spec.name == "alto" else spec.name


def check_pair(base: str, explored: str) -> None:
    """``base`` has no adaptor, ``explored`` is the adaptor over the same base."""
    if registry.uses_alpha(base):
        raise ValueError(f"pair {base}:{explored}: the base {base!r} already has the adaptor")
    if not registry.uses_alpha(explored):
        raise ValueError(f"pair {base}:{explored}: {explored!r} has no adaptor (use e-{base}"
                         f"{' or alto' if family(base) == 'lamb' else ''})")
    if family(base) != family(explored):
        raise ValueError(f"pair {base}:{explored}: {explored!r} adapts {family(explored)!r}, "
                         f"not {base!r}")


def parse_pairs(text: str) -> tuple[tuple[str, str], ...]:
    """``"lamb:alto,adamw:e-adamw"`` → ``(("lamb", "alto"), ("adamw", "e-adamw"))``."""
    pairs = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        base, sep, explored = item.partition(":")
        if not sep or not base.strip() or not explored.strip():
            raise ValueError(f"pair {item!r} must be base:explored, e.g. adamw:e-adamw")
        pair = (base.strip(), explored.strip())
        check_pair(*pair)
        if pair in pairs:
            raise ValueError(f"pair {item!r} is listed twice")
        pairs.append(pair)
    if not pairs:
        raise ValueError(f"no pair given in {text!r}; e.g. lamb:alto,adamw:e-adamw")
    return tuple(pairs)


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """``"64,256,full"`` → ``(64, 256, 0)`` (``0`` = :data:`FULL`)."""
    sizes = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        if item == "full":
            sizes.append(FULL)
            continue
        try:
            value = int(item)
        except ValueError:
            raise ValueError(f"batch size must be an integer >= 1 or 'full', got {item!r}") \
                from None
        if value < 1:
            raise ValueError(f"batch size must be an integer >= 1 or 'full', got {item!r}")
        sizes.append(value)
    if not sizes:
        raise ValueError(f"no batch size given in {text!r}")
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"batch sizes are listed twice in {text!r}")
    return tuple(sizes)


def batch_label(batch: int) -> str:
    return "full" if batch == FULL else str(batch)


# -- the plan ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One optimizer setting of a batch size: a base, or an E side with its α, β."""

    label: str
    name: str
    alpha: float | None
    beta: float | None


@dataclass
class BatchPlan:
    """What runs at one batch size: the effective batch of each phase, variants, pairs."""

    key: str  # "64", ..., "full"
    final_batch: int  # on the whole training split
    tune_batch: int  # on the training split minus the validation part
    variants: dict[str, Variant]
    pairs: list[tuple[str, str]]  # (base label, explored label)
    lr_centre: dict[str, float] = field(default_factory=dict)


def plan_sweep(config: SweepConfig, n_train: int, n_fit: int) -> list[BatchPlan]:
    """One :class:`BatchPlan` per batch size; ``ValueError`` for an inadmissible α, β."""
    plans = []
    swept = config.alphas is not None or config.betas is not None
    for batch in config.batch_sizes:
        final_batch = n_train if batch == FULL else min(batch, n_train)
        tune_batch = n_fit if batch == FULL else min(batch, n_fit)
        variants: dict[str, Variant] = {}
        pairs = []
        for base, explored in config.pairs:
            variants.setdefault(base, Variant(base, base, None, None))
            for a, b in itertools.product(config.alphas or (None,), config.betas or (None,)):
                try:
                    alpha, beta = registry.alpha_beta(final_batch, a, b)
                except ValueError as error:
                    raise ValueError(f"batch {batch_label(batch)}: {error}") from None
                label = explored
                if swept:
                    label = f"{explored}(α={alpha:g},β={beta:g})"
                variants.setdefault(label, Variant(label, explored, alpha, beta))
                if (base, label) not in pairs:
                    pairs.append((base, label))
        plan = BatchPlan(batch_label(batch), final_batch, tune_batch, variants, pairs)
        for label, variant in variants.items():
            spec, _ = registry.resolve(variant.name)
            plan.lr_centre[label] = scaled_lr(spec.lr, final_batch, config.lr_scaling)
        plans.append(plan)
    return plans


# -- running -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One training run."""

    phase: str  # "tune" (validation split) or "final" (test split)
    batch: str
    batch_size: int
    label: str
    name: str
    lr: float
    alpha: float | None
    beta: float | None
    seed: int


def carve_validation(task: Task, fraction: float, seed: int) -> Task:
    """The training split cut in two: the returned task trains on ``1 − fraction`` of it and
    evaluates on the rest (its ``x_test``/``y_test``), stratified by class, fixed by ``seed``.

    Only ``task.x_train``/``task.y_train`` are read; the test split is not touched.
    """
    from sklearn.model_selection import train_test_split

    n = int(task.x_train.shape[0])
    labels = task.y_train.cpu().numpy()
    index = np.arange(n)
    try:
        fit, val = train_test_split(index, test_size=fraction, random_state=seed, stratify=labels)
    except ValueError:  # a class with one sample, or fewer validation samples than classes
        fit, val = train_test_split(index, test_size=fraction, random_state=seed)
    fit_t, val_t = torch.from_numpy(np.sort(fit)), torch.from_numpy(np.sort(val))
    return dataclasses.replace(
        task,
        x_train=task.x_train[fit_t],
        y_train=task.y_train[fit_t],
        x_test=task.x_train[val_t],
        y_test=task.y_train[val_t],
    )


def _to_device(task: Task, device: str) -> Task:
    dev = torch.device(device)
    if task.x_train.device == dev:
        return task
    return dataclasses.replace(task, x_train=task.x_train.to(dev), y_train=task.y_train.to(dev),
                               x_test=task.x_test.to(dev), y_test=task.y_test.to(dev))


def _train_config(config: SweepConfig, job: Job) -> TrainConfig:
    return TrainConfig(
        task=config.task,
        model=config.model,
        batch_size=job.batch_size,
        epochs=config.epochs,
        lr=job.lr,
        lr_scaling="none",  # the job's lr is already the one for its batch size
        warmup_epochs=config.warmup_epochs,
        schedule=config.schedule,
        weight_decay=config.weight_decay,
        alpha=job.alpha,
        beta=job.beta,
    )


def run_job(
    config: SweepConfig, job: Job, task: Task, on_epoch: Callable[[int, float], None] | None = None
) -> dict[str, Any]:
    """Train ``job`` on ``task`` (whose ``x_test`` is the validation split in phase "tune");
    a flat record with digests of the initial weights and of the batch order."""
    init_digest = hashlib.sha256()
    order_digest = hashlib.sha256()
    first_order = hashlib.sha256()
    epochs_ordered = [0]

    def on_start(model: torch.nn.Module) -> None:
        for tensor in model.state_dict().values():
            init_digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())

    def on_order(order: torch.Tensor) -> None:
        data = order.cpu().numpy().tobytes()
        order_digest.update(data)
        if epochs_ordered[0] == 0:
            first_order.update(data)
        epochs_ordered[0] += 1

    result = train(job.name, _train_config(config, job), job.seed, task=task, on_epoch=on_epoch,
                   on_start=on_start, on_order=on_order)
    split = "val" if job.phase == "tune" else "test"
    record: dict[str, Any] = dataclasses.asdict(job)
    record.update(
        lr=result.lr,
        weight_decay=result.weight_decay,
        val_acc=None,
        val_loss=None,
        test_acc=None,
        test_loss=None,
        train_loss=result.train_loss,
        diverged=result.diverged,
        steps=result.steps,
        wall_time=result.wall_time,
        init_digest=init_digest.hexdigest()[:16],
        order_digest=order_digest.hexdigest()[:16],  # every epoch's permutation
        first_order_digest=first_order.hexdigest()[:16],
        order_epochs=epochs_ordered[0],  # fewer than the epochs if the run diverged
    )
    record[f"{split}_acc"] = result.test_acc
    record[f"{split}_loss"] = result.test_loss
    return record


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _worker_run(config: SweepConfig, job: Job, task: Task) -> dict[str, Any]:
    return run_job(config, job, _to_device(task, config.device))


def _check_picklable(task: Task) -> None:
    """Workers receive the task pickled: say so before any run rather than at the first job."""
    import pickle

    try:
        pickle.dumps(task)
    except Exception as error:  # pickle raises several types (PicklingError, AttributeError)
        raise ValueError(
            f"--workers > 1 sends the task to worker processes, and task {task.name!r} cannot "
            f"be pickled ({error}); define its model factories at module level or use "
            "--workers 1"
        ) from None


def open_pool(config: SweepConfig) -> ProcessPoolExecutor | None:
    """``config.workers`` spawned processes (``None`` for 1: run inline). A script that
    calls :func:`run_sweep` with workers > 1 needs the ``if __name__ == "__main__":`` guard."""
    if config.workers == 1:
        return None
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # fork after torch's threads start can hang
    return ProcessPoolExecutor(max_workers=config.workers, mp_context=context,
                               initializer=_worker_init, initargs=(config.threads,))


def run_jobs(
    config: SweepConfig, jobs: Sequence[Job], task: Task, bar: Any,
    pool: ProcessPoolExecutor | None = None,
) -> list[dict[str, Any]]:
    """Every job on ``task``, in order: inline, or on ``pool`` (each job gets its own copy of
    the task, so a worker holds nothing but what its job was given)."""
    if pool is None:
        on_device = _to_device(task, config.device)
        records = []
        # These models are tiny: more intra-op threads than cores (or than this process's
        # share of a busy machine) makes every step tens of times slower, not faster.
        threads = torch.get_num_threads()
        torch.set_num_threads(config.threads)
        try:
            for job in jobs:
                bar.set_description(f"{job.phase} {job.batch} {job.label} lr {job.lr:.3g} "
                                    f"s{job.seed}")
                per_epoch = steps_per_epoch(job, task)
                counted = [0]

                def on_epoch(epoch: int, loss: float, per_epoch=per_epoch,
                             counted=counted) -> None:
                    bar.update(per_epoch)
                    counted[0] += per_epoch
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

                records.append(run_job(config, job, on_device, on_epoch))
                # a diverged run stops early: the bar still advances by its whole budget
                bar.update(config.epochs * per_epoch - counted[0])
        finally:
            torch.set_num_threads(threads)
        return records
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    futures = {pool.submit(_worker_run, config, job, task): i for i, job in enumerate(jobs)}
    for future in as_completed(futures):
        i = futures[future]
        results[i] = future.result()
        bar.set_description(f"{jobs[i].phase} {jobs[i].batch} {jobs[i].label}")
        bar.update(config.epochs * steps_per_epoch(jobs[i], task))
    return [r for r in results if r is not None]


def steps_per_epoch(job: Job, task: Task) -> int:
    """As in ``lab.train``: ``⌊n / B⌋`` batches of exactly ``B`` (one at full batch)."""
    return max(1, int(task.x_train.shape[0]) // job.batch_size)


def _score(records: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """(mean validation accuracy, mean validation loss); a diverged run counts as −∞."""
    accs = [r["val_acc"] if not r["diverged"] and math.isfinite(r["val_acc"]) else -math.inf
            for r in records]
    losses = [r["val_loss"] if not r["diverged"] and math.isfinite(r["val_loss"]) else math.inf
              for r in records]
    return float(np.mean(accs)), float(np.mean(losses))


def tune_jobs(config: SweepConfig, plans: Sequence[BatchPlan]) -> list[Job]:
    seeds = range(TUNE_SEED_OFFSET, TUNE_SEED_OFFSET + config.tune_seeds)
    return [
        Job("tune", plan.key, plan.tune_batch, v.label, v.name, plan.lr_centre[v.label] * f,
            v.alpha, v.beta, seed)
        for plan in plans for v in plan.variants.values() for f in config.lr_factors
        for seed in seeds
    ]


def select_learning_rates(
    config: SweepConfig, fit_task: Task, plans: Sequence[BatchPlan], bar: Any,
    pool: ProcessPoolExecutor | None = None,
) -> tuple[dict[str, dict[str, dict[str, Any]]], list[dict[str, Any]]]:
    """The lr of every (batch size, variant), chosen on the validation split.

    ``fit_task`` is :func:`carve_validation`'s: it trains on part of the training split and
    its ``x_test``/``y_test`` are the validation part. Nothing else is passed in, so the test
    split cannot reach the choice. Returns ``{batch: {label: {"lr", "scores", "at_edge"}}}``
    and the tuning runs.
    """
    jobs = tune_jobs(config, plans)
    records = run_jobs(config, jobs, fit_task, bar, pool)
    chosen: dict[str, dict[str, dict[str, Any]]] = {}
    for plan in plans:
        chosen[plan.key] = {}
        for label in plan.variants:
            mine = [r for r in records if r["batch"] == plan.key and r["label"] == label]
            lrs = sorted({r["lr"] for r in mine})
            scores = []
            for lr in lrs:
                acc, loss = _score([r for r in mine if r["lr"] == lr])
                scores.append({"lr": lr, "val_acc": acc, "val_loss": loss})
            # best accuracy; ties: lower loss, then the smaller lr
            best = max(scores, key=lambda s: (s["val_acc"], -s["val_loss"], -s["lr"]))
            # with 3+ lrs, a best lr at either end suggests widening the grid
            at_edge = len(lrs) > 2 and best["lr"] in (lrs[0], lrs[-1])
            chosen[plan.key][label] = {"lr": best["lr"], "scores": scores, "at_edge": at_edge}
    return chosen, records


def final_jobs(config: SweepConfig, plans: Sequence[BatchPlan],
               chosen: dict[str, dict[str, dict[str, Any]]]) -> list[Job]:
    seeds = range(config.first_seed, config.first_seed + config.seeds)
    return [
        Job("final", plan.key, plan.final_batch, v.label, v.name, chosen[plan.key][v.label]["lr"],
            v.alpha, v.beta, seed)
        for plan in plans for v in plan.variants.values() for seed in seeds
    ]


def check_pairing(records: Sequence[dict[str, Any]], plans: Sequence[BatchPlan]) -> None:
    """Both sides of every pair share, seed by seed, the initial weights and the batch order
    (every epoch's; only the first epoch's when one side diverged and stopped early)."""
    by_key = {(r["batch"], r["label"], r["seed"]): r for r in records}
    for plan in plans:
        for base, explored in plan.pairs:
            for (batch, label, seed), rec in by_key.items():
                if batch != plan.key or label != base:
                    continue
                other = by_key.get((batch, explored, seed))
                if other is None:
                    raise RuntimeError(f"batch {batch}: no {explored} run with seed {seed}")
                same_length = rec["order_epochs"] == other["order_epochs"]
                for what in ("init_digest", "order_digest" if same_length else
                             "first_order_digest"):
                    if rec[what] != other[what]:
                        raise RuntimeError(
                            f"batch {batch}, seed {seed}: {base} and {explored} do not share "
                            f"the {what.split('_')[0]} ({rec[what]} vs {other[what]}): the "
                            "pair is not paired"
                        )


# -- statistics and outputs --------------------------------------------------------------------


def _values(records: Sequence[dict[str, Any]], key: str, scale: float = 1.0) -> list[float]:
    ordered = sorted(records, key=lambda r: r["seed"])
    return [scale * r[key] for r in ordered]


def summarize(config: SweepConfig, plans: Sequence[BatchPlan],
              chosen: dict[str, dict[str, dict[str, Any]]],
              records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (batch size, pair): intervals of each side and of the paired difference."""
    rows = []
    c = config.confidence
    for plan in plans:
        for base, explored in plan.pairs:
            side = {label: [r for r in records if r["batch"] == plan.key and r["label"] == label]
                    for label in (base, explored)}
            row: dict[str, Any] = {
                "batch": plan.key,
                "batch_size": plan.final_batch,
                "base": base,
                "explored": explored,
                "alpha": plan.variants[explored].alpha,
                "beta": plan.variants[explored].beta,
                "base_lr": chosen[plan.key][base]["lr"],
                "explored_lr": chosen[plan.key][explored]["lr"],
                "seeds": len(side[base]),
                "base_diverged": sum(r["diverged"] for r in side[base]),
                "explored_diverged": sum(r["diverged"] for r in side[explored]),
            }
            for metric, key, scale in (("acc_pct", "test_acc", 100.0),
                                       ("train_loss", "train_loss", 1.0)):
                b = _values(side[base], key, scale)
                e = _values(side[explored], key, scale)
                for prefix, values in (("base", b), ("explored", e)):
                    _put(row, f"{prefix}_{metric}", t_interval(values, c))
                paired = paired_difference(e, b, c)
                _put(row, f"diff_{metric}", paired.difference)
                row[f"diff_{metric}_t"] = paired.t_statistic
                row[f"diff_{metric}_p"] = paired.p_value
                row[f"diff_{metric}_wilcoxon_p"] = paired.wilcoxon_p
            rows.append(row)
    return rows


def _put(row: dict[str, Any], prefix: str, interval: Interval) -> None:
    row[f"{prefix}_mean"] = interval.mean
    row[f"{prefix}_low"] = interval.low
    row[f"{prefix}_high"] = interval.high
    row[f"{prefix}_half"] = interval.half_width


def _pm(mean: float, half: float, digits: int) -> str:
    if math.isnan(half):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def _pm_g(mean: float, half: float) -> str:
    """Training losses span 1e-5 (memorised) to 2: three significant digits, not decimals."""
    if math.isnan(half):
        return f"{mean:.3g}"
    return f"{mean:.3g} ± {half:.2g}"


def _p(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:.3f}" if value >= 1e-3 else f"{value:.0e}"


def format_table(rows: Sequence[dict[str, Any]], confidence: float) -> str:
    """The printed table: one line per batch size and pair."""
    pct = f"{100 * confidence:g} %"
    header = ("batch", "base → E", "α / β", "lr base / E", "base acc %", "E acc %",
              f"Δacc pts ({pct})", "p (t)", "p (W)", "base loss", "E loss", "Δloss")
    lines = [header]
    for r in rows:
        ab = f"{r['alpha']:g} / {r['beta']:g}"
        lrs = f"{r['base_lr']:.3g} / {r['explored_lr']:.3g}"
        div = ""
        if r["base_diverged"] or r["explored_diverged"]:
            div = f" ({r['base_diverged']}/{r['explored_diverged']} diverged)"
        lines.append((
            r["batch"], f"{r['base']} → {r['explored']}", ab, lrs,
            _pm(r["base_acc_pct_mean"], r["base_acc_pct_half"], 2),
            _pm(r["explored_acc_pct_mean"], r["explored_acc_pct_half"], 2),
            _pm(r["diff_acc_pct_mean"], r["diff_acc_pct_half"], 2),
            _p(r["diff_acc_pct_p"]), _p(r["diff_acc_pct_wilcoxon_p"]),
            _pm_g(r["base_train_loss_mean"], r["base_train_loss_half"]),
            _pm_g(r["explored_train_loss_mean"], r["explored_train_loss_half"]),
            _pm_g(r["diff_train_loss_mean"], r["diff_train_loss_half"]) + div,
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def describe(config: SweepConfig, n_train: int, n_fit: int, n_test: int) -> str:
    factors = ", ".join(f"{f:.3g}" for f in config.lr_factors)
    return (
        f"{config.task} ({config.model}), {n_train} train / {n_test} test; lr chosen on a "
        f"{n_train - n_fit}-sample validation split (training on {n_fit}) from "
        f"{{{factors}}} × the default lr ({config.lr_scaling} scaling), {config.tune_seeds} "
        f"tuning seed(s); {config.epochs} epochs, {config.warmup_epochs:g} warm-up, "
        f"{config.schedule}; {config.seeds} paired seeds; {100 * config.confidence:g} % "
        "t-intervals"
    )


def run_sweep(
    config: SweepConfig,
    out: Path,
    *,
    task: Task | None = None,
    quiet: bool = False,
    stream: TextIO | None = None,
) -> dict[str, Any]:
    """The whole sweep: select lrs, final runs, statistics; print the table and write
    ``table.csv``, ``runs.csv``, ``sweep.json`` and ``sweep.png`` under ``out``.

    ``task`` replaces ``load_task(config.task, seed=config.data_seed)`` (tests).
    """
    from tqdm import tqdm

    stream = stream if stream is not None else sys.stdout
    config.validate()
    if task is None:
        task = load_task(config.task, seed=config.data_seed)
    fit_task = carve_validation(task, config.val_fraction, config.data_seed)
    n_train, n_fit = int(task.x_train.shape[0]), int(fit_task.x_train.shape[0])
    n_test = int(task.y_test.shape[0])
    plans = plan_sweep(config, n_train, n_fit)
    if config.workers > 1:
        _check_picklable(task)
    out.mkdir(parents=True, exist_ok=True)
    text = describe(config, n_train, n_fit, n_test)
    print(f"explore sweep: {text}", file=stream)

    # progress in optimizer steps: the cost of a run, whatever its batch size
    steps = config.epochs * (
        sum(steps_per_epoch(job, fit_task) for job in tune_jobs(config, plans))
        + sum(steps_per_epoch(Job("final", p.key, p.final_batch, "", "", 1.0, None, None, 0),
                              task) * len(p.variants) * config.seeds for p in plans)
    )
    started = time.perf_counter()
    pool = open_pool(config)
    try:
        with tqdm(total=steps, disable=quiet, file=sys.stderr, unit="step",
                  dynamic_ncols=True) as bar:
            chosen, tune_records = select_learning_rates(config, fit_task, plans, bar, pool)
            final_records = run_jobs(config, final_jobs(config, plans, chosen), task, bar, pool)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    total = time.perf_counter() - started

    write_csv(out / "runs.csv", tune_records + final_records)
    check_pairing(final_records, plans)  # after runs.csv, so a failure leaves the evidence
    rows = summarize(config, plans, chosen, final_records)
    print(format_table(rows, config.confidence), file=stream)
    edges = [f"{b} {label}" for b, by in chosen.items() for label, c in by.items()
             if c["at_edge"]]
    if edges:
        print(f"note: the chosen lr is at the edge of the grid for {', '.join(edges)}",
              file=stream)

    write_csv(out / "table.csv", rows)
    payload = {
        "command": "sweep",
        "config": dataclasses.asdict(config),
        "description": text,
        "n_train": n_train,
        "n_fit": n_fit,
        "n_val": n_train - n_fit,
        "n_test": n_test,
        "total_wall_time": total,
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": config.threads,
            "workers": config.workers,
            "device": config.device,
        },
        "lr_selection": chosen,
        "table": rows,
        "runs": tune_records + final_records,
    }
    write_json(out / "sweep.json", payload)
    plot_sweep(rows, out / "sweep.png", f"explore sweep — {text}")
    print(f"wrote {out / 'table.csv'}, {out / 'runs.csv'}, {out / 'sweep.json'}, "
          f"{out / 'sweep.png'} ({total:.0f} s)", file=stream)
    return payload


def plot_sweep(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Left: test accuracy (mean, error bar = t-interval) of every optimizer against batch
    size; right: the paired gap E − base with its interval. Dashed: base, solid: E."""
    from lab import plots  # sets the Agg backend

    plt = plots.plt
    batches = list(dict.fromkeys(r["batch"] for r in rows))
    x = np.arange(len(batches))
    fig, (ax_acc, ax_gap) = plt.subplots(1, 2, figsize=(11, 4.2))
    pairs = list(dict.fromkeys((r["base"], r["explored"]) for r in rows))
    colors = plots._colors(len(pairs))
    drawn: set[str] = set()
    for (base, explored), color in zip(pairs, colors):
        mine = {r["batch"]: r for r in rows if r["base"] == base and r["explored"] == explored}
        at = [i for i, b in enumerate(batches) if b in mine]
        for side, style in (("base", "--"), ("explored", "-")):
            label = base if side == "base" else explored
            if label in drawn:
                continue
            drawn.add(label)
            mean = [mine[batches[i]][f"{side}_acc_pct_mean"] for i in at]
            half = [mine[batches[i]][f"{side}_acc_pct_half"] for i in at]
            ax_acc.errorbar(x[at], mean, yerr=np.nan_to_num(half), fmt="o" + style, color=color,
                            capsize=3, lw=1.4, label=label)
        shift = 0.06 * (pairs.index((base, explored)) - (len(pairs) - 1) / 2)
        gap = [mine[batches[i]]["diff_acc_pct_mean"] for i in at]
        half = [mine[batches[i]]["diff_acc_pct_half"] for i in at]
        ax_gap.errorbar(x[at] + shift, gap, yerr=np.nan_to_num(half), fmt="o-", color=color,
                        capsize=3, lw=1.4, label=f"{explored} − {base}")
    ax_gap.axhline(0.0, color="k", lw=0.8)
    for ax in (ax_acc, ax_gap):
        ax.set_xticks(x, [f"{b}\n({rows[[r['batch'] for r in rows].index(b)]['batch_size']})"
                          if b == "full" else b for b in batches])
        ax.set_xlabel("batch size")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    ax_acc.set_ylabel("test accuracy (%)")
    ax_gap.set_ylabel("paired gap E − base (accuracy points)")
    fig.suptitle(title, fontsize=8, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=plots.DPI)
    plt.close(fig)
    return path
