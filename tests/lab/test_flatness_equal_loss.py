"""``explore flatness`` at equal training loss: λ_max and tr H from Hessian-vector products
against float64 references typed here, the choice of equal-loss checkpoints, end to end."""

from __future__ import annotations

import copy
import csv
import json
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lab.flatness as flatness
from lab.cli import main
from lab.flatness import (
    CheckpointRecorder,
    HessianOperator,
    auto_thresholds,
    first_crossings,
    hessian_trace,
    model_hessian,
    top_eigenvalue,
)
from lab.tasks import load_task
from lab.train import TrainConfig, train

# f(w, M) = ½ θᵀAθ + bᵀθ over θ = (w, vec M), w ∈ R², M ∈ R^{2×2} (row-major), with
# A = blockdiag([[2, 1], [1, 2]], [[5, 2], [2, 1]], [[-7, 0], [0, 0.5]]):
# eigenvalues 3, 1, 3 ± 2√2, −7, 0.5, so λ_max = 3 + 2√2 (the largest algebraic one; −7 has
# the largest magnitude), tr A = 4 + 6 − 6.5 = 3.5.
A = torch.tensor([
    [2.0, 1.0, 0.0, 0.0, 0.0, 0.0],
    [1.0, 2.0, 0.0, 0.0, 0.0, 0.0],
    [0.0, 0.0, 5.0, 2.0, 0.0, 0.0],
    [0.0, 0.0, 2.0, 1.0, 0.0, 0.0],
    [0.0, 0.0, 0.0, 0.0, -7.0, 0.0],
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.5],
], dtype=torch.float64)
B = torch.tensor([0.3, -1.0, 2.0, 0.0, 0.5, -0.25], dtype=torch.float64)
LAMBDA_MAX = 3 + 2 * math.sqrt(2)
TRACE = 3.5
# Var(zᵀAz) for Rademacher z: 2 Σ_{i≠j} A_ij² = 2·(1 + 1 + 4 + 4) = 20.
HUTCHINSON_STD = math.sqrt(20.0)


def _quadratic(matrix: torch.Tensor = A, b: torch.Tensor = B) -> HessianOperator:
    def loss_of(params):
        theta = torch.cat([params["w"], params["M"].reshape(-1)])
        return 0.5 * theta @ (matrix @ theta) + b @ theta

    point = {"w": torch.tensor([0.7, -0.2], dtype=torch.float64),
             "M": torch.tensor([[1.0, 2.0], [-3.0, 0.1]], dtype=torch.float64)}
    return HessianOperator(loss_of, point)


def test_quadratic_products_and_top_eigenvalue():
    operator = _quadratic()
    assert operator.numel == 6
    for i in range(6):  # H e_i is column i of A
        unit = torch.zeros(6, dtype=torch.float64)
        unit[i] = 1
        torch.testing.assert_close(operator.hvp(unit), A[:, i], rtol=0, atol=1e-14)
    value, converged = top_eigenvalue(operator, tol=1e-12, seed=1)
    assert converged
    assert value == pytest.approx(LAMBDA_MAX, rel=1e-10)


def test_quadratic_trace_exact_and_hutchinson():
    exact = hessian_trace(_quadratic(), probes=6)  # n <= probes: exact
    assert exact.exact and exact.stderr == 0 and exact.probes == 6
    assert exact.value == pytest.approx(TRACE, abs=1e-12)
    # Hutchinson: unbiased, with standard error s/√m.
    m = 4000
    estimate = hessian_trace(_quadratic(), probes=m, seed=3, exact=False)
    assert not estimate.exact and estimate.probes == m
    assert abs(estimate.value - TRACE) < 4 * HUTCHINSON_STD / math.sqrt(m)
    assert estimate.stderr == pytest.approx(HUTCHINSON_STD / math.sqrt(m), rel=0.1)


def test_hutchinson_mean_of_the_probes():
    """A diagonal Hessian: every Rademacher probe gives zᵀHz = tr H exactly, so the estimate
    is tr H for any number of probes (a sum without the 1/m factor would be m·tr H)."""
    diagonal = torch.diag(torch.tensor([3.0, -1.0, 0.5, 2.0, 7.0, 0.0], dtype=torch.float64))
    for m in (1, 2, 5):
        estimate = hessian_trace(_quadratic(diagonal), probes=m, seed=m)
        assert not estimate.exact
        assert estimate.value == pytest.approx(11.5, abs=1e-12)
    assert hessian_trace(_quadratic(diagonal), probes=5).stderr == pytest.approx(0, abs=1e-12)


def test_bad_probes():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="probes must be an integer >= 1"):
            hessian_trace(_quadratic(), probes=bad)


def test_model_hessian_against_a_dense_float64_reference():
    """Cross-entropy of a small tanh network, in chunks of unequal size (7, 7, 6), against
    the dense Hessian by torch.autograd.functional.hessian over the flat parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(20, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (20,))
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of_flat(theta):
        pieces, offset = [], 0
        for shape in shapes:
            size = math.prod(shape)
            pieces.append(theta[offset : offset + size].reshape(shape))
            offset += size
        w1, b1, w2, b2 = pieces
        return F.cross_entropy(torch.tanh(x @ w1.T + b1) @ w2.T + b2, y)

    dense = torch.autograd.functional.hessian(loss_of_flat, flat)
    eigenvalues = torch.linalg.eigvalsh(dense)
    operator = model_hessian(model, x, y, chunk=7)
    assert len(operator._pullbacks) == 3
    value, converged = top_eigenvalue(operator, tol=1e-12, seed=0)
    assert converged
    assert value == pytest.approx(float(eigenvalues[-1]), rel=1e-9)
    trace = hessian_trace(operator, probes=operator.numel)
    assert trace.exact
    assert trace.value == pytest.approx(float(dense.trace()), rel=1e-10)
    # The model itself is left in its dtype and mode.
    assert next(model.parameters()).dtype == torch.float64 and model.training


# -- equal-loss checkpoints ---------------------------------------------------------------------

# A non-monotone trajectory: it dips below 1.0 at epoch 2, goes back above, ...
TRAJECTORY = [2.3, 1.5, 0.9, 1.2, 0.7, 0.95, 0.4, 0.6, 0.3]


def test_first_crossing_of_each_threshold():
    assert first_crossings(TRAJECTORY, [1.0, 0.8, 0.5, 0.1]) == [2, 4, 6, None]
    assert first_crossings(TRAJECTORY, [3.0, 0.3]) == [0, 8]  # inclusive: ≤ τ
    assert first_crossings([2.0, math.nan, 0.5], [1.0]) == [2]


def test_automatic_thresholds():
    """Log-even from the lowest start (excluded) to the lowest loss every run reached."""
    runs = [[2.0, 1.0, 0.5], [2.2, 1.5, 0.8, 0.9]]
    assert auto_thresholds(runs, 2) == pytest.approx([2.0 * math.sqrt(0.4), 0.8], rel=1e-12)
    assert auto_thresholds(runs, 1) == pytest.approx([0.8])
    assert auto_thresholds([[2.0, 1.0], [2.0, 2.1]], 3) == []  # one run never improved
    assert auto_thresholds([[2.0, math.nan, 1.0], [2.5, 0.5]], 1) == pytest.approx([1.0])


class _Scripted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))


def _record(monkeypatch, thresholds):
    """Feed TRAJECTORY to a recorder (the model's parameter holds the epoch number)."""
    seen = iter(TRAJECTORY)
    monkeypatch.setattr(flatness, "evaluate",
                        lambda model, x, y: (torch.tensor(next(seen), dtype=torch.float64),
                                                  torch.tensor(0.0)))
    task = type("T", (), {"x_train": None, "y_train": None})()
    recorder = CheckpointRecorder(task, thresholds)
    model = _Scripted()
    for epoch in range(len(TRAJECTORY)):
        with torch.no_grad():
            model.w.fill_(epoch)
        recorder(epoch, model)
    return recorder


def test_recorder_keeps_the_first_crossings(monkeypatch):
    given = _record(monkeypatch, [1.0, 0.5, 0.1])
    assert given.losses == TRAJECTORY
    assert sorted(given.snapshots) == [2, 6]  # first crossings of 1.0 and 0.5
    assert given.checkpoint(6)["w"].tolist() == [6.0, 6.0]
    automatic = _record(monkeypatch, None)
    assert sorted(automatic.snapshots) == [0, 1, 2, 4, 6, 8]  # every new lowest loss
    for tau in (1.0, 0.8, 0.5, 0.3):  # any threshold's first crossing is among them
        assert first_crossings(TRAJECTORY, [tau])[0] in automatic.snapshots


# -- the command --------------------------------------------------------------------------------


def test_flatness_at_equal_loss_end_to_end(tmp_path, capsys):
    out = tmp_path / "flat"
    code = main(["flatness", "--task", "mnist1d@200", "--model", "mlp", "--epochs", "6",
                 "--batch-size", "1000000", "--warmup-epochs", "0", "--seeds", "1",
                 "--alphas", "-5", "0", "--thresholds", "2", "--trace-probes", "3",
                 "--hessian-iters", "20", "--quiet", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["base"] == "adamw" and summary["optimizer"] == "e-adamw"
    trajectories = {t["alpha"]: t["train_loss_full_batch"] for t in summary["trajectories"]}
    assert set(trajectories) == {-5.0, 0.0}
    assert all(len(t) == 7 for t in trajectories.values())  # initialisation + 6 epochs
    thresholds = summary["thresholds"]
    assert len(thresholds) == 2 and thresholds[0] > thresholds[1]
    # The lowest threshold is the lowest loss both runs reached.
    assert thresholds[1] == pytest.approx(max(min(t) for t in trajectories.values()))
    with open(out / "checkpoints.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4
    for row in rows:
        losses = trajectories[float(row["alpha"])]
        tau = float(row["threshold"])
        epoch = int(row["epoch"])
        assert row["reached"] == "True"
        assert float(row["loss"]) == pytest.approx(losses[epoch]) and losses[epoch] <= tau
        assert all(loss > tau for loss in losses[:epoch])  # the first crossing
        assert int(row["step"]) == epoch  # full batch: one step an epoch
        assert float(row["top_eig"]) > 0 and math.isfinite(float(row["trace"]))
        assert row["trace_exact"] == "False"
    # λ_max at each checkpoint, recomputed independently: the same run again, its model kept
    # at each checkpoint's epoch, and Lanczos on double-backprop products (theory.flatness).
    from theory.flatness import model_top_eigenvalue

    kept = {}
    config = TrainConfig(task="mnist1d@200", model="mlp", epochs=6, batch_size=10**6,
                         warmup_epochs=0, alpha=0.0, beta=0.99)
    train("e-adamw", config, 0, epoch_hook=lambda epoch, model: kept.setdefault(
        epoch, copy.deepcopy(model)))
    task = load_task("mnist1d@200", 0)
    base_rows = [row for row in rows if float(row["alpha"]) == 0.0]
    assert len({row["epoch"] for row in base_rows}) == 2  # two different checkpoints
    for row in base_rows:
        expected = model_top_eigenvalue(kept[int(row["epoch"])], F.cross_entropy,
                                        task.x_train, task.y_train, iters=100, tol=1e-8)
        assert float(row["top_eig"]) == pytest.approx(expected, rel=1e-3)
    assert (out / "equal_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "at equal training loss" in captured.out
    assert "Hutchinson with 3 Rademacher probes (15210 parameters)" in captured.out
    assert "adamw (α=0)" in captured.out and "e-adamw α=-5 β=0.99" in captured.out


def test_flatness_given_thresholds_not_reached(tmp_path, capsys):
    out = tmp_path / "given"
    code = main(["flatness", "--epochs", "2", "--seeds", "1", "--alphas", "0",
                 "--loss-thresholds", "2.5", "1e-3", "--trace-probes", "2",
                 "--hessian-iters", "5", "--quiet", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["thresholds"] == [2.5, 1e-3] and summary["thresholds_given"]
    reached = {c["threshold"]: c for c in summary["checkpoints"]}
    assert reached[2.5]["reached"] and reached[2.5]["epoch"] == 0  # ln 10 < 2.5 at the start
    assert not reached[1e-3]["reached"]
    assert "not reached" in captured.out


@pytest.mark.parametrize(("argv", "message"), [
    (["--loss-thresholds", "0"], "loss threshold must be > 0"),
    (["--thresholds", "0"], "thresholds must be >= 1"),
    (["--trace-probes", "0"], "trace probes must be >= 1"),
])
def test_flatness_bad_options(argv, message, capsys):
    assert main(["flatness", "--quiet", *argv]) == 2
    assert message in capsys.readouterr().err
