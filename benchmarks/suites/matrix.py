"""Muon beside torch.optim.Muon and pytorch-optimizer's (batched) Muon.

Every row gets the same parameter set: the matrices of the model (torch.optim.Muon accepts
2-D parameters only), Newton–Schulz in bfloat16 everywhere (torch's is fixed to bfloat16).

``python -m benchmarks --suite matrix`` runs the harness's models (``mlp16m``: 4 large
matrices; ``small200``: 100 same-shaped 32×32 matrices). ``python -m benchmarks.suites.matrix``
also runs ``many64``, 200 same-shaped 64×64 matrices, a model the harness does not know yet.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from adaptor import E
from backends.matrix import Muon
from benchmarks import harness
from benchmarks.harness import Row, Suite

LR = 0.02


def _matrices(params):
    return [p for p in params if p.dim() == 2]


def _torch_muon(params):
    return torch.optim.Muon(_matrices(params), lr=LR, weight_decay=0.0)


def _ours(params, **kwargs):
    return Muon(_matrices(params), lr=LR, ns_dtype=torch.bfloat16, **kwargs)


def _pytorch_optimizer_muon(params):
    from pytorch_optimizer import Muon as PeerMuon

    # foreach=None: batches same-shaped matrices (pytorch-optimizer's batched path)
    return PeerMuon([{"params": _matrices(params), "use_muon": True}], lr=LR, foreach=None)


SUITE = Suite(
    name="matrix: Muon",
    baseline=Row("torch Muon (bf16 NS)", _torch_muon),
    rows=[
        Row("ours Muon (bf16 NS, batched)", _ours),
        Row("ours Muon (bf16 NS, unbatched)", lambda params: _ours(params, batched=False)),
        Row("ours E(Muon) (bf16 NS, batched)", lambda params: E(_ours(params))),
        Row("pytorch-optimizer Muon (batched)", _pytorch_optimizer_muon),
    ],
    models=("mlp16m", "small200", "many64"),
    notes=[
        "all rows step the model's matrices only (torch.optim.Muon takes 2-D params only)",
        "state B/param B is per byte of all the model's parameters (biases included)",
    ],
)


def _build_model(name: str) -> nn.Module:
    """``many64``: 200 same-shaped 64×64 matrices (no biases); other names: the harness's."""
    if name == "many64":
        torch.manual_seed(0)
        return nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(200)])
    return _harness_build_model(name)


_harness_build_model = harness.build_model


def main(argv: list[str] | None = None) -> int:
    """Run this suite on its three models (a local stand-in until the harness has many64)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.suites.matrix")
    parser.add_argument("--model", action="append", choices=list(SUITE.models))
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    harness.build_model = _build_model
    try:
        harness.run_suite(SUITE, args.model or list(SUITE.models), args.warmup, args.repeats)
    finally:
        harness.build_model = _harness_build_model
    return 0


if __name__ == "__main__":
    sys.exit(main())
