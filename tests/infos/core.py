"""Entries for the adaptor over torch's own optimizers (and ones it has never seen)."""

from __future__ import annotations

import torch

from adaptor import E
from tests.optim_db import OptimizerInfo


def _explored(base_factory, name, *, alpha=-5.0, beta=0.99, fused=None, **info_kwargs):
    def build(params, alpha=alpha, beta=beta, state_dtype=None, skip_nonfinite=False,
              kahan=False, **overrides):
        # The capability-table contract: state_dtype and skip_nonfinite are E's; kahan
        # belongs to a base of this library, and torch's bases have none (dropped).
        del kahan
        return E(
            base_factory(params, **overrides), alpha=alpha, beta=beta, fused=fused,
            state_dtype=state_dtype, skip_nonfinite=skip_nonfinite,
        )

    invalid = (
        (lambda params: build(params, alpha=-100.0), ValueError, r"\|alpha\| < 1/\(1-beta\)"),
        (lambda params: build(params, beta=1.0), ValueError, r"0 <= beta < 1"),
        (lambda params: build(params, alpha="big"), TypeError, r"alpha must be a real number"),
    )
    return OptimizerInfo(
        name=name, build=build, base=base_factory, invalid=invalid, **info_kwargs
    )


def _sgd(params, lr=1e-2, **kw):
    return torch.optim.SGD(params, lr=lr, momentum=0.9, **kw)


def _adam(params, lr=1e-2, **kw):
    return torch.optim.Adam(params, lr=lr, **kw)


def _adamw(params, lr=1e-2, **kw):
    return torch.optim.AdamW(params, lr=lr, weight_decay=1e-2, foreach=True, **kw)


def _rmsprop(params, lr=1e-2, **kw):
    return torch.optim.RMSprop(params, lr=lr, alpha=0.9, **kw)


def _adagrad(params, lr=1e-2, **kw):
    return torch.optim.Adagrad(params, lr=lr, **kw)


INFOS = [
    _explored(_sgd, "E(SGD-momentum)", alpha=0.5, beta=0.01),
    _explored(_adam, "E(Adam)"),
    _explored(_adamw, "E(AdamW)"),
    _explored(_adamw, "E(AdamW)-fused", fused=True, fused_compile=True),
    _explored(_rmsprop, "E(RMSprop)"),
    _explored(_adagrad, "E(Adagrad)", alpha=0.5, beta=0.01),
]
