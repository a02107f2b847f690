"""Lamb, ALTO, AdaBelief and E(Lamb) under torch.distributed (gloo, two CPU processes).

DDP (every rank holds whole parameters, gradients averaged) and FSDP2 (``fully_shard``:
DTensor parameters, gradients and state; each rank holds rows of every tensor). Each rank
trains on its half of a batch; the parameters must match one process on the whole batch
(the loss is a mean over equal halves), and the ranks must agree bit for bit under DDP.

Lamb's trust ratio is ``φ(‖θ‖)/(‖r‖ + ε₂φ(‖θ‖))`` of the *whole* parameter: under FSDP2 the
shards' squared norms are all-reduced. The model is chosen so that shards are uneven (5 rows
on 2 ranks: 3 + 2) and one rank holds an empty shard (a 1-row weight and a 1-element bias).

The same spawn also checks distributed checkpoints under FSDP2: ``get_optimizer_state_dict``
(sharded, and ``full_state_dict=True``) → ``set_optimizer_state_dict`` into a fresh model and
optimizer, and ``dcp.save`` → ``dcp.load``, then a continued run equals the uninterrupted one
bit for bit.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from adaptor import E
from backends import ALTO, AdaBelief, Lamb, first_order
from tests.distributed import (
    counted_all_reduce,
    full,
    gloo_group,
    move_optimizer_state,
    rank_share,
    wrap,
)

STEPS = 4
WORLD = 2

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing"),
    # with --dist loadgroup one worker runs the multi-process tests in turn
    pytest.mark.xdist_group("torch_distributed"),
]

# name -> optimizer factory (float64 parameters)
OPTIMIZERS = {
    "lamb": lambda ps: Lamb(ps, lr=0.05, weight_decay=0.1),
    "lamb-single": lambda ps: Lamb(ps, lr=0.05, weight_decay=0.1, foreach=False),
    "lamb-paper-clip": lambda ps: Lamb(
        ps, lr=0.05, zero_norm_trust="paper", trust_clip=(0.0, 5.0), bias_correction=False
    ),
    "lamb-max-grad-norm": lambda ps: Lamb(ps, lr=0.05, max_grad_norm=0.05),
    "lamb-skip-nonfinite": lambda ps: Lamb(ps, lr=0.05, skip_nonfinite=True),
    "alto": lambda ps: ALTO(ps, lr=0.05),
    "alto-single": lambda ps: ALTO(ps, lr=0.05, foreach=False),
    "adabelief": lambda ps: AdaBelief(ps, lr=0.05, weight_decay=0.1),
    "e-lamb": lambda ps: E(Lamb(ps, lr=0.05), alpha=-5.0, beta=0.99),
}
CASES = [(name, wrapper) for wrapper in ("ddp", "fsdp2") for name in OPTIMIZERS]
# fused=True with every tensor "large" (the threshold lowered in the worker): a sharded bucket
# must take the foreach path (the compiled passes would use the shards' own norms). FSDP2
# only: under DDP the same setting would compile the kernels (tens of seconds).
OPTIMIZERS["lamb-fused"] = lambda ps: Lamb(ps, lr=0.05, weight_decay=0.1, fused=True)
CASES.append(("lamb-fused", "fsdp2"))


def _with_plain_parameter(params):
    """Lamb over the model's parameters plus one ordinary tensor that FSDP2 does not manage
    (its gradient, set by a step pre-hook, is the same on every rank): one bucket holds
    shards and a whole tensor, and only the shards' norms may be reduced."""
    extra = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 3, dtype=torch.float64))
    # Large ε₂, ε₃: the trust ratio φ(‖θ‖)/(‖r‖ + ε₂φ(‖θ‖)) is otherwise nearly invariant to
    # scaling both norms alike (which reducing the whole tensor's norms over 2 ranks does).
    optimizer = Lamb([*params, extra], lr=0.05, weight_decay=0.1, trust_eps=0.1, norm_eps=0.5)

    def set_grad(opt, args, kwargs):
        extra.grad = extra.detach().sin() + 0.5

    optimizer.register_step_pre_hook(set_grad)
    return optimizer


OPTIMIZERS["lamb-plain-tensor"] = _with_plain_parameter
CASES.append(("lamb-plain-tensor", "fsdp2"))
# HSDP: a 2-D mesh, parameters replicated over "replicate" (2 ranks) and sharded over "shard"
# (1 rank): the norms must be reduced over the shard dimension only.
CASES += [(name, "hsdp") for name in ("lamb", "alto-single", "e-lamb")]
# A NaN gradient on rank 1 only at this step: every rank must skip it (the flag is reduced).
NAN_STEP = 2


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)]
    return torch.nn.Sequential(*layers).double()


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(8, 6, generator=generator, dtype=torch.float64)
    return x, torch.randn(8, 1, generator=generator, dtype=torch.float64)


def _train(model, optimizer, steps, rank: int | None, *, nan: str | None = None) -> None:
    """``nan="rank1"``: a NaN in rank 1's gradient only (its FSDP2 shard); ``"all"``: in
    every rank's gradient (DDP's gradients are equal on all ranks after the all-reduce)."""
    for step in steps:
        x, y = _batch(step)
        x, y = rank_share(x, y, rank, WORLD)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if nan is not None and step == NAN_STEP and (nan == "all" or rank in (None, 1)):
            grad = next(model.parameters()).grad
            local = grad.to_local() if hasattr(grad, "to_local") else grad
            local[0, 0] = float("nan")  # rank 1's shard under FSDP2 (rank 1's copy under DDP)
        optimizer.step()


def _checkpoints(rank: int, out_dir: str) -> dict[str, bool]:
    """FSDP2 + DCP: save after 2 steps, load into a fresh model/optimizer, 2 more steps."""
    results = {}
    for name in ("lamb", "alto", "adabelief", "e-lamb"):
        for how in ("sharded", "full", "dcp"):
            model = wrap(_model(), "fsdp2")
            optimizer = OPTIMIZERS[name](model.parameters())
            _train(model, optimizer, range(2), rank)
            resumed_model = wrap(_model(), "fsdp2")
            resumed = OPTIMIZERS[name](resumed_model.parameters())
            resumed_model.load_state_dict(model.state_dict())
            move_optimizer_state(model, optimizer, resumed_model, resumed, how,
                                 os.path.join(out_dir, f"ckpt-{name}-{how}"))
            _train(model, optimizer, range(2, 4), rank)
            _train(resumed_model, resumed, range(2, 4), rank)
            results[f"{name}-{how}"] = all(
                torch.equal(full(a), full(b))
                for a, b in zip(model.parameters(), resumed_model.parameters())
            )
    return results


def _worker(rank: int, out_dir: str) -> None:
    with gloo_group(rank, WORLD, out_dir), counted_all_reduce() as sent:
        results: dict[str, object] = {}
        for name, wrapper in CASES:
            model = wrap(_model(), wrapper)
            optimizer = OPTIMIZERS[name](model.parameters())
            nan = None
            if name.endswith("nonfinite"):
                nan = "rank1" if wrapper == "fsdp2" else "all"
            threshold = first_order.FUSED_MIN_NUMEL
            if name == "lamb-fused":
                first_order.FUSED_MIN_NUMEL = 1
            sent.clear()
            try:
                _train(model, optimizer, range(STEPS), rank, nan=nan)
            finally:
                first_order.FUSED_MIN_NUMEL = threshold
            params = [p for group in optimizer.param_groups for p in group["params"]]
            results[f"{name}-{wrapper}"] = [full(p) for p in params]
            results[f"{name}-{wrapper}-local"] = [
                tuple(p.to_local().shape if hasattr(p, "to_local") else p.shape) for p in params
            ]
            results[f"{name}-{wrapper}-sent"] = list(sent)
        results["checkpoints"] = _checkpoints(rank, out_dir)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    # One spawn for every case: starting two processes costs more than the training.
    out_dir = tmp_path_factory.mktemp("first_order_distributed")
    mp.spawn(_worker, args=(str(out_dir),), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize(("name", "wrapper"), CASES, ids=[f"{n}-{w}" for n, w in CASES])
def test_matches_one_process_on_the_full_batch(ranks, name, wrapper):
    """float64; rtol 1e-10: the runs differ only in the order of the gradient and norm sums
    (ulps), while a trust ratio of shard norms instead of whole-parameter norms moves the
    parameters by ~1e-3 after one step. Under FSDP2 the gathered parameters are the same on
    both ranks by construction; under DDP each rank's copy is checked."""
    model = _model()
    optimizer = OPTIMIZERS[name](model.parameters())
    params = [p for group in optimizer.param_groups for p in group["params"]]
    start = [p.detach().clone() for p in params]
    _train(model, optimizer, range(STEPS), None, nan="all" if name.endswith("nonfinite") else None)
    for rank in ranks:
        assert len(rank[f"{name}-{wrapper}"]) == len(params)
        for got, want, init in zip(rank[f"{name}-{wrapper}"], params, start):
            assert not torch.equal(want.detach(), init)  # the run moved every parameter
            torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)
    for a, b in zip(ranks[0][f"{name}-{wrapper}"], ranks[1][f"{name}-{wrapper}"]):
        assert torch.equal(a, b), "the ranks disagree"


def test_hsdp_replicates_and_fsdp2_shards(ranks):
    """The wrappers are what they say: HSDP's 2 × 1 mesh leaves each rank whole parameters
    (a shard group of one rank), FSDP2 splits them over the two ranks."""
    for rank in ranks:
        for name, wrapper in CASES:
            local = rank[f"{name}-{wrapper}-local"]
            whole = [tuple(p.shape) for p in rank[f"{name}-{wrapper}"]]
            if wrapper == "hsdp":
                assert local == whole, name
            elif wrapper == "fsdp2":
                assert local != whole, name


def test_fsdp2_checkpoints_resume_bit_exactly(ranks):
    """Sharded and full optimizer state dicts and DCP save/load, each followed by 2 steps:
    the resumed FSDP2 run equals the uninterrupted one bit for bit on every rank."""
    for rank in ranks:
        failed = sorted(k for k, ok in rank["checkpoints"].items() if not ok)
        assert not failed, failed
        assert len(rank["checkpoints"]) == 12


def test_trust_ratio_communication(ranks):
    """What the optimizers all-reduce per step under FSDP2 (4 float64 parameter tensors):
    Lamb/ALTO/E(Lamb) one call of 2 scalars per tensor (4 × 2 × 8 = 64 bytes); the
    single-tensor path one call of 2 scalars per tensor; AdaBelief nothing; the skip flag
    one more float32 scalar. Under DDP the optimizers all-reduce nothing."""
    per_step = {
        "lamb": [64], "alto": [64], "e-lamb": [64], "lamb-fused": [64],
        "lamb-paper-clip": [64], "adabelief": [], "alto-single": [16] * 4,
        "lamb-single": [16] * 4, "lamb-skip-nonfinite": [4, 64],
    }
    for rank in ranks:
        for name, calls in per_step.items():
            assert rank[f"{name}-fsdp2-sent"] == calls * STEPS, name
            if (name, "ddp") in CASES:
                assert rank[f"{name}-ddp-sent"] == [], name
