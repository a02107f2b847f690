"""The adaptor E over AdamW beside torch's AdamW and the reference package's E."""

from __future__ import annotations

import torch

from adaptor import E
from benchmarks.harness import Row, Suite


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-3, foreach=True)


def _reference_e(params):
    from E import E as ReferenceE  # the paper's package, e-optimizer-adaptor

    return ReferenceE(_adamw(params), alpha=-5, beta=0.99)


SUITE = Suite(
    name="core: E(AdamW)",
    baseline=Row("torch AdamW(foreach=True)", _adamw),
    rows=[
        Row("ours E(AdamW) fused", lambda params: E(_adamw(params), fused=True)),
        Row("ours E(AdamW) foreach", lambda params: E(_adamw(params), fused=False)),
        Row("reference E(AdamW) (e-optimizer-adaptor)", _reference_e),
    ],
    notes=["state B/param B includes AdamW's own 2.0; the adaptor's share is the excess"],
)
