"""``examples/train_distributed.py`` under torchrun (2 gloo processes) and on one process.

For DDP (E(SPSA) over SGD) and FSDP2 (E(AdamW)): a run of 4 steps that checkpoints at
steps 2 and 4, then a second launch that finds only the step-2 checkpoint, resumes from it
into a fresh model and optimizer and trains steps 3-4: both must end with the same
parameters bit for bit (the example prints the sha256 of the full parameters).

Launch: ``python -m torch.distributed.run --standalone``: torchrun's own rendezvous store
binds port 0 (the OS picks a free port at bind time, no pick-then-bind race with other
tests or xdist workers) and the workers share that store (``TORCHELASTIC_USE_AGENT_STORE``),
so no port is chosen anywhere. Each launch is bounded by a timeout.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

pytest.importorskip("sklearn")
pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing"),
    pytest.mark.xdist_group("torch_distributed"),
]

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_distributed.py"
TIMEOUT_S = 300  # per launch; a few seconds when the machine is not shared
FINAL = re.compile(r"^final loss (\S+) params ([0-9a-f]{64})$", re.MULTILINE)


def _launch(args: list[str], nproc: int | None) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable]
    if nproc is not None:
        command += ["-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={nproc}"]
    command += [str(SCRIPT), "--device", "cpu", *args]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return done.stdout


def _final(stdout: str) -> tuple[float, str]:
    match = FINAL.search(stdout)
    assert match, stdout
    return float(match.group(1)), match.group(2)


@pytest.mark.parametrize(
    ("wrap", "optimizer"), [("ddp", "spsa"), ("fsdp2", "e-adamw")], ids=["ddp", "fsdp2"]
)
def test_torchrun_save_then_resume_is_bit_exact(tmp_path, wrap, optimizer):
    common = ["--wrap", wrap, "--optimizer", optimizer, "--steps", "4", "--save-every", "2"]
    first = _launch([*common, "--checkpoint-dir", str(tmp_path / "a")], nproc=2)
    assert f"world 2, {wrap}, {optimizer}, cpu; from scratch" in first
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["step-000002", "step-000004"]
    shutil.copytree(tmp_path / "a" / "step-000002", tmp_path / "b" / "step-000002")
    second = _launch([*common, "--checkpoint-dir", str(tmp_path / "b")], nproc=2)
    assert "resumed from" in second and "step-000002" in second
    loss, digest = _final(first)
    assert _final(second) == (loss, digest)
    assert loss == loss  # finite, not NaN


def test_one_process_runs_unchanged():
    loss, _ = _final(_launch(["--optimizer", "alto", "--steps", "2"], nproc=None))
    assert 0.0 < loss < 10.0
