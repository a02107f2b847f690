"""Entries for the second-order backend: Shampoo and the adaptor over it."""

from __future__ import annotations

import torch

from adaptor import E
from backends.second_order import Shampoo
from tests.optim_db import OptimizerInfo

# Small enough that the generic tests (≤ 10 steps) cross several root recomputations, and
# a block size that splits the (6, 5) and (4, 6) matrices, so blocking is exercised too.
_SETTINGS = dict(
    lr=1e-2, weight_decay=1e-2, precondition_frequency=2, start_preconditioning_step=2,
    max_preconditioner_dim=4,
)


def _shampoo(params, **overrides):
    return Shampoo(params, **{**_SETTINGS, **overrides})


def _shampoo_newton(params, **overrides):
    return Shampoo(params, **{**_SETTINGS, "root_method": "newton", **overrides})


def _variant(**options):
    """``_shampoo`` with ``options`` (the generic tests' overrides still win)."""

    def build(params, **overrides):
        return _shampoo(params, **{**options, **overrides})

    return build


_SHAMPOO_INVALID = (
    (lambda params: _shampoo(params, lr=-1.0), ValueError,
     r"^Shampoo: invalid lr=-1.0, must satisfy 0 <= lr < inf$"),
    (lambda params: _shampoo(params, betas=(0.9, 1.01)), ValueError,
     r"invalid betas\[1\]=1.01, must satisfy 0 <= betas\[1\] <= 1$"),
    (lambda params: _shampoo(params, betas=(1.0, 1.0)), ValueError,
     r"invalid betas\[0\]=1.0, must satisfy 0 <= betas\[0\] < 1"),
    (lambda params: _shampoo(params, grafting_beta2=1.0), ValueError,
     r"invalid grafting_beta2=1.0, must satisfy 0 <= grafting_beta2 < 1"),
    (lambda params: _shampoo(params, reuse_eigenbasis=-1), ValueError,
     r"invalid reuse_eigenbasis=-1, must be an int with 0 <= reuse_eigenbasis$"),
    (lambda params: _shampoo(params, momentum_position="inside"), ValueError,
     r"invalid momentum_position='inside', must be one of 'before', 'after'"),
    (lambda params: _shampoo(params, keep_root_on_failure=None), TypeError,
     r"keep_root_on_failure must be True or False"),
    (lambda params: _shampoo(params, betas=(-0.1, 0.9)), ValueError,
     r"invalid betas\[0\]=-0.1, must satisfy 0 <= betas\[0\] < 1"),
    (lambda params: _shampoo(params, betas=(0.9,)), ValueError,
     r"betas must be a tuple of 2 numbers \(β₁ momentum, β₂ statistics\)"),
    (lambda params: _shampoo(params, eps=0.0), ValueError,
     r"invalid eps=0.0, must satisfy 0 < eps < inf"),
    (lambda params: _shampoo(params, matrix_eps=-1e-6), ValueError,
     r"invalid matrix_eps=-1e-06, must satisfy 0 < matrix_eps < inf"),
    (lambda params: _shampoo(params, weight_decay=-1.0), ValueError,
     r"invalid weight_decay=-1.0, must satisfy 0 <= weight_decay < inf"),
    (
        lambda params: _shampoo(params, precondition_frequency=0),
        ValueError,
        r"invalid precondition_frequency=0, must be an int with 1 <= precondition_frequency$",
    ),
    (
        lambda params: _shampoo(params, precondition_frequency=2.5),
        TypeError,
        r"precondition_frequency must be an int, got float",
    ),
    (
        lambda params: _shampoo(params, start_preconditioning_step=0),
        ValueError,
        r"invalid start_preconditioning_step=0, must be an int with 1 <= "
        r"start_preconditioning_step$",
    ),
    (
        lambda params: _shampoo(params, max_preconditioner_dim=0),
        ValueError,
        r"invalid max_preconditioner_dim=0, must be an int with 1 <= max_preconditioner_dim$",
    ),
    (lambda params: _shampoo(params, grafting="lamb"), ValueError,
     r"invalid grafting='lamb', must be one of 'adam', 'adagrad', 'sgd', 'none'"),
    (lambda params: _shampoo(params, root_method="svd"), ValueError,
     r"invalid root_method='svd', must be one of 'eigh', 'newton'"),
    (lambda params: _shampoo(params, maximize=1), TypeError, r"maximize must be True or False"),
    (
        lambda params: _shampoo([{"params": params[:1]}, {"params": params[1:], "lr": "x"}]),
        TypeError,
        r"^Shampoo \(param group 1\): lr must be a real number, got str$",
    ),
)


_ADAPTOR_OPTIONS = ("state_dtype", "skip_nonfinite")


def _explored(base_factory, name, *, alpha=-5.0, beta=0.99):
    def build(params, alpha=alpha, beta=beta, **overrides):
        # state_dtype/skip_nonfinite go to E, everything else (kahan) to Shampoo
        adaptor = {key: overrides.pop(key) for key in _ADAPTOR_OPTIONS if key in overrides}
        return E(base_factory(params, **overrides), alpha=alpha, beta=beta, **adaptor)

    invalid = (
        (lambda params: build(params, alpha=-100.0), ValueError, r"\|alpha\| < 1/\(1-beta\)"),
        (lambda params: build(params, beta=1.0), ValueError, r"0 <= beta < 1"),
        (lambda params: build(params, lr=-1.0), ValueError,
         r"Shampoo: invalid lr=-1.0, must satisfy 0 <= lr < inf"),
    )
    return OptimizerInfo(
        name=name, build=build, base=base_factory, invalid=invalid, supports_complex=False
    )


INFOS = [
    OptimizerInfo(
        name="Shampoo", build=_shampoo, supports_complex=False, invalid=_SHAMPOO_INVALID
    ),
    OptimizerInfo(
        name="Shampoo-newton",
        build=_shampoo_newton,
        supports_complex=False,
        invalid=(
            (
                lambda params: _shampoo_newton(params, newton_iterations=0),
                ValueError,
                r"invalid newton_iterations=0, must be an int with 1 <= newton_iterations$",
            ),
        ),
    ),
    OptimizerInfo(
        name="Shampoo-matrices",
        build=_shampoo,
        supports_complex=False,
        matrix_only=True,
        group_override={"lr": 3e-3, "grafting": "none"},
        invalid=(
            (
                lambda params: _shampoo(params, preconditioner_dtype="float32"),
                TypeError,
                r"preconditioner_dtype must be None or a floating torch.dtype, got 'float32'",
            ),
            (
                lambda params: _shampoo(params, preconditioner_dtype=torch.float16),
                ValueError,
                r"invalid preconditioner_dtype=torch.float16, must be None or one of "
                r"torch.float32, torch.float64",
            ),
        ),
    ),
    OptimizerInfo(  # the masked (snapshot/restore) path and the skip counter in checkpoints
        name="Shampoo-skip-nonfinite",
        build=lambda params, **overrides: _shampoo(params, **{"skip_nonfinite": True, **overrides}),
        supports_complex=False,
        invalid=(
            (lambda params: _shampoo(params, skip_nonfinite=1), TypeError,
             r"skip_nonfinite must be True or False"),
            (lambda params: _shampoo(params, kahan=None), TypeError,
             r"kahan must be True or False"),
            (lambda params: _shampoo(params, state_dtype="bf16"), TypeError,
             r"state_dtype must be None or a floating torch.dtype"),
        ),
    ),
    # issue 13's options, two entries so that the compile test adds two compilations only
    OptimizerInfo(  # EMA statistics (bias-corrected), AdaGrad grafting, momentum after the
        # preconditioner, eigenbasis reuse (full eigh every 2nd recomputation, QR between)
        name="Shampoo-ema-adagrad-after-eigenbasis",
        build=_variant(betas=(0.9, 0.99), grafting="adagrad", momentum_position="after",
                       reuse_eigenbasis=2),
        supports_complex=False,
        invalid=(
            (lambda params: _shampoo(params, grafting="rms"), ValueError,
             r"invalid grafting='rms', must be one of 'adam', 'adagrad', 'sgd', 'none'"),
            (lambda params: _shampoo(params, momentum_position="middle"), ValueError,
             r"invalid momentum_position='middle', must be one of 'before', 'after'"),
            (lambda params: _shampoo(params, reuse_eigenbasis=-1), ValueError,
             r"invalid reuse_eigenbasis=-1, must be an int with 0 <= reuse_eigenbasis"),
            (lambda params: _shampoo(params, betas=(0.9, 1.5)), ValueError,
             r"invalid betas\[1\]=1.5, must satisfy 0 <= betas\[1\] <= 1"),
        ),
    ),
    OptimizerInfo(  # SGD grafting, Newton roots, no keeping of the previous root on failure
        name="Shampoo-sgd-newton-no-keep",
        build=_variant(grafting="sgd", root_method="newton", keep_root_on_failure=False),
        supports_complex=False,
        invalid=(
            (lambda params: _shampoo(params, keep_root_on_failure=1), TypeError,
             r"keep_root_on_failure must be True or False, got 1"),
            (lambda params: _shampoo(params, grafting_beta2=1.5), ValueError,
             r"invalid grafting_beta2=1.5, must satisfy 0 <= grafting_beta2 < 1"),
        ),
    ),
    _explored(_shampoo, "E(Shampoo)"),
    _explored(_shampoo, "E(Shampoo)-exploit", alpha=0.5, beta=0.01),
]
