"""Entries for the zero-order backend: SPSA estimates under the adaptor (loss-only closures)."""

from __future__ import annotations

import torch

from adaptor import explore
from adaptor.replacement import FUSED_MIN_NUMEL
from backends.zeroth_order import SPSA
from tests.optim_db import OptimizerInfo


class SPSAThenBase:
    """SPSA + a base optimizer without the adaptor: ``estimate`` then ``base.step()``.

    The reference for the α = 0 test: it shares no code with the explored optimizer.
    """

    def __init__(self, estimator: SPSA, base: torch.optim.Optimizer) -> None:
        self.estimator = estimator
        self.base = base

    def step(self, closure):
        loss = self.estimator.estimate(closure, self.base.param_groups)
        self.base.step()
        return loss


def _sgd(params, lr=1e-2, **kw):
    return torch.optim.SGD(params, lr=lr, momentum=0.9, **kw)


def _adam(params, lr=1e-2, **kw):
    return torch.optim.Adam(params, lr=lr, **kw)


def _spsa_entry(name, base_factory, *, spsa=None, alpha=-5.0, beta=0.99, with_base=True,
                shapes=None, adaptor=None):
    spsa = {"seed": 0, **(spsa or {})}

    def build(params, alpha=alpha, beta=beta, state_dtype=None, skip_nonfinite=False,
              kahan=False, **overrides):
        # The capability-table contract: state_dtype and skip_nonfinite are E's; kahan
        # belongs to a base of this library and torch's SGD/Adam have none (dropped). SPSA
        # itself writes parameters only to perturb and restore them (restored exactly for
        # bf16/fp16), so it takes none of the three.
        del kahan
        adaptor_options, estimator_options = dict(adaptor or {}), {}
        if state_dtype is not None:
            adaptor_options["state_dtype"] = state_dtype
        if skip_nonfinite:
            adaptor_options["skip_nonfinite"] = skip_nonfinite
            # a skipped step must leave the parameters bit-identical: the in-place
            # perturb/restore walk of float32 parameters drifts by an ulp, the copy does not
            estimator_options["exact_restore"] = True
        return explore(SPSA(**spsa, **estimator_options), base_factory(params, **overrides),
                       alpha=alpha, beta=beta, **adaptor_options)

    def base(params, **overrides):
        return SPSAThenBase(SPSA(**spsa), base_factory(params, **overrides))

    def estimate_without_closure(params):
        SPSA(**spsa).estimate(None, [{"params": params}])

    invalid = (
        (lambda params: build(params).step(), ValueError, r"SPSA needs a closure"),
        (estimate_without_closure, ValueError, r"SPSA needs a closure"),
        (lambda params: explore(SPSA(perturbation=0.0), _sgd(params)), ValueError,
         r"perturbation must satisfy 0 < c"),
        (lambda params: explore(SPSA(samples=0), _sgd(params)), ValueError,
         r"samples must be an integer >= 1"),
        (lambda params: explore(SPSA(samples=1.5), _sgd(params)), ValueError,
         r"samples must be an integer >= 1"),
        (lambda params: explore(SPSA(distribution="uniform"), _sgd(params)), ValueError,
         r"distribution must be one of \('rademacher', 'gaussian'\)"),
        (lambda params: build(params, alpha=-100.0), ValueError, r"\|alpha\| < 1/\(1-beta\)"),
        (lambda params: explore(SPSA(fused="yes"), _sgd(params)), TypeError,
         r"SPSA fused must be True, False or None"),
    )
    return OptimizerInfo(
        name=name,
        build=build,
        base=base if with_base else None,
        closure_kind="loss",
        supports_complex=False,
        groups_independent=False,
        invalid=invalid,
        fused_compile=shapes is not None,
        shapes=shapes,
    )


# The packed one-pass kernels (SPSA(fused=True)) take Rademacher parameters of at least
# FUSED_MIN_NUMEL elements: two such tensors (one with a partial last 64-bit word: 300·257
# elements) beside two small ones that take the generic path in the same step.
PACKED_SHAPES = ((256, 256), (256,), (300, 257), (64,))
assert torch.Size(PACKED_SHAPES[2]).numel() % 64  # a partial last word (77100 = 64·1204 + 44)
assert sum(1 for s in PACKED_SHAPES if torch.Size(s).numel() >= FUSED_MIN_NUMEL) == 2

def _packed_entry(name, fused=None):
    """SPSA's packed one-pass kernels under E(SGD) on PACKED_SHAPES; ``fused``: E's."""
    return _spsa_entry(name, _sgd, spsa={"fused": True}, alpha=0.5, beta=0.01,
                       shapes=PACKED_SHAPES, adaptor={"fused": fused})


INFOS = [
    _spsa_entry("SPSA+E(SGD)", _sgd, alpha=0.5, beta=0.01),
    _spsa_entry("SPSA+SGD (alpha=0)", _sgd, alpha=0.0, with_base=False),
    _spsa_entry("SPSA+E(Adam)", _adam),
    _spsa_entry(
        "SPSA(gaussian, 2 samples, blocks of 7)+E(SGD)",
        _sgd,
        spsa={"distribution": "gaussian", "samples": 2, "chunk": 7, "perturbation": 2e-3},
        alpha=0.5,
        beta=0.01,
    ),
    _spsa_entry(
        "SPSA(seed=None)+E(Adam)", _adam, spsa={"seed": None}, with_base=False
    ),
    _packed_entry("SPSA(fused, packed one-pass kernels)+E(SGD)"),
    # E's fast path too (fused=True): the restore of the whole-word 256×256 parameter is
    # deferred into the fast path's kernel (adaptor.estimators.DeferredRestore); the
    # partial-word one is restored by SPSA's kernel, the small ones by the generic path.
    _packed_entry("SPSA(fused)+E(SGD, fused), restore fused into the update", fused=True),
]
