"""Lamb, AdaBelief and ALTO beside pytorch-optimizer's and the paper's reference package.

Every row uses the same settings where the optimizers allow it (lr 1e-3, weight decay
1e-4; ALTO with the paper's alpha=-5, beta=0.99, betas=(0.9, 0.99)). The reference ALTO clips
the global gradient norm at 1.0 on every step (it cannot be turned off); our rows do not clip
(the paper's algorithm has no clipping), so a row "ours ALTO + clip 1.0" shows that cost too.
"""

from __future__ import annotations

import torch

from backends.first_order import ALTO, AdaBelief, Lamb
from benchmarks.harness import Row, Suite
from benchmarks.twins import TrafficTwin

LR = 1e-3
WD = 1e-4
REFERENCE_BETAS = (0.99, 0.9, 0.99)  # its default (0.1, ...) violates |α| < 1/(1-β)


def _adamw(params):
    return torch.optim.AdamW(params, lr=LR, weight_decay=WD, foreach=True)


def _adamw_fused(params):
    return torch.optim.AdamW(params, lr=LR, weight_decay=WD, fused=True)


def _peer_lamb(params):
    from pytorch_optimizer import Lamb as PeerLamb

    return PeerLamb(params, lr=LR, weight_decay=WD, foreach=True)


def _peer_adabelief(params):
    from pytorch_optimizer import AdaBelief as PeerAdaBelief

    return PeerAdaBelief(params, lr=LR, weight_decay=WD, foreach=True)


def _reference_alto(params):
    from ALTO import ALTO as ReferenceALTO  # the paper's package, e-optimizer-adaptor

    return ReferenceALTO(
        params, lr=LR, betas=REFERENCE_BETAS, alp=-5, eps=1e-6, weight_decay=WD
    )


def _alto(**kw):
    return lambda params: ALTO(
        params, lr=LR, betas=(0.9, 0.99), alpha=-5.0, beta=0.99, weight_decay=WD, **kw
    )


def _bf16(make):
    """``make`` on bfloat16 copies of the model's parameters (float32 state by default), each
    with a bfloat16 copy of the harness's gradient; ``_bf16_step`` restores those gradients
    (ALTO's foreach path leaves g̃ in ``p.grad``) with a bf16 copy, a small part of a step's
    traffic."""

    def build(params):
        twins = [p.detach().to(torch.bfloat16).requires_grad_() for p in params]
        grads = [p.grad.to(torch.bfloat16) for p in params]
        optimizer = make(twins)
        optimizer._bench_grads = list(zip(twins, grads))  # type: ignore[attr-defined]
        return optimizer

    return build


def _bf16_step(optimizer, _params):
    for twin, grad in optimizer._bench_grads:
        if twin.grad is None:
            twin.grad = grad.clone()
        else:
            twin.grad.copy_(grad)
    optimizer.step()


FUSED_ADAMW = "torch AdamW(fused=True)"

SUITE = Suite(
    name="first_order: Lamb, AdaBelief, ALTO",
    baseline=Row("torch AdamW(foreach=True)", _adamw, floor=7),
    rows=[
        Row(FUSED_ADAMW, _adamw_fused, floor=7),
        Row("ours Lamb foreach", lambda p: Lamb(p, lr=LR, weight_decay=WD)),
        Row("ours Lamb fused (compiled)", lambda p: Lamb(p, lr=LR, weight_decay=WD, fused=True),
            versus=FUSED_ADAMW, floor=10),
        Row("pytorch-optimizer Lamb (foreach)", _peer_lamb),
        Row("ours AdaBelief foreach", lambda p: AdaBelief(p, lr=LR, weight_decay=WD)),
        Row("pytorch-optimizer AdaBelief (foreach)", _peer_adabelief),
        Row("ours ALTO foreach", _alto()),
        Row("ours ALTO single-tensor", _alto(foreach=False)),
        Row("ours ALTO fused (compiled)", _alto(fused=True), versus=FUSED_ADAMW, floor=12),
        Row("traffic twin of AdamW: copies, 4 read + 3 written",
            lambda p: TrafficTwin(p, (("p g m v", "p m v"),)), versus=FUSED_ADAMW, floor=7),
        Row("traffic twin of ALTO: copies, 5+3 then 3+1",
            lambda p: TrafficTwin(p, (("p g c m v", "c m v"), ("p m v", "p"))),
            versus=FUSED_ADAMW, floor=12),
        Row("ours ALTO fused + clip 1.0", _alto(fused=True, max_grad_norm=1.0)),
        Row("ours ALTO fused + skip_nonfinite", _alto(fused=True, skip_nonfinite=True)),
        Row("ours ALTO foreach + skip_nonfinite", _alto(skip_nonfinite=True)),
        Row("ours ALTO bf16 params, f32 state", _bf16(_alto()), step=_bf16_step),
        Row("ours ALTO bf16 params, f32 state, kahan", _bf16(_alto(kahan=True)),
            step=_bf16_step),
        Row("ours ALTO fused bf16 params, f32 state", _bf16(_alto(fused=True)), step=_bf16_step),
        Row("reference ALTO (e-optimizer-adaptor)", _reference_alto),
    ],
    models=("mlp16m", "blocks12", "small200"),
    notes=[
        "state B/param B: AdamW, Lamb and AdaBelief keep 2.0; ALTO 3.0 (m, v and the "
        "adaptor's one buffer); the reference ALTO 6.0",
        "fused rows compile on their first (warm-up) steps; the times are after compiling",
        "traffic floor (parameter-sized arrays read + written per step): torch AdamW(fused) 7 "
        "(reads θ, g, m, v; writes θ, m, v); ours Lamb fused 10 and ALTO fused 12 (pass 1 "
        "reads θ, g, [c,] m, v and writes [c,] m, v; pass 2 reads θ, m, v and writes θ), so "
        "1.43 × and 1.71 × torch AdamW(fused=True) are the floors of those ratios (x versus)",
        "traffic twins: inductor copy kernels that read and write exactly the arrays of torch "
        "AdamW's fused step (one pass) or of ALTO's two passes, on the large tensors, four "
        "per call: their x versus is what the traffic alone costs on this machine, beside the "
        "counted floor (an optimizer at its twin's ratio is at the machine's floor)",
        "the reference ALTO always clips the global gradient norm at 1.0",
        "skip_nonfinite rows: the non-finite check (one read of every gradient) and masked "
        "writes (torch.where in the fused kernels; a snapshot/restore on the foreach path)",
        "bf16 rows: parameters and gradients in bfloat16, m, v and the buffer in float32 "
        "(state_dtype=None); state B/param B is per byte of the float32 model (3.0 = 6 bytes "
        "per bf16 parameter byte); kahan adds a bf16 compensation buffer (+0.5)",
    ],
)
