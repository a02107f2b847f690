"""SPSA under torch.distributed (gloo, two CPU processes): only loss values are communicated.

DDP and FSDP2 (``fully_shard``: DTensor parameters, each rank perturbs its own rows).

Each rank evaluates the loss on its half of the batch along the same direction ``Δ`` (same
seed and step on every rank); ``SPSA`` all-reduces the ``2 × samples`` loss values and every
rank forms the same gradient estimate. The result must match one process on the whole batch
(the loss is a mean over equal halves, so the mean of the ranks' losses is the full-batch
loss), with and without a ``DistributedDataParallel`` wrapper (the estimator runs under
``no_grad``: DDP's gradient hooks never fire), and the ranks must agree bit for bit.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from adaptor import explore
from backends import SPSA
from tests.distributed import counted_all_reduce, full, gloo_group, rank_share, wrap

STEPS = 4
WORLD = 2
# (name, SPSA keyword arguments, wrapper: None, "ddp" or "fsdp2")
CASES = (
    ("plain-1", {"samples": 1}, None),
    ("plain-3-gaussian", {"samples": 3, "distribution": "gaussian", "chunk": 50}, None),
    ("ddp-1", {"samples": 1}, "ddp"),
    # FSDP2: each rank perturbs its shard (rows) with the values of the whole parameter's
    # stream; blocks of 50 elements do not align with the 64-element shards of the 16×8 weight
    ("fsdp2-1", {"samples": 1}, "fsdp2"),
    ("fsdp2-2-gaussian-blocks", {"samples": 2, "distribution": "gaussian", "chunk": 50},
     "fsdp2"),
    ("fsdp2-exact", {"samples": 1, "exact_restore": True}, "fsdp2"),
    ("local", {"samples": 1, "process_group": False}, None),  # no averaging: ranks diverge
)

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing"),
    # with --dist loadgroup: one worker runs the multi-process tests of this group in turn
    pytest.mark.xdist_group("torch_distributed"),
]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)]
    return torch.nn.Sequential(*layers).double()


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(8, 8, generator=generator, dtype=torch.float64)
    return x, torch.randn(8, 2, generator=generator, dtype=torch.float64)


def _optimizer(model, spsa_kwargs):
    spsa = SPSA(perturbation=1e-3, seed=5, **spsa_kwargs)
    return explore(spsa, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                   alpha=0.5, beta=0.01)


def _train(model, optimizer, rank: int | None) -> list[torch.Tensor]:
    losses = []
    for step in range(STEPS):
        x, y = _batch(step)
        x, y = rank_share(x, y, rank, WORLD)
        losses.append(optimizer.step(lambda x=x, y=y: torch.nn.functional.mse_loss(model(x), y)))
    return losses


def _worker(rank: int, out_dir: str) -> None:
    with gloo_group(rank, WORLD, out_dir), counted_all_reduce() as sent:
        results = {}
        for name, spsa_kwargs, wrapper in CASES:
            model = wrap(_model(), wrapper)
            optimizer = _optimizer(model, spsa_kwargs)
            sent.clear()
            losses = _train(model, optimizer, rank)
            results[name] = {
                "params": [
                    full(p) for p in model.parameters()
                ],
                "losses": torch.stack([torch.as_tensor(v) for v in losses]),
                "bytes": sum(sent),
            }
        torch.manual_seed(rank)  # different torch seeds on purpose
        results["seeds"] = [SPSA().seed, SPSA(process_group=False).seed]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def test_ranks_agree_and_match_one_process_on_the_full_batch(tmp_path):
    """Parameters equal a one-process full-batch run (float64, rtol 1e-10) on every rank.

    The only difference is the order of the loss sums (two half means averaged against one
    full mean), a few ulps of f, divided by 2c = 2e-3 in the estimate: far below 1e-10 of the
    parameters after 4 steps. The bytes all-reduced per step are ``2 × samples × 8`` (float64
    losses), against ``4·N`` bytes of an fp32 gradient all-reduce (``N = 178`` here).
    Mutations caught: the all-reduce removed (ranks use their own halves: the parameters
    differ from the full-batch run by about 1e-3), the average left as a sum (no division by
    the world size: the estimate doubles), ``seed=None`` not broadcast (the ranks' seeds
    differ).
    """
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    start = [p.detach().clone() for p in _model().parameters()]
    for name, spsa_kwargs, _ in CASES:
        model = _model()
        spsa_kwargs = {k: v for k, v in spsa_kwargs.items() if k != "process_group"}
        losses = torch.stack(
            [torch.as_tensor(v) for v in _train(model, _optimizer(model, spsa_kwargs), None)]
        )
        if name == "local":  # the control: without averaging each rank follows its own half
            assert not all(
                torch.equal(a, b) for a, b in zip(ranks[0][name]["params"],
                                                  ranks[1][name]["params"])
            )
            assert ranks[0][name]["bytes"] == 0
            continue
        for rank in ranks:
            result = rank[name]
            for got, want, init in zip(result["params"], model.parameters(), start):
                assert not torch.equal(want.detach(), init)
                torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12, msg=name)
            torch.testing.assert_close(result["losses"], losses, rtol=1e-12, atol=0.0)
            samples = spsa_kwargs["samples"]
            assert result["bytes"] == STEPS * 2 * samples * 8, (name, result["bytes"])
        for a, b in zip(ranks[0][name]["params"], ranks[1][name]["params"]):
            assert torch.equal(a, b), f"{name}: the ranks disagree"

    # SPSA() under torch.distributed takes rank 0's seed on every rank, even when the ranks'
    # torch seeds differ; process_group=False keeps each rank's own draw.
    first, second = (rank["seeds"] for rank in ranks)
    assert first[0] == second[0]
    assert first[1] != second[1]
