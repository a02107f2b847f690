"""FSDP2 (DTensor) support shared by the adaptor and the backends.

Element-wise work runs on each DTensor's local shard (``to_local()`` shares its storage, so
in-place writes reach the DTensor, and no DTensor dispatch happens per op). What needs the
whole tensor — a norm, or the decision to skip a step — is reduced over the process groups
the tensor is sharded over.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from adaptor.precision import prepare_step


def is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor, without importing ``torch.distributed.tensor`` (~0.2 s):
    a DTensor exists only once that module was imported."""
    module = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(module, "DTensor", None) if module is not None else None
    return dtensor is not None and isinstance(t, dtensor)


def local(t: Tensor) -> Tensor:
    """A DTensor's local shard (shares its storage); any other tensor as it is."""
    return t.to_local() if is_dtensor(t) else t


def shard_groups(t: Tensor) -> tuple[Any, ...]:
    """The process groups over which a DTensor's local shards must be summed to give a sum
    over the whole tensor: one per mesh dimension it is sharded over (FSDP2: the shard
    group; HSDP: not the replicate dimension). ``()`` for an ordinary tensor."""
    if not is_dtensor(t):
        return ()
    mesh = t.device_mesh
    return tuple(mesh.get_group(d) for d, pl in enumerate(t.placements) if pl.is_shard())


def reduce_skip_flag(flag: Tensor | None, tensors: Sequence[Tensor]) -> Tensor | None:
    """The flag made common to every rank that holds a shard of ``tensors``: one all-reduce
    (max) of one scalar per shard group. A NaN in one rank's shard then skips the step on
    every rank (otherwise the shards of one parameter would part ways)."""
    if flag is None:
        return None
    groups: dict[int, Any] = {}
    for t in tensors:
        for pg in shard_groups(t):
            groups.setdefault(id(pg), pg)
    for pg in groups.values():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=pg)
    return flag


def prepare_sharded_step(
    optimizer: Any, grads: Sequence[Tensor], *, skip_nonfinite: bool
) -> Tensor | None:
    """:func:`adaptor.precision.prepare_step` on the local shards, the flag then reduced."""
    flag = prepare_step(optimizer, [local(g) for g in grads], skip_nonfinite=skip_nonfinite)
    return reduce_skip_flag(flag, grads)
