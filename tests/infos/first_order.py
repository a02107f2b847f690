"""Entries for the first-order backends: Lamb, AdaBelief and ALTO (the adapted Lamb).

Every ``build(params, **overrides)`` passes keyword overrides to the constructor, so the
generic tests' ``state_dtype=``, ``skip_nonfinite=`` and ``kahan=`` reach the optimizer (all
three are constructor arguments of Lamb, ALTO and AdaBelief); for ALTO the group keys
``explore_alpha``/``explore_beta`` are mapped to its ``alpha``/``beta`` arguments. The
``-fused`` entries take the compiled path for tensors of at least
``adaptor.replacement.FUSED_MIN_NUMEL`` elements (smaller ones take the foreach path).
"""

from __future__ import annotations

from adaptor.explore import ALPHA_KEY, BETA_KEY
from backends.first_order import ALTO, AdaBelief, Lamb
from tests.optim_db import OptimizerInfo


def _lamb(params, lr=1e-2, **kw):
    kw.setdefault("weight_decay", 1e-2)
    return Lamb(params, lr=lr, **kw)


def _lamb_vanilla(params, lr=1e-2, **kw):
    kw.setdefault("bias_correction", False)
    return _lamb(params, lr=lr, **kw)


def _adabelief(params, lr=1e-2, **kw):
    kw.setdefault("weight_decay", 1e-2)
    return AdaBelief(params, lr=lr, **kw)


def _alto(params, lr=1e-2, alpha=-5.0, **kw):
    # the group keys name the adaptor's α and β; as constructor arguments they are alpha/beta
    alpha = kw.pop(ALPHA_KEY, alpha)
    if BETA_KEY in kw:
        kw["beta"] = kw.pop(BETA_KEY)
    return ALTO(params, lr=lr, alpha=alpha, **kw)


def _alto_base(params, lr=1e-2, **kw):
    """ALTO's Lamb: same β₂, β₃, λ and epsilons, no replacement (``alpha=0``)."""
    kw.pop("beta", None)
    kw.setdefault("weight_decay", 1e-4)
    return Lamb(params, lr=lr, betas=(0.9, 0.99), **kw)


def _bad(make, exception, match, **kwargs):
    return (lambda params: make(params, **kwargs), exception, match)


def _lamb_invalid(make, owner):
    return (
        _bad(make, ValueError, rf"{owner}: invalid lr=-1.0, must satisfy 0 <= lr", lr=-1.0),
        _bad(make, ValueError, r"invalid eps=.*0 <= eps", eps=-1e-8),
        _bad(make, ValueError, r"invalid weight_decay=.*0 <= weight_decay", weight_decay=-0.1),
        _bad(make, ValueError, r"trust_eps=0.0, must satisfy 0 < trust_eps", trust_eps=0.0),
        _bad(make, ValueError, r"invalid norm_eps=.*0 < norm_eps", norm_eps=-1.0),
        _bad(
            make, ValueError, r"trust_clip=\(2.0, 1.0\), must satisfy 0 <= low <= high",
            trust_clip=(2.0, 1.0),
        ),
        _bad(
            make, ValueError, r"max_grad_norm=0.0, must satisfy 0 < max_grad_norm",
            max_grad_norm=0.0,
        ),
        _bad(make, TypeError, r"bias_correction must be True or False", bias_correction="yes"),
        _bad(make, TypeError, r"lr must be a real number", lr="fast"),
        (
            lambda params: make([{"params": params[:2]}, {"params": params[2:], "eps": -1.0}]),
            ValueError,
            r"invalid eps=-1.0",
        ),
    )


INFOS = [
    OptimizerInfo(
        name="Lamb",
        build=_lamb,
        group_override={"lr": 3e-3, "weight_decay": 0.0, "trust_clip": (0.0, 2.0)},
        invalid=(
            *_lamb_invalid(_lamb, "Lamb"),
            _bad(
                _lamb, ValueError, r"invalid betas\[1\]=1.0, must satisfy 0 <= betas\[1\] < 1",
                betas=(0.9, 1.0),
            ),
            _bad(_lamb, ValueError, r"betas must be a tuple of 2", betas=(0.9, 0.99, 0.999)),
        ),
    ),
    OptimizerInfo(
        name="Lamb(bias_correction=False)",
        build=_lamb_vanilla,
        group_override={"lr": 3e-3, "layer_adaptation": False},
        invalid=_lamb_invalid(_lamb_vanilla, "Lamb"),
    ),
    OptimizerInfo(
        name="AdaBelief",
        build=_adabelief,
        group_override={"lr": 3e-3, "betas": (0.8, 0.99), "decoupled_weight_decay": False},
        invalid=(
            _bad(_adabelief, ValueError, r"AdaBelief: invalid lr=-1.0, must satisfy 0 <= lr",
                 lr=-1.0),
            _bad(_adabelief, ValueError,
                 r"invalid betas\[0\]=-0.1, must satisfy 0 <= betas\[0\] < 1",
                 betas=(-0.1, 0.999)),
            _bad(_adabelief, ValueError, r"invalid eps=-1.0", eps=-1.0),
            _bad(_adabelief, ValueError, r"weight_decay must not be NaN",
                 weight_decay=float("nan")),
            _bad(_adabelief, TypeError, r"decoupled_weight_decay must be True or False",
                 decoupled_weight_decay=None),
            _bad(_adabelief, TypeError, r"foreach must be True, False or None", foreach=1),
        ),
    ),
    OptimizerInfo(
        name="ALTO",
        build=_alto,
        base=_alto_base,
        group_override={
            "lr": 3e-3, "explore_alpha": 0.5, "explore_beta": 0.5, "betas": (0.8, 0.99),
        },
        invalid=(
            *_lamb_invalid(_alto, "ALTO"),
            _bad(_alto, ValueError, r"\|alpha\| < 1/\(1-beta\) = 100 .*ALTO", alpha=-100.0),
            _bad(_alto, ValueError, r"explore beta must satisfy 0 <= beta < 1", beta=1.0),
            _bad(_alto, ValueError, r"betas=\(0.99, 0.9, 0.99\) has the old layout",
                 betas=(0.99, 0.9, 0.99)),
            _bad(_alto, ValueError, r"betas must be a tuple of 2 numbers \(β₂, β₃\)",
                 betas=(0.9,)),
            _bad(_alto, ValueError, r"invalid betas\[0\]=1.0, must satisfy 0 <= betas\[0\] < 1",
                 betas=(1.0, 0.99)),
            _bad(_alto, TypeError, r"alpha must be a real number", alpha="big"),
            (
                lambda params: _alto([
                    {"params": params[:2]},
                    {"params": params[2:], "explore_alpha": 2.0, "explore_beta": 0.1},
                ]),
                ValueError,
                r"\|alpha\| < 1/\(1-beta\)",
            ),
        ),
    ),
    OptimizerInfo(
        name="Lamb-fused",
        build=lambda params, **kw: _lamb(params, fused=True, **kw),
        group_override={"lr": 3e-3, "weight_decay": 0.0, "trust_clip": (0.0, 2.0)},
        invalid=_lamb_invalid(lambda params, **kw: _lamb(params, fused=True, **kw), "Lamb"),
        fused_compile=True,
    ),
    OptimizerInfo(
        name="ALTO-fused",
        build=lambda params, **kw: _alto(params, fused=True, **kw),
        base=lambda params, **kw: _alto_base(params, fused=True, **kw),
        group_override={
            "lr": 3e-3, "explore_alpha": 0.5, "explore_beta": 0.5, "betas": (0.8, 0.99),
        },
        invalid=(
            _bad(lambda params, **kw: _alto(params, fused=True, **kw), ValueError,
                 r"\|alpha\| < 1/\(1-beta\) = 100 .*ALTO", alpha=-100.0),
            _bad(lambda params, **kw: _alto(params, fused=True, **kw), TypeError,
                 r"ALTO: skip_nonfinite must be True or False", skip_nonfinite=None),
        ),
        fused_compile=True,
    ),
]
