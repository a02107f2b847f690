"""Entries for the second-order backend: Shampoo and the adaptor over it."""

from __future__ import annotations

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


_SHAMPOO_INVALID = (
    (lambda params: _shampoo(params, lr=-1.0), ValueError, r"lr must be in \[0.0, inf\)"),
    (lambda params: _shampoo(params, betas=(0.9, 1.0)), ValueError, r"betas\[1\].*\[0.0, 1.0\)"),
    (lambda params: _shampoo(params, betas=(-0.1, 0.9)), ValueError, r"betas\[0\].*\[0.0, 1.0\)"),
    (lambda params: _shampoo(params, eps=0.0), ValueError, r"eps must be in \(0.0, inf\)"),
    (lambda params: _shampoo(params, matrix_eps=-1e-6), ValueError, r"matrix_eps must be in"),
    (lambda params: _shampoo(params, weight_decay=-1.0), ValueError, r"weight_decay must be in"),
    (
        lambda params: _shampoo(params, precondition_frequency=0),
        ValueError,
        r"precondition_frequency must be an int >= 1",
    ),
    (
        lambda params: _shampoo(params, precondition_frequency=2.5),
        TypeError,
        r"precondition_frequency must be an int",
    ),
    (
        lambda params: _shampoo(params, start_preconditioning_step=0),
        ValueError,
        r"start_preconditioning_step must be an int >= 1",
    ),
    (
        lambda params: _shampoo(params, max_preconditioner_dim=0),
        ValueError,
        r"max_preconditioner_dim must be an int >= 1",
    ),
    (lambda params: _shampoo(params, grafting="sgd"), ValueError, r"grafting must be one of"),
    (lambda params: _shampoo(params, root_method="svd"), ValueError, r"root_method must be one of"),
    (
        lambda params: _shampoo([{"params": params[:1]}, {"params": params[1:], "lr": "x"}]),
        TypeError,
        r"lr must be a real number.*param group 1",
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
        (lambda params: build(params, lr=-1.0), ValueError, r"Shampoo lr must be in"),
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
                r"newton_iterations must be an int >= 1",
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
                lambda params: _shampoo(params, preconditioner_dtype="float16"),
                ValueError,
                r"preconditioner_dtype must be None",
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
    _explored(_shampoo, "E(Shampoo)"),
    _explored(_shampoo, "E(Shampoo)-exploit", alpha=0.5, beta=0.01),
]
