"""The lab's command line, end to end on tiny settings, and its handling of bad input."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lab import registry
from lab.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def test_compare_end_to_end(tmp_path, capsys):
    out = tmp_path / "compare"
    code = main([
        "compare", "--epochs", "2", "--seeds", "2", "--batch-size", "512",
        "--optimizers", "adamw,e-adamw,sgd@0.1", "--quiet", "--out", str(out),
    ])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["optimizer"], r["seed"]) for r in rows] == [
        ("adamw", "0"), ("adamw", "1"), ("e-adamw", "0"), ("e-adamw", "1"),
        ("sgd@0.1", "0"), ("sgd@0.1", "1"),
    ]
    for row in rows:
        assert 0.0 <= float(row["test_acc"]) <= 1.0
        assert int(row["steps"]) == 2 * (1437 // 512)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["summary"]) == {"adamw", "e-adamw", "sgd@0.1"}
    assert summary["summary"]["e-adamw"]["alpha"] == 0.5  # preset(512): small batch
    assert summary["summary"]["adamw"]["alpha"] is None
    assert len(summary["runs"][0]["curves"]["train_loss"]) == 2
    assert _is_png(out / "loss_curves.png")
    # The printed table has one row per optimizer with mean ± std.
    table = [line for line in captured.out.splitlines() if "±" in line]
    assert [line.split()[0] for line in table] == ["adamw", "e-adamw", "sgd@0.1"]
    assert "Traceback" not in captured.err


def test_compare_synthetic_cnn_and_options(tmp_path, capsys):
    out = tmp_path / "synthetic"
    code = main([
        "compare", "--task", "synthetic", "--epochs", "1", "--seeds", "1", "--batch-size",
        "4000", "--optimizers", "e-lamb,alto", "--alpha", "-2", "--beta", "0.9",
        "--lr-scaling", "linear", "--schedule", "step", "--warmup-epochs", "0", "--quiet",
        "--out", str(out),
    ])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    for name in ("e-lamb", "alto"):
        assert summary["summary"][name]["alpha"] == -2.0
        assert summary["summary"][name]["beta"] == 0.9
    assert summary["config"]["lr_scaling"] == "linear"
    code = main([
        "compare", "--model", "cnn", "--epochs", "1", "--seeds", "1", "--batch-size", "1024",
        "--optimizers", "e-sgd", "--quiet", "--out", str(tmp_path / "cnn"),
    ])
    assert code == 0, capsys.readouterr().err
    assert _is_png(tmp_path / "cnn" / "loss_curves.png")


def test_preset_follows_the_batch_size(tmp_path, capsys):
    for batch, alpha in (("64", 0.5), ("1024", -5.0)):
        out = tmp_path / batch
        code = main(["compare", "--epochs", "1", "--seeds", "1", "--batch-size", batch,
                     "--optimizers", "e-adam", "--quiet", "--out", str(out)])
        assert code == 0, capsys.readouterr().err
        summary = json.loads((out / "summary.json").read_text())["summary"]["e-adam"]
        assert summary["alpha"] == alpha


def test_optimizers_lists_every_name(capsys):
    assert main(["optimizers"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == registry.available()
    for name in ("sgd", "adam", "adamw", "lamb", "adabelief", "alto", "muon", "shampoo",
                 "spsa-sgd", "spsa-adam", "e-adamw", "e-lamb", "e-muon", "e-spsa-sgd"):
        assert name in listed


BAD_INPUT = [
    (["compare", "--optimizers", "adamw,nadam"], "unknown optimizer 'nadam'"),
    (["compare", "--optimizers", "e-alto"], "already contains the adaptor"),
    (["compare", "--optimizers", "adamw,adamw"], "listed twice"),
    (["compare", "--optimizers", ","], "no optimizer"),
    (["compare", "--optimizers", "adamw@-1"], "learning rate must be > 0"),
    (["compare", "--task", "mnist"], "unknown task 'mnist'"),
    (["compare", "--task", "synthetic", "--model", "cnn"], "image task"),
    (["compare", "--model", "resnet"], "unknown model"),
    (["compare", "--batch-size", "-5"], "batch size must be >= 1"),
    (["compare", "--batch-size", "0"], "batch size must be >= 1"),
    (["compare", "--batch-size", "big"], "batch size must be an integer"),
    (["compare", "--epochs", "0"], "epochs must be >= 1"),
    (["compare", "--alpha", "200"], "|alpha| < 1/(1-beta)"),
    (["compare", "--alpha", "-2", "--beta", "0.01"], "|alpha| < 1/(1-beta)"),
    (["compare", "--beta", "1.0"], "0 <= beta < 1"),
    (["compare", "--lr", "0"], "learning rate must be > 0"),
    (["compare", "--lr-scaling", "cubic"], "invalid choice"),
    (["flatness", "--alphas", "-5", "-200"], "|alpha| < 1/(1-beta)"),
    (["flatness", "--optimizer", "spsa-sgd"], "first-order"),
    (["flatness", "--optimizer", "nadam"], "unknown optimizer"),
    (["demo", "--landscapes", "no-such-landscape"], "no-such-landscape"),
    (["demo", "--alpha", "150"], "|alpha| < 1/(1-beta)"),
    (["frobnicate"], "invalid choice"),
    ([], "a command is required"),
    (["compare", "--no-such-option"], "unrecognized arguments"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_INPUT, ids=lambda v: " ".join(v)
                         if isinstance(v, list) else None)
def test_bad_input_is_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("explore: error: ")
    assert message in lines[0]
    assert "Traceback" not in captured.err
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert "compare" in capsys.readouterr().out
    assert main(["compare", "--help"]) == 0
    assert "--batch-size" in capsys.readouterr().out


def test_python_dash_m_lab():
    result = subprocess.run(
        [sys.executable, "-m", "lab", "compare", "--optimizers", "nadam"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("explore: error: unknown optimizer 'nadam'")
    assert "Traceback" not in result.stderr
