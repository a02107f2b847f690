"""Muon beside torch.optim.Muon and pytorch-optimizer's (batched) Muon.

Every row gets the same parameter set: the matrices of the model (torch.optim.Muon accepts
2-D parameters only), Newton–Schulz in bfloat16 everywhere (torch's is fixed to bfloat16).

``python -m benchmarks --suite matrix`` runs ``mlp16m`` (4 large matrices), ``small200``
(100 same-shaped 32×32 matrices) and ``many64`` (200 same-shaped 64×64 matrices).

Precision rows: the same matrices as bfloat16 parameters (with bfloat16 gradients) and
float32 momentum (``state_dtype=None``), with and without ``kahan=True``; their state bytes are
per byte of the float32 model (float32 momentum for bfloat16 parameters: 1.0; Kahan's bf16
buffer: +0.5). ``skip_nonfinite=True`` row: the device-side NaN/Inf check and the masked
update (snapshot of parameters and momentum, restored with ``torch.where``); compare its
median with the plain row of the same run.
"""

from __future__ import annotations

import torch

from adaptor import E
from backends.matrix import Muon
from benchmarks.harness import Row, Suite

LR = 0.02


def _matrices(params):
    return [p for p in params if p.dim() == 2]


def _torch_muon(params):
    return torch.optim.Muon(_matrices(params), lr=LR, weight_decay=0.0)


def _ours(params, **kwargs):
    return Muon(_matrices(params), lr=LR, ns_dtype=torch.bfloat16, **kwargs)


def _bf16(make):
    """``make`` over bfloat16 copies of the parameters, with bfloat16 copies of the gradients."""

    def build(params):
        low = []
        for p in _matrices(params):
            q = p.detach().to(torch.bfloat16).requires_grad_()
            q.grad = p.grad.to(torch.bfloat16)
            low.append(q)
        return make(low)

    return build


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
        Row("ours Muon skip_nonfinite=True", lambda params: _ours(params, skip_nonfinite=True)),
        Row("ours Muon bf16 params, fp32 state", _bf16(_ours)),
        Row("ours Muon bf16 params, fp32 state, kahan",
            _bf16(lambda params: _ours(params, kahan=True))),
        Row("pytorch-optimizer Muon (batched)", _pytorch_optimizer_muon),
    ],
    models=("mlp16m", "small200", "many64"),
    notes=[
        "all rows step the model's matrices only (torch.optim.Muon takes 2-D params only)",
        "state B/param B is per byte of all the model's parameters (biases included)",
    ],
)
