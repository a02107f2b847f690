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
from tests.distributed import init_gloo, rank_share

STEPS = 5
WORLD = 2
WRAPPERS = ("ddp", "fsdp2")

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


def _train(model, optimizer, rank: int | None) -> None:
    for step in range(STEPS):
        x, y = _batch(step)
        x, y = rank_share(x, y, rank, WORLD)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def _worker(rank: int, out_dir: str) -> None:
    init_gloo(rank, WORLD, out_dir)
    try:
        for wrapper in WRAPPERS:
            _run_wrapper(rank, wrapper, out_dir)
    finally:
        dist.destroy_process_group()


def _run_wrapper(rank: int, wrapper: str, out_dir: str) -> None:
    model = _model()
    if wrapper == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    optimizer = E(torch.optim.AdamW(model.parameters(), lr=1e-2), alpha=-5.0, beta=0.99)
    _train(model, optimizer, rank)
    params = [
        p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()
    ]
    buffers = [optimizer.state[p]["explore_buffer"] for p in model.parameters()]
    buffers = [b.full_tensor() if hasattr(b, "full_tensor") else b for b in buffers]
    if rank == 0:
        torch.save({"params": params, "buffers": buffers}, os.path.join(out_dir, f"{wrapper}.pt"))


def test_ddp_and_fsdp2_match_single_process(tmp_path):
    # One spawn for both wrappers: starting two processes costs more than the training.
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)

    model = _model()
    optimizer = E(torch.optim.AdamW(model.parameters(), lr=1e-2), alpha=-5.0, beta=0.99)
    _train(model, optimizer, rank=None)
    start = list(_model().parameters())
    for wrapper in WRAPPERS:
        result = torch.load(tmp_path / f"{wrapper}.pt")
        for got, want, init in zip(result["params"], model.parameters(), start):
            assert not torch.equal(want.detach(), init.detach())
            torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6, msg=wrapper)
        for got, p in zip(result["buffers"], model.parameters()):
            want = optimizer.state[p]["explore_buffer"]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=wrapper)
