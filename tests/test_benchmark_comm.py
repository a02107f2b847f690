"""``benchmarks/comm.py``: bytes per step measured on 2 gloo ranks, and the ring projection.

The payloads of E(AdamW) and SPSA+E are checked against counts written here from the
algorithms (tiny MLPs, float32): DDP all-reduces every gradient once (``4P`` bytes, added
from the parameter sizes, the optimizer itself sends nothing); FSDP2 all-gathers every
parameter in the forward and again in the backward (``2·4P``) and reduce-scatters the
gradients (``4P``); SPSA with one sample all-reduces its two float32 loss values (8 B) and,
under FSDP2, gathers the parameters for each of its two forward passes (``2·4P``).
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch.distributed as dist

from benchmarks import comm

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing"),
    pytest.mark.xdist_group("torch_distributed"),
]


def _params(width: int, hidden: int) -> int:
    """Linear(8, w), ``hidden`` × Linear(w, w), Linear(w, 4): weights and biases."""
    return (8 * width + width) + hidden * (width * width + width) + (width * 4 + 4)


def test_measured_bytes_and_projection():
    results = comm.measure(["E(AdamW)", "SPSA+E"])
    for index, (width, hidden) in enumerate(comm.FIT_SHAPES):
        grads = 4 * _params(width, hidden)
        assert results["E(AdamW)|ddp"][index] == {"all_reduce": grads}
        assert results["E(AdamW)|fsdp2"][index] == {"all_gather": 2 * grads,
                                                     "reduce_scatter": grads}
        assert results["SPSA+E|ddp"][index] == {"all_reduce": 8}
        assert results["SPSA+E|fsdp2"][index] == {"all_gather": 2 * grads, "all_reduce": 8}

    # the fit S = a·4P + c·T + d recovers the per-byte and per-step parts exactly
    assert comm.fit(results["E(AdamW)|ddp"]) == {"all_reduce": (1, 0, 0)}
    assert comm.fit(results["SPSA+E|ddp"]) == {"all_reduce": (0, 0, 8)}
    # ring volumes per rank: all-reduce 2(N-1)/N·S, all-gather / reduce-scatter (N-1)/N·S
    params, tensors = 1_000_000, 10
    for n in (2, 8, 1024):
        ddp = comm.sent_per_rank(comm.fit(results["E(AdamW)|ddp"]), params, tensors, n)
        assert ddp == pytest.approx(2 * (n - 1) / n * 4 * params, rel=1e-12)
        fsdp = comm.sent_per_rank(comm.fit(results["E(AdamW)|fsdp2"]), params, tensors, n)
        assert fsdp == pytest.approx(3 * (n - 1) / n * 4 * params, rel=1e-12)
        spsa = comm.sent_per_rank(comm.fit(results["SPSA+E|ddp"]), params, tensors, n)
        assert spsa == pytest.approx(2 * (n - 1) / n * 8, rel=1e-12)

    text = comm.report({**results, "Muon|fsdp2": "RuntimeError: not sharded yet"})
    assert "| Muon | fsdp2 | n/a (not yet) | n/a (not yet) |" in text
    assert "| E(AdamW) | ddp | all_reduce 1936 B | 1936 B |" in text  # 484 parameters


def test_ring_factors():
    assert comm.RING_FACTOR["all_reduce"](8) == Fraction(14, 8)
    assert comm.RING_FACTOR["all_gather"](8) == Fraction(7, 8)
    assert comm.RING_FACTOR["reduce_scatter"](1024) == Fraction(1023, 1024)
