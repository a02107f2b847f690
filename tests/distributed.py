"""What the multi-process tests share: a gloo group on a file store, a rank's half of a
batch, and a count of the bytes the library all-reduces."""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
from collections.abc import Iterable, Iterator

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

    FSDP2 modules and their optimizers live in reference cycles, which only the garbage
    collector frees: left to the interpreter's exit they are destroyed after the group and
    gloo aborts the same way. So garbage is collected before the barrier and again at exit
    (``atexit``, while the interpreter is still whole: the worker's last models are garbage
    by then).
    """
    torch.set_num_threads(1)
    atexit.register(gc.collect)
    store = os.path.join(out_dir, "store")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        yield
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, wrapper: str | None,
         layers: Iterable[torch.nn.Module] | None = None) -> torch.nn.Module:
    """``model`` as the tests train it: ``None`` as it is, ``"ddp"``, ``"fsdp2"`` (each of
    ``layers`` sharded, then the model; default: the ``Linear`` children) or ``"hsdp"`` (the
    same over a ``world × 1`` mesh: replicated over the ranks, "sharded" over one)."""
    if wrapper is None:
        return model
    if wrapper == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = None
    if wrapper == "hsdp":
        mesh = init_device_mesh("cpu", (dist.get_world_size(), 1),
                                mesh_dim_names=("replicate", "shard"))
    if layers is None:
        layers = [m for m in model.children() if isinstance(m, torch.nn.Linear)]
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (gathered), a detached copy of any other."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


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


def move_optimizer_state(model, optimizer, target_model, target, how: str, path: str) -> None:
    """Move ``optimizer``'s state into ``target`` (a fresh optimizer of ``target_model``) the
    way a user would under FSDP2: ``"dcp"`` (``dcp.save`` → ``dcp.load`` of the sharded
    state dict), ``"sharded"`` (``get/set_optimizer_state_dict``) or ``"full"`` (gathered,
    loaded with ``broadcast_from_rank0``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    if how == "dcp":
        dcp.save({"optim": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=path)
        loaded = {"optim": get_optimizer_state_dict(target_model, target)}
        dcp.load(loaded, checkpoint_id=path)
        set_optimizer_state_dict(target_model, target, loaded["optim"])
        return
    options = StateDictOptions(full_state_dict=how == "full")
    saved = get_optimizer_state_dict(model, optimizer, options=options)
    if how == "full":
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_optimizer_state_dict(target_model, target, saved, options=options)
