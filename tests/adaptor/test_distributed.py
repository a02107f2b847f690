"""The adaptor runs unchanged under torch.distributed: DDP and FSDP2 (gloo, two CPU processes).

Each rank trains on its half of a batch; the result must match one process training on the
whole batch (DDP and FSDP2 average the gradients, the loss is a mean over equal halves).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from adaptor import E
from tests.distributed import full, gloo_group, rank_share, wrap

STEPS = 5
WORLD = 2

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing"),
    # with --dist loadgroup one worker runs the multi-process tests in turn
    pytest.mark.xdist_group("torch_distributed"),
]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(8, 8, generator=generator), torch.randn(8, 2, generator=generator)


NAN_STEP = 2


def _train(model, optimizer, rank: int | None, *, nan: bool = False) -> None:
    """``nan``: a NaN in one gradient at ``NAN_STEP`` on rank 1 only (its FSDP2 shard), or in
    the single process."""
    dtype = next(model.parameters()).dtype
    for step in range(STEPS):
        x, y = _batch(step)
        x, y = rank_share(x.to(dtype), y.to(dtype), rank, WORLD)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if nan and step == NAN_STEP and rank in (None, 1):
            grad = next(model.parameters()).grad
            local = grad.to_local() if hasattr(grad, "to_local") else grad
            local.view(-1)[0] = float("nan")
        optimizer.step()


# name -> (wrapper, dtype, skip_nonfinite with a NaN on rank 1 at NAN_STEP)
CASES = {
    "ddp": ("ddp", torch.float32, False),
    "fsdp2": ("fsdp2", torch.float32, False),
    "fsdp2-skip": ("fsdp2", torch.float32, True),
    "fsdp2-bf16": ("fsdp2", torch.bfloat16, False),
}


def _worker(rank: int, out_dir: str) -> None:
    with gloo_group(rank, WORLD, out_dir):
        for name in CASES:
            _run_case(rank, name, out_dir)


def _optimizer(model, skip: bool):
    return E(
        torch.optim.AdamW(model.parameters(), lr=1e-2), alpha=-5.0, beta=0.99,
        skip_nonfinite=skip,
    )


def _run_case(rank: int, name: str, out_dir: str) -> None:
    wrapper, dtype, skip = CASES[name]
    model = wrap(_model().to(dtype), wrapper)
    optimizer = _optimizer(model, skip)
    _train(model, optimizer, rank, nan=skip)
    params = [
        full(p) for p in model.parameters()
    ]
    buffers = [optimizer.state[p]["explore_buffer"] for p in model.parameters()]
    buffers = [full(b) for b in buffers]
    if rank == 0:
        torch.save({"params": params, "buffers": buffers}, os.path.join(out_dir, f"{name}.pt"))


def test_ddp_and_fsdp2_match_single_process(tmp_path):
    """float32: DDP and FSDP2 equal one process on the full batch (rtol 1e-5); with
    ``skip_nonfinite`` and a NaN in rank 1's shard only, both ranks skip that step (the flag
    is all-reduced), as the single process does. bf16 parameters under FSDP2 (the
    replacement on local shards, a float32 buffer) agree with one bf16 process to a few bf16
    ulps of the parameters (atol 2⁻⁵ over 5 steps of lr 1e-2: FSDP2 averages the bf16
    gradient halves in bf16, one process sums the whole batch)."""
    # One spawn for every case: starting two processes costs more than the training.
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)

    start = list(_model().parameters())
    for name, (_, dtype, skip) in CASES.items():
        model = _model().to(dtype)
        optimizer = _optimizer(model, skip)
        _train(model, optimizer, rank=None, nan=skip)
        result = torch.load(tmp_path / f"{name}.pt")
        tight = dtype == torch.float32
        for got, want, init in zip(result["params"], model.parameters(), start):
            assert not torch.equal(want.detach().float(), init.detach())
            if tight:
                torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6, msg=name)
            else:
                torch.testing.assert_close(got, want.detach(), rtol=0, atol=2**-5, msg=name)
        for got, p in zip(result["buffers"], model.parameters()):
            want = optimizer.state[p]["explore_buffer"]
            assert got.dtype == torch.float32, name
            if tight:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=name)
        if skip:
            assert optimizer.skipped_steps.item() == 1
