"""The adaptor E over AdamW beside torch's AdamW and the reference package's E.

Also E's fast path (adaptor.fastpath: the replacement and torch's AdamW / SGD update in one
compiled kernel per large tensor) against the same base alone and against the path without
it (the replacement kernel, then the base's own fused step).

Also: the cost of ``skip_nonfinite=True`` (compare each "+ skip_nonfinite" row with the row
above it: their ratio is the check's cost; goal ≤ 1.05 over ``AdamW(fused=True)``), and
bf16 parameters with the default float32 buffer against an explicit bf16 buffer.
"""

from __future__ import annotations

import torch

from adaptor import E
from benchmarks.harness import Row, Suite


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-3, foreach=True)


def _adamw_fused(params):
    return torch.optim.AdamW(params, lr=1e-3, fused=True)


def _sgd_fused(params):
    return torch.optim.SGD(params, lr=1e-3, momentum=0.9, fused=True)


def _without_fast_path(optimizer):
    """The adaptor's replacement kernel, then the base's own fused step (the path before
    adaptor.fastpath): for comparison only."""
    optimizer._fast_path = False
    return optimizer


def _reference_e(params):
    from E import E as ReferenceE  # the paper's package, e-optimizer-adaptor

    return ReferenceE(_adamw(params), alpha=-5, beta=0.99)


def _bf16(make):
    """Turn the harness's float32 parameters (and gradients) into bf16 ones, then build."""

    def build(params):
        for p in params:
            p.data = p.data.to(torch.bfloat16)
            p.grad = p.grad.to(torch.bfloat16)
        return make(params)

    return build


FOREACH = "torch AdamW(foreach=True)"
FUSED_ADAMW = "torch AdamW(fused=True)"
FUSED_SGD = "torch SGD(momentum, fused=True)"
FUSED_BF16 = "torch AdamW(fused=True) bf16 params"

SUITE = Suite(
    name="core: E(AdamW)",
    baseline=Row(FOREACH, _adamw, floor=7),
    rows=[
        Row("ours E(AdamW) fused", lambda params: E(_adamw(params), fused=True),
            versus=FOREACH, floor=9),
        Row("ours E(AdamW) foreach", lambda params: E(_adamw(params), fused=False),
            versus=FOREACH),
        Row("reference E(AdamW) (e-optimizer-adaptor)", _reference_e),
        Row(FUSED_ADAMW, _adamw_fused, floor=7),
        Row(
            "ours E(AdamW(fused=True)) fused (fast path)",
            lambda params: E(_adamw_fused(params), fused=True),
            versus=FUSED_ADAMW, floor=9,
        ),
        Row(
            "  same, fast path off",
            lambda params: _without_fast_path(E(_adamw_fused(params), fused=True)),
            versus=FUSED_ADAMW, floor=11,
        ),
        Row(
            "  + skip_nonfinite",
            lambda params: E(_adamw_fused(params), fused=True, skip_nonfinite=True),
            versus=FUSED_ADAMW, floor=10,
        ),
        Row(
            "ours E(AdamW(fused=True)) foreach",
            lambda params: E(_adamw_fused(params), fused=False),
        ),
        Row(
            "  + skip_nonfinite",
            lambda params: E(_adamw_fused(params), fused=False, skip_nonfinite=True),
        ),
        Row(FUSED_SGD, _sgd_fused, floor=5),
        Row(
            "ours E(SGD(momentum, fused)) fused (fast path)",
            lambda params: E(_sgd_fused(params), fused=True),
            versus=FUSED_SGD, floor=7,
        ),
        Row(
            "  same, fast path off",
            lambda params: _without_fast_path(E(_sgd_fused(params), fused=True)),
            versus=FUSED_SGD, floor=9,
        ),
        Row(FUSED_BF16, _bf16(_adamw_fused)),
        Row(
            "ours E(AdamW(fused)) bf16, f32 buffer",
            _bf16(lambda params: E(_adamw_fused(params), fused=True)),
            versus=FUSED_BF16,
        ),
        Row(
            "ours E(AdamW(fused)) bf16, bf16 buffer",
            _bf16(lambda params: E(_adamw_fused(params), fused=True, state_dtype=torch.bfloat16)),
            versus=FUSED_BF16,
        ),
    ],
    models=("mlp16m", "blocks12", "small200"),
    notes=[
        "state B/param B includes AdamW's own 2.0; the adaptor's share is the excess",
        "x versus: the row's time over the optimizer it wraps (same run); floor: arrays a "
        "step must read + write (fast path 9 = reads θ, g, c, m, v, writes θ, c, m, v; "
        "fast path off: + the replacement's pass over g, c; skip_nonfinite: + a read of g), "
        "in brackets over the base's floor",
        "'+ skip_nonfinite' rows: divide by the row above for the cost of the check",
        "bf16 rows: state B/param B is per bf16 parameter byte (a float32 buffer is 2.0)",
    ],
)
