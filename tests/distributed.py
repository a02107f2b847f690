"""What the multi-process tests share: a gloo group on a file store, a rank's half of a
batch, and a count of the bytes the library all-reduces."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist


@contextlib.contextmanager
def gloo_group(rank: int, world: int, out_dir: str) -> Iterator[None]:
    """A gloo process group for one spawned rank, torn down cleanly.

    One intra-op thread per process, and a file store, not a port: picking a "free" port
    races with other tests and xdist workers. On a normal exit every rank meets at a barrier
    before ``destroy_process_group``: without it a rank that finishes first tears its group
    down while the other still has gloo work in flight (FSDP2's last bf16 collectives), and
    the slower process aborts at exit ("terminate called without an active exception",
    SIGABRT) in about 1 run in 7.
    """
    torch.set_num_threads(1)
    store = os.path.join(out_dir, "store")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def rank_share(
    x: torch.Tensor, y: torch.Tensor, rank: int | None, world: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s equal share of the batch (``rank=None``: the whole batch)."""
    if rank is None:
        return x, y
    part = len(x) // world
    return x[rank * part : (rank + 1) * part], y[rank * part : (rank + 1) * part]


@contextlib.contextmanager
def counted_all_reduce() -> Iterator[list[int]]:
    """Patch ``dist.all_reduce`` in this process; yields the bytes of every call.

    Only Python-level calls are seen: FSDP2's own collectives are all-gathers and
    reduce-scatters, and DDP's reducer calls no Python function, so what is counted is what
    the library reduces.
    """
    sent: list[int] = []
    all_reduce = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        sent.append(tensor.numel() * tensor.element_size())
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        yield sent
    finally:
        dist.all_reduce = all_reduce
