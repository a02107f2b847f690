"""Entries for the matrix backend: Muon (with its internal AdamW) and E(Muon)."""

from __future__ import annotations

import torch

from adaptor import E
from backends.matrix import Muon
from tests.optim_db import OptimizerInfo

# The tests' problems are tiny and steps are few: float32 Newton–Schulz keeps the numbers
# meaningful, and one entry keeps the default bfloat16.
_SETTINGS = {"lr": 2e-2, "weight_decay": 1e-2, "adamw_lr": 1e-2, "adamw_weight_decay": 1e-2}


def _muon(params, **overrides):
    return Muon(params, **{**_SETTINGS, "ns_dtype": torch.float32, **overrides})


def _muon_bf16(params, **overrides):
    return Muon(params, **{**_SETTINGS, **overrides})


def _muon_matrices(params, **overrides):
    return Muon(params, **{**_SETTINGS, "use_muon": True, **overrides})


def _muon_unbatched(params, **overrides):
    return _muon(params, batched=False, nesterov=False, adjust_lr_fn="match_rms_adamw", **overrides)


_MUON_INVALID = (
    (lambda params: _muon(params, lr=-1.0), ValueError,
     r"^Muon: invalid lr=-1.0, must satisfy 0 <= lr < inf$"),
    (lambda params: _muon(params, lr=float("inf")), ValueError, r"must satisfy 0 <= lr < inf"),
    (lambda params: _muon(params, lr="0.1"), TypeError, r"^Muon: lr must be a real number"),
    (lambda params: _muon(params, momentum=1.0), ValueError,
     r"invalid momentum=1.0, must satisfy 0 <= momentum < 1"),
    (lambda params: _muon(params, weight_decay=-0.1), ValueError,
     r"invalid weight_decay=-0.1, must satisfy 0 <= weight_decay < inf"),
    (lambda params: _muon(params, eps=0.0), ValueError, r"invalid eps=0.0, must satisfy 0 < eps"),
    (lambda params: _muon(params, ns_steps=0), ValueError,
     r"invalid ns_steps=0, must be an int with 1 <= ns_steps <= 100"),
    (lambda params: _muon(params, ns_steps=101), ValueError,
     r"invalid ns_steps=101, must be an int with 1 <= ns_steps <= 100"),
    (lambda params: _muon(params, ns_steps=5.0), TypeError, r"ns_steps must be an int, got float"),
    (lambda params: _muon(params, ns_coefficients=(1.0, 2.0)), ValueError,
     r"ns_coefficients must be a tuple of 3 numbers \(a, b, c\), got \(1.0, 2.0\)"),
    (lambda params: _muon(params, ns_coefficients=(1.0, 2.0, float("nan"))), ValueError,
     r"ns_coefficients\[2\] must not be NaN"),
    (lambda params: _muon(params, ns_coefficients=(1.0, float("-inf"), 2.0)), ValueError,
     r"invalid ns_coefficients\[1\]=-inf, must satisfy -inf < ns_coefficients\[1\] < inf"),
    (lambda params: _muon(params, adjust_lr_fn="rms"), ValueError,
     r"invalid adjust_lr_fn='rms', must be one of 'original', 'match_rms_adamw'"),
    (lambda params: _muon(params, ns_dtype=torch.int32), TypeError,
     r"ns_dtype must be a floating torch.dtype, got torch.int32"),
    (lambda params: _muon(params, adamw_lr=-1.0), ValueError,
     r"invalid adamw_lr=-1.0, must satisfy 0 <= adamw_lr < inf"),
    (lambda params: _muon(params, adamw_betas=(0.9, 1)), ValueError,
     r"invalid adamw_betas\[1\]=1, must satisfy 0 <= adamw_betas\[1\] < 1"),
    (lambda params: _muon(params, adamw_betas=(0.9,)), ValueError,
     r"adamw_betas must be a tuple of 2 numbers \(β₁, β₂\)"),
    (lambda params: _muon(params, adamw_eps=-1.0), ValueError,
     r"invalid adamw_eps=-1.0, must satisfy 0 <= adamw_eps < inf"),
    (lambda params: _muon(params, adamw_weight_decay=-1.0), ValueError,
     r"invalid adamw_weight_decay=-1.0, must satisfy 0 <= adamw_weight_decay < inf"),
    (lambda params: _muon(params, nesterov=None), TypeError, r"nesterov must be True or False"),
    (lambda params: _muon(params, batched=1), TypeError, r"batched must be True or False"),
    (lambda params: _muon(params, use_muon="yes"), TypeError,
     r"use_muon must be True, False or None, got 'yes'"),
    # matrices only, but the model has vectors (and an all-1-D model: nothing to orthogonalise)
    (lambda params: _muon(params, use_muon=True), ValueError, r"use_muon=True .* shape \(6,\)"),
    (
        lambda params: _muon([p for p in params if p.dim() == 1], use_muon=True),
        ValueError,
        r"orthogonalises matrices only.*parameter 0 of param group 0 has shape \(6,\)",
    ),
    (
        lambda params: _muon([{"params": params[:1]}, {"params": params[1:], "lr": -2.0}]),
        ValueError,
        r"^Muon \(param group 1\): invalid lr=-2.0, must satisfy 0 <= lr < inf$",
    ),
)


_ADAPTOR_OPTIONS = ("state_dtype", "skip_nonfinite")


def _explored(params, alpha=-5.0, beta=0.99, **overrides):
    """E(Muon): ``state_dtype``/``skip_nonfinite`` go to E, everything else (``kahan``) to Muon."""
    adaptor = {key: overrides.pop(key) for key in _ADAPTOR_OPTIONS if key in overrides}
    return E(_muon(params, **overrides), alpha=alpha, beta=beta, **adaptor)


_EXPLORED_INVALID = (
    (lambda params: _explored(params, alpha=-100.0), ValueError, r"\|alpha\| < 1/\(1-beta\)"),
    (lambda params: _explored(params, beta=1.0), ValueError, r"0 <= beta < 1"),
    (lambda params: _explored(params, lr=-1.0), ValueError,
     r"Muon: invalid lr=-1.0, must satisfy 0 <= lr < inf"),
)

_GROUP_OVERRIDE = {"lr": 3e-3, "adamw_lr": 2e-3, "momentum": 0.9}

INFOS = [
    OptimizerInfo(
        name="Muon",
        build=_muon,
        supports_complex=False,
        group_override=_GROUP_OVERRIDE,
        invalid=_MUON_INVALID,
    ),
    OptimizerInfo(
        name="Muon-bf16",
        build=_muon_bf16,
        supports_complex=False,
        group_override=_GROUP_OVERRIDE,
        invalid=_MUON_INVALID[:1],
    ),
    OptimizerInfo(
        name="Muon-matrices-only",
        build=_muon_matrices,
        supports_complex=False,
        matrix_only=True,
        group_override=_GROUP_OVERRIDE,
        invalid=_MUON_INVALID[:1],
    ),
    OptimizerInfo(
        name="Muon-unbatched",
        build=_muon_unbatched,
        supports_complex=False,
        group_override=_GROUP_OVERRIDE,
        invalid=_MUON_INVALID[:1],
    ),
    OptimizerInfo(  # the masked (snapshot/restore) path and the skip counter in checkpoints
        name="Muon-skip-nonfinite",
        build=lambda params, **overrides: _muon(params, **{"skip_nonfinite": True, **overrides}),
        supports_complex=False,
        group_override=_GROUP_OVERRIDE,
        invalid=(
            (lambda params: _muon(params, skip_nonfinite=1), TypeError,
             r"skip_nonfinite must be True or False"),
            (lambda params: _muon(params, kahan="yes"), TypeError, r"kahan must be True or False"),
            (lambda params: _muon(params, state_dtype=torch.int8), TypeError,
             r"state_dtype must be None or a floating torch.dtype"),
        ),
    ),
    OptimizerInfo(
        name="E(Muon)",
        build=_explored,
        base=_muon,
        supports_complex=False,
        group_override=_GROUP_OVERRIDE,
        invalid=_EXPLORED_INVALID,
    ),
]
