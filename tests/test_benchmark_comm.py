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


def test_muon_fsdp2_exchange_shrinks_with_the_ranks():
    """Muon under FSDP2 sends its 1/N of every matrix to the owners and gets its rows back:
    per rank 2·E·b·(N−1)/N² bytes for E elements of b bytes. At 2 ranks the payload of the
    two all-to-alls is S(2) = 2·E·b/2 = E·b, so at N ranks the rank sends 2·S(2)·(N−1)/N²."""
    measured = 3000  # S(2) in bytes: E·b
    coefficients = {"all_to_all": (Fraction(0), Fraction(0), Fraction(measured))}
    for n in (2, 8, 64, 1024):
        shrinking = comm.SHRINKS_WITH_RANKS[("Muon", "fsdp2")]
        sent = comm.sent_per_rank(coefficients, 1, 1, n, shrinking)
        assert sent == pytest.approx(2 * measured * (n - 1) / n**2, rel=1e-12)
        # without the scaling the all-to-all would stay (N−1)/N·S(2)
        assert comm.sent_per_rank(coefficients, 1, 1, n) == pytest.approx(
            (n - 1) / n * measured, rel=1e-12)
