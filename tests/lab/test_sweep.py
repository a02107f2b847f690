"""``explore sweep``: lr selection never sees the test split, pairs share initialisation and
batch order, the statistics reach the table, and the command runs end to end (tiny)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from lab import sweep
from lab.cli import main
from lab.sweep import FULL, SweepConfig, carve_validation, plan_sweep, run_sweep
from lab.tasks import load_task

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# 2 batch sizes × 1 pair × (2 lrs × 1 tuning seed + 2 seeds) = 16 runs of 2 epochs on digits.
TINY = SweepConfig(task="digits", batch_sizes=(512, FULL), pairs=(("adamw", "e-adamw"),),
                   epochs=2, warmup_epochs=0.0, lr_factors=(0.5, 2.0), seeds=2)


class _Bar:
    def update(self, *_):
        pass

    def set_description(self, *_):
        pass

    def set_postfix(self, *_, **__):
        pass


class _Poison:
    """Stands for the test split: any use raises."""

    def __getattr__(self, name):
        raise AssertionError(f"the test split was read during lr selection (.{name})")

    def __getitem__(self, key):
        raise AssertionError("the test split was indexed during lr selection")


def _scrambled(task):
    # every test label wrong: (y + 1) mod classes
    return dataclasses.replace(task, y_test=(task.y_test + 1) % task.num_classes)


def test_lr_selection_cannot_read_the_test_split():
    task = load_task("digits", seed=0)
    poisoned = dataclasses.replace(task, x_test=_Poison(), y_test=_Poison())
    fit = carve_validation(poisoned, TINY.val_fraction, TINY.data_seed)
    plans = plan_sweep(TINY, task.x_train.shape[0], fit.x_train.shape[0])
    chosen, records = sweep.select_learning_rates(TINY, fit, plans, _Bar())
    assert set(chosen) == {"512", "full"}
    assert all(r["phase"] == "tune" and r["test_acc"] is None for r in records)
    # validation = 20 % of the 1437 training samples, disjoint from what is trained on
    assert fit.x_test.shape[0] == 288 and fit.x_train.shape[0] == 1149
    rows = {tuple(r.tolist()) for r in fit.x_train}
    assert not any(tuple(r.tolist()) in rows for r in fit.x_test[:50])


def test_scrambled_test_labels_do_not_change_the_chosen_lr(tmp_path):
    task = load_task("digits", seed=0)
    config = dataclasses.replace(TINY, batch_sizes=(FULL,), lr_factors=(0.1, 1.0), seeds=2)
    clean = run_sweep(config, tmp_path / "clean", task=task, quiet=True)
    scrambled = run_sweep(config, tmp_path / "scrambled", task=_scrambled(task), quiet=True)
    # Mutation caught: tuning on `task` (the test split) instead of the carved validation
    # split changes these scores (accuracy on wrong labels).
    assert scrambled["lr_selection"] == clean["lr_selection"]
    acc = [p["table"][0]["base_acc_pct_mean"] for p in (clean, scrambled)]
    assert acc[0] > 50.0 and acc[1] < 10.0  # the test split itself did change


def test_pairs_share_initialisation_and_batch_order(tmp_path):
    payload = run_sweep(TINY, tmp_path, quiet=True)
    final = [r for r in payload["runs"] if r["phase"] == "final"]
    assert len(final) == 2 * 2 * 2
    for batch in ("512", "full"):
        for seed in (0, 1):
            base, explored = (next(r for r in final if r["batch"] == batch and
                                   r["label"] == label and r["seed"] == seed)
                              for label in ("adamw", "e-adamw"))
            assert base["init_digest"] == explored["init_digest"]
            assert base["order_digest"] == explored["order_digest"]
    # the digests do tell seeds apart (and batch 512 does shuffle: 2 batches per epoch)
    by_seed = {r["seed"]: r for r in final if r["batch"] == "512" and r["label"] == "adamw"}
    assert by_seed[0]["init_digest"] != by_seed[1]["init_digest"]
    assert by_seed[0]["order_digest"] != by_seed[1]["order_digest"]
    assert by_seed[0]["steps"] == 2 * (1437 // 512)
    # a broken pair is an error
    broken = [dict(r) for r in final]
    victim = next(r for r in broken if r["label"] == "e-adamw" and r["seed"] == 1)
    victim["order_digest"] = by_seed[0]["order_digest"]
    plans = plan_sweep(TINY, 1437, 1149)
    with pytest.raises(RuntimeError, match="not paired"):
        sweep.check_pairing(broken, plans)
    # One side diverged and stopped after epoch 1: only the first epoch's order is compared
    # (the full default sweep hit this: e-sgd at its tuned lr diverged on one seed).
    stopped = [dict(r) for r in final]
    victim = next(r for r in stopped if r["label"] == "e-adamw" and r["seed"] == 1
                  and r["batch"] == "512")
    victim.update(order_epochs=1, order_digest="0" * 16, diverged=True)
    sweep.check_pairing(stopped, plans)
    victim["first_order_digest"] = by_seed[0]["first_order_digest"]
    with pytest.raises(RuntimeError, match="first"):
        sweep.check_pairing(stopped, plans)


def test_alpha_zero_pair_gives_exactly_zero_difference(tmp_path):
    """E with α = 0 is the base bit for bit, so with true pairing every seed's difference is 0:
    interval [0, 0], p = 1. Mutation caught: the E side run with other seeds (seed + 1) gives
    non-zero differences."""
    config = dataclasses.replace(TINY, alphas=(0.0,), betas=(0.5,), seeds=3)
    payload = run_sweep(config, tmp_path, quiet=True)
    for row in payload["table"]:
        assert row["explored"] == "e-adamw(α=0,β=0.5)"
        assert row["base_lr"] == row["explored_lr"]
        for metric in ("acc_pct", "train_loss"):
            assert row[f"diff_{metric}_mean"] == 0.0
            assert row[f"diff_{metric}_half"] == 0.0
            assert row[f"diff_{metric}_p"] == 1.0
        assert row["base_acc_pct_half"] > 0.0  # the seeds do differ


def test_table_holds_the_statistics_of_the_runs(tmp_path):
    payload = run_sweep(TINY, tmp_path, quiet=True)
    final = [r for r in payload["runs"] if r["phase"] == "final"]
    row = payload["table"][0]
    assert row["batch"] == "512" and (row["alpha"], row["beta"]) == (0.5, 0.01)  # preset(512)
    assert payload["table"][1]["batch_size"] == 1437
    assert (payload["table"][1]["alpha"], payload["table"][1]["beta"]) == (-5.0, 0.99)
    base = [100 * r["test_acc"] for r in sorted(final, key=lambda r: r["seed"])
            if r["batch"] == "512" and r["label"] == "adamw"]
    expl = [100 * r["test_acc"] for r in sorted(final, key=lambda r: r["seed"])
            if r["batch"] == "512" and r["label"] == "e-adamw"]
    diffs = [e - b for e, b in zip(expl, base)]
    mean = sum(diffs) / 2
    half = 12.706204736174698 * abs(diffs[0] - diffs[1]) / math.sqrt(2) / math.sqrt(2)
    assert row["diff_acc_pct_mean"] == pytest.approx(mean, abs=1e-9)
    assert row["diff_acc_pct_half"] == pytest.approx(half, abs=1e-9)
    assert row["base_acc_pct_mean"] == pytest.approx(sum(base) / 2, abs=1e-9)
    # the lr of the final runs is the one selected on validation
    for label in ("adamw", "e-adamw"):
        chosen = payload["lr_selection"]["512"][label]
        assert {r["lr"] for r in final if r["batch"] == "512" and r["label"] == label} == \
            {chosen["lr"]}
        best = max(chosen["scores"], key=lambda s: (s["val_acc"], -s["val_loss"]))
        assert best["lr"] == chosen["lr"]


def test_sweep_end_to_end_cli(tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main([
        "sweep", "--quick", "--task", "digits", "--batch-sizes", "512,full", "--pairs",
        "adamw:e-adamw,lamb:alto", "--epochs", "2", "--seeds", "2", "--lr-factors", "1",
        "--alphas", "-1", "0.5", "--betas", "0.9", "--quiet", "--out", str(out),
    ])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    with open(out / "table.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [(r["batch"], r["explored"]) for r in table] == [
        (b, f"{e}(α={a},β=0.9)") for b in ("512", "full") for e in ("e-adamw", "alto")
        for a in ("-1", "0.5")
    ]
    with open(out / "runs.csv") as handle:
        runs = list(csv.DictReader(handle))
    # per batch: 6 variants (2 bases + 4 E) × (1 lr + 2 seeds)
    assert len(runs) == 2 * 6 * 3
    payload = json.loads((out / "sweep.json").read_text())
    assert payload["config"]["epochs"] == 2 and payload["n_val"] == 288
    assert (out / "sweep.png").read_bytes()[:8] == PNG_MAGIC
    lines = [line for line in captured.out.splitlines() if "±" in line]
    assert len(lines) == 8
    assert "Traceback" not in captured.err


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--pairs", "adamw:alto"], "adapts 'lamb'"),
        (["--pairs", "adamw:adamw"], "has no adaptor"),
        (["--pairs", "alto:lamb"], "already has the adaptor"),
        (["--pairs", "adamw"], "base:explored"),
        (["--batch-sizes", "0"], "batch size"),
        (["--batch-sizes", "64,64"], "twice"),
        (["--alphas", "-5", "--betas", "0.01", "--batch-sizes", "64"], "alpha"),
        (["--seeds", "1"], "seeds must be >= 2"),
        (["--device", "tpu"], "device"),
        (["--val-fraction", "1.5"], "validation fraction"),
    ],
)
def test_bad_input_is_one_line(argv, match, capsys):
    code = main(["sweep", "--task", "digits", "--quiet", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("explore: error:")
    assert match.lower() in err.lower()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_is_a_clear_error(capsys, tmp_path):
    code = main(["sweep", "--task", "digits", "--device", "cuda", "--out", str(tmp_path)])
    assert code == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not list(Path(tmp_path).iterdir())


def test_quick_preset_is_small():
    """The preset the README promises under 3 minutes on 2 cores: its run count (timings do
    not belong in tests). 3 batch sizes × 6 optimizers × (2 lrs + 3 seeds) × 20 epochs."""
    q = sweep.QUICK
    runs = len(q.batch_sizes) * 2 * len(q.pairs) * (len(q.lr_factors) * q.tune_seeds + q.seeds)
    assert runs * q.epochs <= 90 * 20
    assert 128 in q.batch_sizes  # the smallest batch sets the cost: 31 steps per epoch


def test_diverged_runs_are_reported_not_fatal(tmp_path):
    """An lr far too large: every run diverges (each side may stop at another epoch); the sweep
    still finishes, and the table says so."""
    config = dataclasses.replace(TINY, pairs=(("sgd", "e-sgd"),), batch_sizes=(256,),
                                 lr_factors=(1e12,), epochs=4)
    payload = run_sweep(config, tmp_path, quiet=True)
    row = payload["table"][0]
    assert row["base_diverged"] == 2 and row["explored_diverged"] == 2
    assert all(r["order_epochs"] < 4 for r in payload["runs"] if r["phase"] == "final")
    assert "diverged" in (tmp_path / "table.csv").read_text()


def test_workers_need_a_picklable_task(tmp_path):
    task = load_task("digits", seed=0)
    unpicklable = dataclasses.replace(task, models={"mlp": lambda: torch.nn.Linear(64, 10)})
    with pytest.raises(ValueError, match="cannot be pickled"):
        run_sweep(dataclasses.replace(TINY, workers=2), tmp_path, task=unpicklable, quiet=True)
