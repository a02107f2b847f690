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
    (lambda params: _muon(params, lr=-1.0), ValueError, r"lr must satisfy lr >= 0"),
    (lambda params: _muon(params, momentum=1.0), ValueError, r"0 <= momentum < 1"),
    (lambda params: _muon(params, weight_decay=-0.1), ValueError, r"weight_decay >= 0"),
    (lambda params: _muon(params, ns_steps=0), ValueError, r"1 <= ns_steps <= 100"),
    (lambda params: _muon(params, ns_coefficients=(1.0, 2.0)), ValueError, r"ns_coefficients"),
    (lambda params: _muon(params, adjust_lr_fn="rms"), ValueError, r"adjust_lr_fn must be one of"),
    (lambda params: _muon(params, ns_dtype=torch.int32), TypeError, r"ns_dtype must be a floating"),
    (lambda params: _muon(params, adamw_betas=(0.9, 1)), ValueError, r"0 <= adamw_betas\[1\] < 1"),
    (lambda params: _muon(params, adamw_eps=-1.0), ValueError, r"adamw_eps >= 0"),
    (lambda params: _muon(params, use_muon="yes"), TypeError, r"use_muon must be None"),
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
        r"lr >= 0.*param group 1",
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
    (lambda params: _explored(params, lr=-1.0), ValueError, r"lr must satisfy lr >= 0"),
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
