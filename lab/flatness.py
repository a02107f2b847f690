"""``explore flatness``: the curvature E's runs reach, compared at *equal training loss*.

For each α (default −5, 0, 0.5; α = 0 is the base optimizer exactly) and seed, train
``E(optimizer)`` with that α and a β (default: the paper's pairing), and after every epoch
evaluate the full-batch training loss ``L(θ_t)``. A sharper or flatter point at the end of
training says little when the runs end at different losses (a lower loss usually sits in a
sharper region), so the curvature is compared where the runs are *equally trained*: for a few
loss thresholds ``τ``, the checkpoint of each run is the **first** epoch ``t`` with
``L(θ_t) ≤ τ``; there the command measures, over the whole training set,

- ``λ_max``, the largest eigenvalue of the Hessian ``H = ∇²L(θ)``: implicitly restarted
  Lanczos (``scipy.sparse.linalg.eigsh``, ``which="LA"``) on a ``LinearOperator`` whose
  product ``v ↦ H v`` is reverse-over-reverse differentiation (``torch.func.vjp`` of
  ``torch.func.grad``), in the model's dtype (float32: products good to ~1e-6 relative, far
  below the solver's tolerance 1e-4 and the trace's sampling error);
- ``tr H``: Hutchinson's estimate ``(1/m) Σ_{i=1..m} z_iᵀ H z_i`` with ``m`` Rademacher
  probes (unbiased; its standard error is reported), or the exact ``Σ_i e_iᵀ H e_i`` when the
  model has at most ``m`` parameters.

By default the thresholds are ``k`` values spaced evenly in log between the initial loss and
the lowest loss that *every* run reached (so each run has a checkpoint at each threshold);
``--loss-thresholds`` sets them. The paper (Remark 2.1, Fig. 3) predicts that α < 0 explores
and finds flatter regions, α > 0 exploits and finds sharper ones. The end-of-training ``λ_max``
is reported too, as before, marked as confounded by the different final losses.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from adaptor.presets import LARGE_BATCH_PRESET, SMALL_BATCH_PRESET
from lab import plots, registry
from lab.compare import _mean_std, describe
from lab.outputs import write_csv, write_json
from lab.tasks import Task, load_task
from lab.train import TrainConfig, evaluate, train

DEFAULT_ALPHAS = (-5.0, 0.0, 0.5)
DEFAULT_THRESHOLDS = 4
DEFAULT_TRACE_PROBES = 32
DEFAULT_EIG_TOL = 1e-4


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


def base_name(optimizer: str) -> str:
    """What α = 0 is: ``adamw`` for ``e-adamw``, ``lamb`` for ``alto``."""
    spec, _ = registry.resolve(optimizer)
    return "lamb" if spec.takes_alpha else spec.name


# -- Hessian of a loss, from Hessian-vector products --------------------------------------------


class HessianOperator:
    """``v ↦ H v`` for ``H = ∇²loss_of(θ)`` at ``params``, as a scipy ``LinearOperator``.

    ``loss_of(params)`` maps a dict of tensors (the point ``θ``) to a scalar. The product is
    the vector-Jacobian product of ``grad(loss_of)`` at ``θ`` with ``v``
    (``torch.func.vjp``; ``vᵀH = (Hv)ᵀ`` as ``H`` is symmetric): the gradient's graph is built
    once and every product is one backward pass through it (reverse over reverse; 1.6–2.7×
    faster than ``jvp`` of ``grad`` on the lab's models, at the memory of one kept graph per
    piece). Products are computed in the parameters' dtype. ``terms`` lets a loss be a weighted sum
    ``Σ_c w_c loss_c`` evaluated piece by piece (large data sets in chunks): then
    ``H v = Σ_c w_c H_c v``. Vectors are flat numpy float64 arrays in the order of ``params``.
    """

    def __init__(
        self,
        loss_of: Callable[[dict[str, Tensor]], Tensor] | None,
        params: Mapping[str, Tensor],
        *,
        terms: Sequence[tuple[float, Callable[[dict[str, Tensor]], Tensor]]] | None = None,
    ) -> None:
        from torch.func import grad, vjp

        if (loss_of is None) == (terms is None):
            raise ValueError("give loss_of or terms (weighted pieces), not both")
        self.params = {name: p.detach() for name, p in params.items()}
        if not self.params:
            raise ValueError("params is empty")
        self.names = list(self.params)
        self.shapes = [self.params[n].shape for n in self.names]
        self.sizes = [self.params[n].numel() for n in self.names]
        self.numel = sum(self.sizes)
        first = next(iter(self.params.values()))
        self.dtype, self.device = first.dtype, first.device
        pieces = [(1.0, loss_of)] if terms is None else list(terms)
        # One vjp closure per piece: grad(f) evaluated once, its graph kept for the products.
        self._pullbacks = [(float(w), vjp(grad(f), self.params)[1]) for w, f in pieces]
        self.products = 0

    def unflatten(self, v: Tensor) -> dict[str, Tensor]:
        out, offset = {}, 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes):
            out[name] = v[offset : offset + size].view(shape)
            offset += size
        return out

    def hvp(self, v: Tensor) -> Tensor:
        """``H v`` for a flat tensor ``v`` (any dtype; computed in the parameters' dtype)."""
        tangent = self.unflatten(v.to(self.dtype, copy=False).to(self.device))
        total = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        for weight, pullback in self._pullbacks:
            (product,) = pullback(tangent)
            total += weight * torch.cat([product[n].reshape(-1) for n in self.names])
        self.products += 1
        return total

    def matvec(self, v: np.ndarray) -> np.ndarray:
        flat = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64).reshape(-1))
        return self.hvp(flat).to(torch.float64).cpu().numpy()

    def linear_operator(self) -> Any:
        from scipy.sparse.linalg import LinearOperator

        return LinearOperator((self.numel, self.numel), matvec=self.matvec, dtype=np.float64)


def top_eigenvalue(
    operator: HessianOperator, *, tol: float = DEFAULT_EIG_TOL, maxiter: int = 50, seed: int = 0
) -> tuple[float, bool]:
    """``(λ_max, converged)``: the largest algebraic eigenvalue by ``eigsh(which="LA")``.

    ``tol`` is ARPACK's relative accuracy of the Ritz value; ``maxiter`` bounds its restarts
    (each of at most ``ncv = min(n, 20)`` products). The start vector is drawn from ``seed``.
    Without convergence, the best Ritz value so far is returned with ``converged=False``.
    """
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh

    n = operator.numel
    if n == 1:
        return float(operator.matvec(np.ones(1))[0]), True
    v0 = np.random.default_rng(seed).standard_normal(n)
    ncv = min(n, 20)
    if n <= 2 or ncv <= 1:
        dense = np.stack([operator.matvec(e) for e in np.eye(n)], axis=1)
        return float(np.linalg.eigvalsh(0.5 * (dense + dense.T))[-1]), True
    try:
        values = eigsh(operator.linear_operator(), k=1, which="LA", v0=v0, tol=tol,
                       maxiter=maxiter, ncv=ncv, return_eigenvectors=False)
        return float(values[-1]), True
    except ArpackNoConvergence as error:
        values = error.eigenvalues
        if len(values) == 0:
            return math.nan, False
        return float(np.max(values)), False


@dataclasses.dataclass(frozen=True)
class TraceEstimate:
    value: float
    stderr: float  # 0 for the exact trace
    probes: int  # products used
    exact: bool


def hessian_trace(
    operator: HessianOperator, probes: int = DEFAULT_TRACE_PROBES, *, seed: int = 0,
    exact: bool | None = None,
) -> TraceEstimate:
    """``tr H``: exact (``Σ_i e_iᵀ H e_i``, ``n`` products) when ``exact`` or, by default, when
    ``n ≤ probes``; otherwise Hutchinson's ``(1/m) Σ_{i=1..m} z_iᵀ H z_i`` with ``m = probes``
    Rademacher vectors (``E[z zᵀ] = I``: unbiased; ``Var(zᵀHz) = 2 Σ_{i≠j} H_ij²``), with the
    standard error ``s/√m`` of the mean (``s``: sample standard deviation of the ``zᵀHz``)."""
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be an integer >= 1, got {probes!r}")
    n = operator.numel
    if exact if exact is not None else n <= probes:
        total = math.fsum(float(operator.matvec(e)[i]) for i, e in enumerate(np.eye(n)))
        return TraceEstimate(total, 0.0, n, True)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(probes):
        z = rng.integers(0, 2, size=n).astype(np.float64) * 2.0 - 1.0
        values.append(float(z @ operator.matvec(z)))
    mean = math.fsum(values) / probes
    if probes == 1:
        return TraceEstimate(mean, math.inf, 1, False)
    variance = math.fsum((v - mean) ** 2 for v in values) / (probes - 1)
    return TraceEstimate(mean, math.sqrt(variance / probes), probes, False)


def model_hessian(
    model: nn.Module, x: Tensor, y: Tensor, *, dtype: torch.dtype | None = None,
    chunk: int = 8192,
) -> HessianOperator:
    """The Hessian of the mean cross-entropy of ``model`` over ``(x, y)``, in ``dtype``
    (default: the parameters' own).

    A copy of the model in ``dtype`` and eval mode is used (the model is left alone); the data
    are taken in chunks of ``chunk`` samples, weighted by their share of the mean.
    """
    from torch.func import functional_call

    clone = copy.deepcopy(model).eval()
    if dtype is not None:
        clone = clone.to(dtype)
    dtype = next(clone.parameters()).dtype
    params = {n: p.detach() for n, p in clone.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in clone.named_buffers()}
    n_samples = int(x.shape[0])
    terms = []
    for start in range(0, n_samples, chunk):
        xs = x[start : start + chunk].to(dtype)
        ys = y[start : start + chunk]

        def piece(p: dict[str, Tensor], xs: Tensor = xs, ys: Tensor = ys) -> Tensor:
            return F.cross_entropy(functional_call(clone, {**p, **buffers}, (xs,)), ys)

        terms.append((xs.shape[0] / n_samples, piece))
    return HessianOperator(None, params, terms=terms)


# -- equal-loss checkpoints ---------------------------------------------------------------------


def first_crossings(losses: Sequence[float], thresholds: Sequence[float]) -> list[int | None]:
    """For each threshold ``τ``, the first index ``t`` with ``losses[t] ≤ τ`` (``None`` if
    never). NaN never crosses."""
    out: list[int | None] = []
    for tau in thresholds:
        out.append(next((t for t, loss in enumerate(losses) if loss <= tau), None))
    return out


def auto_thresholds(trajectories: Sequence[Sequence[float]], count: int) -> list[float]:
    """``count`` thresholds, log-evenly spaced from the lowest initial loss (excluded) down to
    the lowest loss every run reached, ``max_runs min_t L_t`` (included); empty when some run
    never went below the lowest initial loss."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    starts = [trajectory[0] for trajectory in trajectories]
    lows = [np.nanmin(np.asarray(trajectory, dtype=float)) for trajectory in trajectories]
    high, low = float(np.nanmin(starts)), float(np.max(lows))
    if not (math.isfinite(high) and math.isfinite(low) and 0 < low < high):
        return []
    return [float(v) for v in np.geomspace(high, low, count + 1)[1:]]


class CheckpointRecorder:
    """``epoch_hook`` for :func:`lab.train.train`: the full-batch training loss after every
    epoch, and a copy of the parameters where a checkpoint may fall.

    With ``thresholds`` it keeps the parameters at the first crossing of each; without, at
    every new lowest loss (any later threshold's first crossing is one of them).
    """

    def __init__(self, task: Task, thresholds: Sequence[float] | None = None) -> None:
        self.task = task
        self.thresholds = None if thresholds is None else list(thresholds)
        self.losses: list[float] = []
        self.snapshots: dict[int, dict[str, Tensor]] = {}

    def __call__(self, epoch: int, model: nn.Module) -> None:
        loss, _ = evaluate(model, self.task.x_train, self.task.y_train)
        value = float(loss)  # analysis outside the step: one host read per epoch
        if epoch != len(self.losses):
            raise RuntimeError(f"epoch {epoch} recorded out of order")
        previous_low = min((v for v in self.losses if not math.isnan(v)), default=math.inf)
        self.losses.append(value)
        if self.thresholds is None:
            keep = value < previous_low
        else:
            keep = any(value <= tau < previous_low for tau in self.thresholds)
        if keep:  # the state dict: parameters and buffers (e.g. batch-norm statistics)
            self.snapshots[epoch] = {key: value.detach().cpu().clone()
                                     for key, value in model.state_dict().items()}

    def checkpoint(self, epoch: int) -> dict[str, Tensor]:
        return self.snapshots[epoch]


# -- the command --------------------------------------------------------------------------------


def _label(name: str, base: str, alpha: float, beta: float) -> str:
    return f"{base} (α=0)" if alpha == 0 else f"{name} α={alpha:g} β={beta:g}"


def _measure(model: nn.Module, task: Task, *, iters: int, tol: float, probes: int,
             seed: int) -> dict[str, Any]:
    operator = model_hessian(model, task.x_train, task.y_train)
    top, converged = top_eigenvalue(operator, tol=tol, maxiter=iters, seed=seed)
    eig_products = operator.products
    trace = hessian_trace(operator, probes, seed=seed)
    _, test_acc = evaluate(model, task.x_test, task.y_test)
    return {"top_eig": top, "eig_converged": converged, "eig_products": eig_products,
            "trace": trace.value, "trace_stderr": trace.stderr, "trace_exact": trace.exact,
            "test_acc_there": float(test_acc)}


def run_flatness(
    config: TrainConfig,
    optimizer: str,
    alphas: Sequence[float],
    beta: float | None,
    seeds: Sequence[int],
    out: Path,
    *,
    hessian_iters: int = 50,
    loss_thresholds: Sequence[float] | None = None,
    thresholds: int = DEFAULT_THRESHOLDS,
    trace_probes: int = DEFAULT_TRACE_PROBES,
    eig_tol: float = DEFAULT_EIG_TOL,
    quiet: bool = False,
    stream: TextIO | None = None,
) -> dict[str, Any]:
    """Train every α × seed, keep equal-loss checkpoints, measure λ_max and tr H there and at
    the end; print the tables; write CSV, JSON and plots under ``out``."""
    from tqdm import tqdm

    stream = stream if stream is not None else sys.stdout
    name = explored_name(optimizer)
    base = base_name(optimizer)
    if not alphas:
        raise ValueError("give at least one α")
    if len(set(alphas)) != len(alphas):
        raise ValueError(f"α values must be distinct, got {list(alphas)}")
    if loss_thresholds is not None:
        loss_thresholds = sorted({float(t) for t in loss_thresholds}, reverse=True)
        if not loss_thresholds or not all(math.isfinite(t) and t > 0 for t in loss_thresholds):
            raise ValueError(f"loss thresholds must be > 0, got {list(loss_thresholds)}")
    if isinstance(thresholds, bool) or not isinstance(thresholds, int) or thresholds < 1:
        raise ValueError(f"thresholds must be an integer >= 1, got {thresholds!r}")
    if isinstance(trace_probes, bool) or not isinstance(trace_probes, int) or trace_probes < 1:
        raise ValueError(f"trace probes must be an integer >= 1, got {trace_probes!r}")
    if not (math.isfinite(eig_tol) and eig_tol >= 0):
        raise ValueError(f"eigenvalue tolerance must be >= 0, got {eig_tol}")
    betas = {a: paired_beta(a) if beta is None else float(beta) for a in alphas}
    for alpha in alphas:
        registry.alpha_beta(config.batch_size, alpha, betas[alpha])
    configs = {a: dataclasses.replace(config, alpha=float(a), beta=betas[a]) for a in alphas}
    for c in configs.values():
        c.validate()
    tasks = {seed: load_task(config.task, seed) for seed in seeds}
    out.mkdir(parents=True, exist_ok=True)
    n_train = int(tasks[seeds[0]].x_train.shape[0])
    shared = "β paired with α as in the paper" if beta is None else f"β = {beta:g}"
    print(f"explore flatness: {name} against {base} (α = 0), {shared}; "
          f"{describe(config, n_train, len(seeds))}", file=stream)

    records: list[dict[str, Any]] = []
    recorders: dict[tuple[float, int], CheckpointRecorder] = {}
    measurements: dict[tuple[float, int, int], dict[str, Any]] = {}  # (α, seed, epoch)
    started = time.perf_counter()
    bar = tqdm(total=len(alphas) * len(seeds) * config.epochs, disable=quiet, file=sys.stderr,
               unit="epoch", dynamic_ncols=True)
    with bar:
        for alpha, run_config in configs.items():
            for seed in seeds:
                bar.set_description(f"α={alpha:g} seed {seed}")
                measured: dict[str, Any] = {}
                recorder = CheckpointRecorder(tasks[seed], loss_thresholds)
                recorders[(alpha, seed)] = recorder

                def hook(model: nn.Module, task: Task, seed: int = seed, alpha: float = alpha,
                         measured: dict[str, Any] = measured) -> None:
                    bar.set_description(f"α={alpha:g} seed {seed}: Hessian")
                    measured.update(_measure(model, task, iters=hessian_iters, tol=eig_tol,
                                             probes=trace_probes, seed=seed))

                def on_epoch(epoch: int, loss: float) -> None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

                result = train(name, run_config, seed, task=tasks[seed], on_epoch=on_epoch,
                               model_hook=hook, epoch_hook=recorder)
                bar.update(config.epochs - len(result.curves["epoch"]))
                # The model at the end is the one after the last recorded epoch.
                measurements[(alpha, seed, len(recorder.losses) - 1)] = dict(measured)
                records.append({**result.row(), "alpha": float(alpha), "beta": betas[alpha],
                                 "top_eig": measured["top_eig"], "trace": measured["trace"],
                                 "trace_stderr": measured["trace_stderr"]})

        # Equal-loss checkpoints.
        chosen = (loss_thresholds if loss_thresholds is not None else
                  auto_thresholds([r.losses for r in recorders.values()], thresholds))
        checkpoints: list[dict[str, Any]] = []
        for (alpha, seed), recorder in recorders.items():
            task = tasks[seed]
            for tau, epoch in zip(chosen, first_crossings(recorder.losses, chosen)):
                row: dict[str, Any] = {"threshold": tau, "alpha": float(alpha),
                                       "beta": betas[alpha], "seed": seed, "epoch": epoch}
                if epoch is None:
                    checkpoints.append({**row, "reached": False})
                    continue
                if (alpha, seed, epoch) not in measurements:  # thresholds may share one
                    bar.set_description(f"α={alpha:g} seed {seed}: Hessian at loss ≤ {tau:.3g}")
                    with torch.random.fork_rng(devices=[]):
                        model = task.make_model(config.model)
                    model.load_state_dict(recorder.checkpoint(epoch))
                    measurements[(alpha, seed, epoch)] = _measure(
                        model, task, iters=hessian_iters, tol=eig_tol, probes=trace_probes,
                        seed=seed)
                steps_per_epoch = max(1, n_train // min(config.batch_size, n_train))
                checkpoints.append({**row, "reached": True, "step": epoch * steps_per_epoch,
                                    "loss": recorder.losses[epoch],
                                    **measurements[(alpha, seed, epoch)]})
    total = time.perf_counter() - started

    rows = []
    for alpha in alphas:
        mine = [r for r in records if r["alpha"] == float(alpha)]
        row = {"alpha": float(alpha), "beta": betas[alpha], "seeds": len(mine),
               "label": _label(name, base, alpha, betas[alpha])}
        for key in ("top_eig", "trace", "test_acc", "train_loss"):
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([r[key] for r in mine])
        rows.append(row)
    equal = summarize_checkpoints(checkpoints, chosen, alphas, betas, name, base)
    probes_text = describe_trace(trace_probes, tasks[seeds[0]], config.model)
    print(f"\nat equal training loss: the first epoch whose full-batch training loss is at or "
          f"below each threshold ({'given' if loss_thresholds is not None else 'automatic'}); "
          f"λ_max by Lanczos (eigsh), tr H {probes_text}; mean ± std over seeds",
          file=stream)
    print(format_equal_loss_table(equal), file=stream)
    print("\nat the end of training (different final losses: confounded)", file=stream)
    print(format_table(rows), file=stream)

    write_csv(out / "results.csv", records)
    if checkpoints:
        write_csv(out / "checkpoints.csv", [_csv_row(c) for c in checkpoints])
    payload = {
        "command": "flatness",
        "optimizer": name,
        "base": base,
        "config": dataclasses.asdict(config),
        "alphas": [float(a) for a in alphas],
        "beta": beta,
        "betas": [betas[a] for a in alphas],
        "seeds": list(seeds),
        "hessian_iters": hessian_iters,
        "eig_tol": eig_tol,
        "trace_probes": trace_probes,
        "thresholds": chosen,
        "thresholds_given": loss_thresholds is not None,
        "total_wall_time": total,
        "equal_loss": equal,
        "checkpoints": checkpoints,
        "trajectories": [{"alpha": float(a), "seed": s, "train_loss_full_batch": r.losses}
                         for (a, s), r in recorders.items()],
        "summary": rows,
        "runs": records,
    }
    write_json(out / "summary.json", payload)
    batch = min(config.batch_size, n_train)
    plots.flatness_bars(rows, out / "flatness.png",
                        f"explore flatness at the end of training — {name}, {shared}, "
                        f"{config.task}, batch {batch}")
    plot_equal_loss(equal, [r.losses for r in recorders.values()],
                    [_label(name, base, a, betas[a]) for a, _ in recorders],
                    out / "equal_loss.png",
                    f"explore flatness at equal training loss — {name} vs {base}, {shared}, "
                    f"{config.task} ({config.model}), batch {batch}, {len(seeds)} seed"
                    f"{'s' if len(seeds) > 1 else ''}")
    print(f"wrote {out / 'results.csv'}, {out / 'checkpoints.csv'}, {out / 'summary.json'}, "
          f"{out / 'equal_loss.png'}, {out / 'flatness.png'} ({total:.0f} s)", file=stream)
    return payload


def describe_trace(probes: int, task: Task, model: str) -> str:
    with torch.random.fork_rng(devices=[]):
        n = sum(p.numel() for p in task.make_model(model).parameters() if p.requires_grad)
    if n <= probes:
        return f"exact ({n} parameters)"
    return f"by Hutchinson with {probes} Rademacher probes ({n} parameters)"


def _csv_row(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("threshold", "alpha", "beta", "seed", "reached", "epoch", "step", "loss", "top_eig",
            "eig_converged", "eig_products", "trace", "trace_stderr", "trace_exact",
            "test_acc_there")
    return {key: checkpoint.get(key, "") for key in keys}


def summarize_checkpoints(
    checkpoints: Sequence[Mapping[str, Any]], thresholds: Sequence[float],
    alphas: Sequence[float], betas: Mapping[float, float], name: str, base: str,
) -> list[dict[str, Any]]:
    """One row per (threshold, α): how many seeds reached it, and mean ± std over those."""
    rows = []
    for tau in thresholds:
        for alpha in alphas:
            mine = [c for c in checkpoints if c["threshold"] == tau and c["alpha"] == alpha]
            reached = [c for c in mine if c["reached"]]
            row: dict[str, Any] = {"threshold": tau, "alpha": float(alpha),
                                   "beta": betas[alpha], "label": _label(name, base, alpha,
                                                                         betas[alpha]),
                                   "seeds": len(mine), "reached": len(reached)}
            for key in ("epoch", "step", "loss", "top_eig", "trace", "test_acc_there"):
                row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([c[key] for c in reached])
            rows.append(row)
    return rows


def format_equal_loss_table(rows: Sequence[Mapping[str, Any]]) -> str:
    header = ("loss ≤", "optimizer", "epoch (step)", "loss there", "λ_max", "tr H",
              "test acc there (%)")
    table = [header]
    previous = None
    for r in rows:
        first = f"{r['threshold']:.4g}" if r["threshold"] != previous else ""
        previous = r["threshold"]
        if not r["reached"]:
            table.append((first, r["label"], "not reached", "", "", "", ""))
            continue
        some = "" if r["reached"] == r["seeds"] else f" ({r['reached']}/{r['seeds']} seeds)"
        table.append((
            first,
            r["label"],
            f"{r['epoch_mean']:.1f} ± {r['epoch_std']:.1f} ({r['step_mean']:.0f}){some}",
            f"{r['loss_mean']:.4f}",
            f"{r['top_eig_mean']:.3f} ± {r['top_eig_std']:.3f}",
            f"{r['trace_mean']:.2f} ± {r['trace_std']:.2f}",
            f"{100 * r['test_acc_there_mean']:.2f} ± {100 * r['test_acc_there_std']:.2f}",
        ))
    return _columns(table)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    header = ("α", "β", "top Hessian eigenvalue", "tr H", "test acc (%)", "train loss")
    table = [header]
    for r in rows:
        table.append((
            f"{r['alpha']:g}",
            f"{r['beta']:g}",
            f"{r['top_eig_mean']:.3f} ± {r['top_eig_std']:.3f}",
            f"{r['trace_mean']:.2f} ± {r['trace_std']:.2f}",
            f"{100 * r['test_acc_mean']:.2f} ± {100 * r['test_acc_std']:.2f}",
            f"{r['train_loss_mean']:.4f} ± {r['train_loss_std']:.4f}",
        ))
    return _columns(table)


def _columns(table: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_equal_loss(
    rows: Sequence[Mapping[str, Any]], trajectories: Sequence[Sequence[float]],
    labels: Sequence[str], path: Path, title: str,
) -> Path:
    """Left: the full-batch training loss of every run with the thresholds; middle and right:
    λ_max and tr H at each threshold (mean ± std over seeds), training progressing rightwards."""
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax_loss, ax_eig, ax_tr) = plt.subplots(1, 3, figsize=(13, 4))
    names = list(dict.fromkeys(labels))
    colors = dict(zip(names, plots._colors(len(names))))
    for losses, label in zip(trajectories, labels):
        ax_loss.plot(np.arange(len(losses)), losses, color=colors[label], lw=1.2, alpha=0.8,
                     label=label if label not in ax_loss.get_legend_handles_labels()[1] else None)
    for tau in dict.fromkeys(r["threshold"] for r in rows):
        ax_loss.axhline(tau, color="grey", lw=0.7, ls=":")
    ax_loss.set_yscale("log")
    ax_loss.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax_loss.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
    ax_loss.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax_loss.tick_params(axis="y", which="both", labelsize=7)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("full-batch training loss")
    ax_loss.legend(fontsize=7)
    for ax, key, what in ((ax_eig, "top_eig", "λ_max of the Hessian"),
                          (ax_tr, "trace", "tr H")):
        for label in names:
            mine = [r for r in rows if r["label"] == label and r["reached"]]
            if not mine:
                continue
            ax.errorbar([r["threshold"] for r in mine], [r[f"{key}_mean"] for r in mine],
                        yerr=[r[f"{key}_std"] for r in mine], marker="o", capsize=3,
                        color=colors[label], label=label)
        ax.set_xscale("log")
        taus = sorted({r["threshold"] for r in rows if r["reached"]})
        if taus:
            ax.minorticks_off()
            ax.set_xticks(taus, [f"{t:.3g}" for t in taus], fontsize=7)
            ax.invert_xaxis()
        ax.set_xlabel("training-loss threshold (first crossing)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=plots.DPI)
    plt.close(fig)
    return path
