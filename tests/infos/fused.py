"""Entries that take the compiled (``fused=True``) paths: E(AdamW), Lamb and ALTO.

The compiled kernels run only on tensors of at least ``adaptor.replacement.FUSED_MIN_NUMEL``
(65536) elements; smaller ones take the foreach path. The other entries of the table are far
below that size, so without these entries the fused path — the default on CUDA — would never
run under the generic tests (meta device, host-read probe, resume, copies, hooks, bad state
dicts, non-finite steps). Each entry mixes two large tensors with small ones, so that the
compiled and the foreach halves of one step both run: E's fast path leaves every small tensor
to the generic path; Lamb and ALTO take small contiguous ones along in their compiled calls
and leave the one-element tensor to the foreach path.

Compiling takes seconds per kernel on CPU: ``fused_compile=True`` limits these entries to the
float32 tests and puts their tests in one xdist group (one worker compiles each kernel).

``build(params, **overrides)`` takes the contract's ``state_dtype=``, ``skip_nonfinite=`` and
``kahan=``: for ``E`` over torch's AdamW the first two go to ``E`` and ``kahan`` is dropped
(torch's AdamW writes the parameters); Lamb and ALTO take all three.
"""

from __future__ import annotations

import torch

from adaptor import E
from adaptor.replacement import FUSED_MIN_NUMEL
from backends.first_order import ALTO, Lamb
from tests.optim_db import OptimizerInfo

# Two large tensors (256·256 and 320·256 elements) and three small ones, one of them of a
# single element (the foreach path under Lamb and ALTO too); the param-group test splits
# them [:2] / [2:], a large and a small one in each group.
SHAPES = ((256, 256), (256,), (320, 256), (64,), (1,))
assert sum(1 for s in SHAPES if torch.Size(s).numel() >= FUSED_MIN_NUMEL) == 2

_E_KEYS = ("state_dtype", "skip_nonfinite")


def _adamw(params, lr=1e-2, **kw):
    return torch.optim.AdamW(params, lr=lr, weight_decay=1e-2, foreach=True, **kw)


def _explored_adamw(params, alpha=-5.0, beta=0.99, fused=True, **overrides):
    adaptor_kwargs = {key: overrides.pop(key) for key in _E_KEYS if key in overrides}
    overrides.pop("kahan", None)  # torch's AdamW owns the parameter writes
    return E(_adamw(params, **overrides), alpha=alpha, beta=beta, fused=fused, **adaptor_kwargs)


def _lamb(params, lr=1e-2, **kw):
    kw.setdefault("weight_decay", 1e-2)
    kw.setdefault("fused", True)
    return Lamb(params, lr=lr, **kw)


def _alto(params, lr=1e-2, alpha=-5.0, **kw):
    kw.setdefault("fused", True)
    return ALTO(params, lr=lr, alpha=alpha, **kw)


def _alto_base(params, lr=1e-2, **kw):
    """ALTO's Lamb (β₂ = 0.9, β₃ = 0.99, λ = 1e-4), fused, without the replacement."""
    kw.setdefault("weight_decay", 1e-4)
    kw.setdefault("fused", True)
    return Lamb(params, lr=lr, betas=(0.9, 0.99), **kw)


def _bad_fused(make, owner):
    return (
        lambda params: make(params, fused="yes"),
        TypeError,
        rf"{owner}fused must be True, False or None",
    )


INFOS = [
    OptimizerInfo(
        name="E(AdamW)-fused-large",
        build=_explored_adamw,
        base=_adamw,
        fused_compile=True,
        shapes=SHAPES,
        invalid=(
            _bad_fused(_explored_adamw, ""),
            (lambda params: _explored_adamw(params, alpha=-100.0), ValueError,
             r"\|alpha\| < 1/\(1-beta\)"),
        ),
    ),
    OptimizerInfo(
        name="Lamb-fused-large",
        build=_lamb,
        fused_compile=True,
        shapes=SHAPES,
        group_override={"lr": 3e-3, "weight_decay": 0.0, "trust_clip": (0.0, 2.0)},
        invalid=(_bad_fused(_lamb, "Lamb: "),),
    ),
    OptimizerInfo(
        name="ALTO-fused-large",
        build=_alto,
        base=_alto_base,
        fused_compile=True,
        shapes=SHAPES,
        group_override={"lr": 3e-3, "weight_decay": 0.0},
        invalid=(_bad_fused(_alto, "ALTO: "),),
    ),
]
