"""Lamb, AdaBelief and ALTO beside pytorch-optimizer's and the paper's reference package.

Every row uses the same settings where the optimizers allow it (lr 1e-3, weight decay
1e-4; ALTO with the paper's betas=(0.99, 0.9, 0.99), alpha=-5). The reference ALTO clips
the global gradient norm at 1.0 on every step (it cannot be turned off); our rows do not clip
(the paper's algorithm has no clipping), so a row "ours ALTO + clip 1.0" shows that cost too.
"""

from __future__ import annotations

import torch

from backends.first_order import ALTO, AdaBelief, Lamb
from benchmarks.harness import Row, Suite

LR = 1e-3
WD = 1e-4
ALTO_BETAS = (0.99, 0.9, 0.99)  # the reference class's default (0.1, ...) violates |α| < 1/(1-β)


def _adamw(params):
    return torch.optim.AdamW(params, lr=LR, weight_decay=WD, foreach=True)


def _peer_lamb(params):
    from pytorch_optimizer import Lamb as PeerLamb

    return PeerLamb(params, lr=LR, weight_decay=WD, foreach=True)


def _peer_adabelief(params):
    from pytorch_optimizer import AdaBelief as PeerAdaBelief

    return PeerAdaBelief(params, lr=LR, weight_decay=WD, foreach=True)


def _reference_alto(params):
    from ALTO import ALTO as ReferenceALTO  # the paper's package, e-optimizer-adaptor

    return ReferenceALTO(params, lr=LR, betas=ALTO_BETAS, alp=-5, eps=1e-6, weight_decay=WD)


def _alto(**kw):
    return lambda params: ALTO(params, lr=LR, betas=ALTO_BETAS, alpha=-5.0, weight_decay=WD, **kw)


SUITE = Suite(
    name="first_order: Lamb, AdaBelief, ALTO",
    baseline=Row("torch AdamW(foreach=True)", _adamw),
    rows=[
        Row("ours Lamb foreach", lambda p: Lamb(p, lr=LR, weight_decay=WD)),
        Row("ours Lamb fused (compiled)", lambda p: Lamb(p, lr=LR, weight_decay=WD, fused=True)),
        Row("pytorch-optimizer Lamb (foreach)", _peer_lamb),
        Row("ours AdaBelief foreach", lambda p: AdaBelief(p, lr=LR, weight_decay=WD)),
        Row("pytorch-optimizer AdaBelief (foreach)", _peer_adabelief),
        Row("ours ALTO foreach", _alto()),
        Row("ours ALTO single-tensor", _alto(foreach=False)),
        Row("ours ALTO fused (compiled)", _alto(fused=True)),
        Row("ours ALTO fused + clip 1.0", _alto(fused=True, max_grad_norm=1.0)),
        Row("reference ALTO (e-optimizer-adaptor)", _reference_alto),
    ],
    notes=[
        "state B/param B: AdamW, Lamb and AdaBelief keep 2.0; ALTO 3.0 (m, v and the "
        "adaptor's one buffer); the reference ALTO 6.0",
        "fused rows compile on their first (warm-up) steps; the times are after compiling",
        "the reference ALTO always clips the global gradient norm at 1.0",
    ],
)
