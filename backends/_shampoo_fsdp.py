r"""Shampoo's matrices under FSDP2: replicated Kronecker statistics, each root on one rank.

Design (see :mod:`backends._owners` for the owners and the collectives):

* **Where the statistics live: replicated.** ``L``, ``R`` and their roots are plain tensors,
  identical on every rank of the shard group, and their shapes depend on the parameter only.
  ``torch.distributed.checkpoint`` treats a plain tensor in a sharded state dict as
  replicated (it saves one rank's copy and loads it into every rank), so a checkpoint is
  correct exactly when the copies agree, and it loads at any world size (the owners are
  recomputed from shapes). Owner-only statistics would halve the memory but break that
  assumption (the saved copy could be a non-owner's stale one), and ``full_state_dict=True``
  would keep only rank 0's.
* **Per step**: every rank receives the whole ``G`` (for ``L``, ``R``), the whole ``m̂``
  and Adam's direction ``A`` (for the direction and its grafting norm) of every matrix: one
  alltoallv of the three, stacked side by side (:meth:`Plan.to_everyone`), ``3·N·(W-1)/W``
  elements received per rank. Every rank updates ``L``, ``R`` (the same matmuls on the same
  inputs: the copies stay bit-identical) and forms the direction ``L̂^{-1/4} m̂ R̂^{-1/4}``
  (two matmuls per block), keeping its own rows.
* **Roots** (``eigh``/Newton, the expensive part: ``O(r³ + c³)`` per block): computed for
  each matrix by its owner only, at the scheduled steps, then sent to every rank
  (:meth:`Plan.to_all`, ``(W-1)·Σ(count·(r² + c²))`` elements over all ranks, only at
  the refresh steps, every ``precondition_frequency`` steps).

Meta's Distributed Shampoo (DDP mode) also assigns blocks to ranks, but then all-gathers the
finished search directions (``N·(W-1)/W`` per rank and step) while each rank keeps only its
own blocks' statistics; its FSDP mode preconditions each rank's local shard separately (no
communication, numbers that depend on the world size). Here the numbers are those of one
process, at 3× an all-gather per step plus the roots every ``precondition_frequency`` steps.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from backends import _owners

__all__ = ["directions_", "split"]


def split(keys: list[Tensor], matrices: list[int]) -> dict[Any, list[int]]:
    """The matrices by the process group their rows are sharded over (``None``: whole)."""
    out: dict[Any, list[int]] = {}
    for i in matrices:
        out.setdefault(_owners.shard_group(keys[i]), []).append(i)
    return out


def root_cost(layout: Any) -> int:
    """Flops of one refresh of a parameter's roots, up to a constant: ``Σ r³ + c³``."""
    return layout.count * (layout.rows**3 + layout.cols**3)


def directions_(
    opt: Any,
    group: dict[str, Any],
    process_group: Any,
    keys: list[Tensor],
    indices: list[int],
    grads: list[Tensor],
    momentum: list[Tensor],
    directions: list[Tensor],
    refresh: list[int],
    active: list[int],
    corrections: list[Tensor],
    layouts: dict,
    beta2: float,
    mask: Any,
) -> None:
    """Shampoo's matrix work for FSDP2 parameters ``keys[i]``, ``i in indices``.

    ``grads``, ``momentum`` (``m̂``) and ``directions`` (Adam's ``A``) hold the local rows,
    in the compute dtype. Updates the replicated statistics and roots, and replaces
    ``directions[i]`` of the active matrices by this rank's rows of Shampoo's direction.
    """
    shapes = [(keys[i].shape[0], math.prod(keys[i].shape[1:])) for i in indices]
    costs = [root_cost(layouts[keys[i]]) for i in indices]
    plan = _owners.Plan(process_group, [(m, 3 * n) for m, n in shapes], costs)
    packed = [
        torch.cat([_owners.matrix_rows(t[i]) for t in (grads, momentum, directions)], dim=1)
        for i in indices
    ]
    whole_g, whole_m, whole_a = {}, {}, {}
    for i, whole, (_, n) in zip(indices, plan.to_everyone(packed), shapes):
        whole_g[i], whole_m[i], whole_a[i] = whole.split(n, dim=1)
    opt._update_statistics(
        [keys[i] for i in indices], [whole_g[i] for i in indices], layouts, beta2, mask
    )
    refreshed = [j for j, i in enumerate(indices) if i in refresh]
    if refreshed:  # the same list on every rank (the schedule counts step() calls)
        _share_roots(opt, group, plan, keys, indices, refreshed, corrections, mask)
    moving = [i for i in indices if i in active]
    if moving:
        out = opt._precondition(
            group, [keys[i] for i in moving], [whole_m[i] for i in moving],
            [whole_a[i] for i in moving], layouts,
        )
        for i, direction in zip(moving, out):
            rows, cols = keys[i].shape[0], math.prod(keys[i].shape[1:])
            start, size = _owners.row_slices(rows, plan.world)[plan.rank]
            mine = direction.reshape(rows, cols)[start : start + size]
            directions[i] = mine.reshape(directions[i].shape).to(directions[i].dtype)


def _share_roots(
    opt: Any, group: dict[str, Any], plan: _owners.Plan, keys: list[Tensor],
    indices: list[int], refreshed: list[int], corrections: list[Tensor], mask: Any,
) -> None:
    """Owners recompute their matrices' roots; every rank then copies them in.

    What is shared: every per-matrix state tensor that a refresh writes, i.e. Shampoo's
    ``MATRIX_KEYS`` except the statistics ``left``/``right`` (which every rank updates
    itself), all in one alltoallv.
    """
    from backends.second_order import MATRIX_KEYS  # here: second_order imports this module

    shared_keys = [k for k in MATRIX_KEYS if k not in ("left", "right")]
    mine = [j for j in refreshed if plan.owners[j] == plan.rank]
    if mine:
        opt._refresh_roots(
            group, [keys[indices[j]] for j in mine], [corrections[indices[j]] for j in mine],
            mask,
        )
    states = [opt.state[keys[i]] for i in indices]
    numels = [
        sum(states[j][k].numel() for k in shared_keys) if j in refreshed else 0
        for j in range(len(indices))
    ]
    like = states[refreshed[0]][shared_keys[0]]
    owned = {
        j: torch.cat([states[j][k].reshape(-1).to(like.dtype) for k in shared_keys])
        if j in refreshed else like.new_empty(0)
        for j in plan.owned
    }
    shared = plan.to_all(owned, numels, like)
    for j in refreshed:
        if plan.owners[j] == plan.rank:
            continue
        targets = [states[j][k] for k in shared_keys]
        for target, new in zip(targets, shared[j].split([t.numel() for t in targets])):
            target.copy_(new.view(target.shape))
