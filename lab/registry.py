"""Optimizers by name: ``sgd``, ``adamw``, ``lamb``, ... and ``e-<name>`` for the adaptor over each.

    spec = resolve("e-adamw")
    built = build("e-adamw", model, batch_size=1024)      # -> Built(optimizer, closure_kind, ...)

Every name has a default learning rate (at the reference batch size of the lab's LR scaling
rule) and default weight decay. ``e-<name>`` wraps the base with
``explore(estimator, base, alpha=α, beta=β)``; α and β default to ``adaptor.preset(batch_size)``.
``alto`` is the paper's adapted Lamb and takes α and β itself (``alto`` with α = 0 is Lamb).
Names whose backend has not been installed are listed as unavailable, and an unknown name is
a ``ValueError`` that lists the available ones.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from adaptor import Autograd, check_alpha_beta, explore, preset

EXPLORE_PREFIX = "e-"


@dataclass(frozen=True)
class Spec:
    """One optimizer of the lab.

    Attributes:
        name: the command-line name.
        summary: one line for ``explore optimizers``.
        lr: default learning rate at the reference batch size (``train.REFERENCE_BATCH``).
        weight_decay: default weight decay.
        make: ``make(model, lr, weight_decay, seed, alpha, beta) -> Optimizer`` for the base.
        module: the backend module it needs (``None``: torch only).
        zeroth_order: the gradient comes from SPSA; the closure returns the loss only.
        takes_alpha: the optimizer has the adaptor built in (ALTO): α, β go to it.
        matrix: the optimizer is matrix-based (2-D+ weights; other parameters use its fallback).
    """

    name: str
    summary: str
    lr: float
    weight_decay: float
    make: Callable[..., Any]
    module: str | None = None
    zeroth_order: bool = False
    takes_alpha: bool = False
    matrix: bool = False

    def available(self) -> bool:
        if self.module is None:
            return True
        try:
            importlib.import_module(self.module)
        except ImportError:
            return False
        return True


@dataclass
class Built:
    """An optimizer made by :func:`build`, with what the training loop needs to know."""

    name: str
    optimizer: Optimizer
    closure_kind: str  # "backward" (closure calls backward) or "loss" (SPSA: loss only)
    lr: float
    weight_decay: float
    alpha: float | None
    beta: float | None


# -- the bases --------------------------------------------------------------------------------


def _backend(name: str) -> Any:
    import backends

    return getattr(backends, name)


def _groups_for(model: nn.Module, weight_decay: float) -> Any:
    """``backends.param_groups_for``: weight decay on weights, none on biases and norms."""
    return _backend("param_groups_for")(model, weight_decay=weight_decay)


def _sgd(model, lr, weight_decay, **_):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)


def _adam(model, lr, weight_decay, **_):
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)


def _adamw(model, lr, weight_decay, **_):
    return torch.optim.AdamW(_groups_for(model, weight_decay), lr=lr)


def _lamb(model, lr, weight_decay, **_):
    # Lamb's moments as in ALTO (β₂ = 0.9, β₃ = 0.99): alto with α = 0 is this Lamb.
    return _backend("Lamb")(_groups_for(model, weight_decay), lr=lr, betas=(0.9, 0.99))


def _adabelief(model, lr, weight_decay, **_):
    return _backend("AdaBelief")(model.parameters(), lr=lr, weight_decay=weight_decay)


def _alto(model, lr, weight_decay, alpha, beta, **_):
    return _backend("ALTO")(
        _groups_for(model, weight_decay), lr=lr, betas=(0.9, 0.99), alpha=alpha, beta=beta
    )


def _muon(model, lr, weight_decay, **_):
    # One learning rate for everything: Newton–Schulz updates scaled to AdamW's RMS, and the
    # AdamW fallback (biases) at the same lr, so the lab's schedule drives both.
    return _backend("Muon")(
        model.parameters(),
        lr=lr,
        weight_decay=weight_decay,
        adjust_lr_fn="match_rms_adamw",
        adamw_lr=None,
        adamw_weight_decay=weight_decay,
    )


def _shampoo(model, lr, weight_decay, **_):
    return _backend("Shampoo")(model.parameters(), lr=lr, weight_decay=weight_decay)


SPECS: dict[str, Spec] = {
    spec.name: spec
    for spec in [
        Spec("sgd", "SGD with heavy-ball momentum 0.9 (torch)", 0.1, 0.0, _sgd),
        Spec("adam", "Adam (torch)", 3e-3, 0.0, _adam),
        Spec("adamw", "AdamW, decoupled weight decay on weights (torch)", 3e-3, 1e-4, _adamw),
        Spec("lamb", "Lamb, layer-wise trust ratio", 1e-2, 1e-4, _lamb, "backends.first_order"),
        Spec("adabelief", "AdaBelief", 3e-3, 0.0, _adabelief, "backends.first_order"),
        Spec(
            "alto",
            "ALTO: the paper's adapted Lamb (takes --alpha/--beta itself)",
            1e-2,
            1e-4,
            _alto,
            "backends.first_order",
            takes_alpha=True,
        ),
        Spec("muon", "Muon (matrices; AdamW for biases), RMS matched to AdamW", 1e-2, 0.0,
             _muon, "backends.matrix", matrix=True),
        Spec("shampoo", "Shampoo preconditioning, Adam grafting", 3e-3, 0.0, _shampoo,
             "backends.second_order"),
        Spec("spsa-sgd", "SPSA gradient estimate, SGD-momentum update", 1e-3, 0.0, _sgd,
             "backends.zeroth_order", zeroth_order=True),
        Spec("spsa-adam", "SPSA gradient estimate, Adam update", 1e-2, 0.0, _adam,
             "backends.zeroth_order", zeroth_order=True),
    ]
}


def _split(name: str) -> tuple[bool, str]:
    if not isinstance(name, str):
        raise TypeError(f"optimizer name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    if key.startswith(EXPLORE_PREFIX):
        return True, key[len(EXPLORE_PREFIX):]
    return False, key


def available() -> list[str]:
    """Every selectable name, bases first, then their ``e-`` variants."""
    bases = [spec.name for spec in SPECS.values() if spec.available()]
    explored = [EXPLORE_PREFIX + n for n in bases if not SPECS[n].takes_alpha]
    return bases + explored


def resolve(name: str) -> tuple[Spec, bool]:
    """``(spec, explored)`` for ``adamw``, ``e-adamw``, ...; ``ValueError`` if unknown."""
    explored, base = _split(name)
    spec = SPECS.get(base)
    if spec is not None and explored and spec.takes_alpha:
        raise ValueError(
            f"optimizer {name!r}: {base} already contains the adaptor; use {base!r} "
            f"(α=0 gives its base) with --alpha/--beta"
        )
    if spec is None or not spec.available():
        missing = "" if spec is None else f" (its backend {spec.module} is not installed)"
        raise ValueError(
            f"unknown optimizer {name!r}{missing}; available: {', '.join(available())}"
        )
    return spec, explored


def parse_names(text: str) -> list[str]:
    """Split ``"adamw,e-adamw"`` and check every name; duplicates and empty lists are errors."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"no optimizer given in {text!r}; available: {', '.join(available())}")
    seen = set()
    for name in names:
        resolve(name)
        if name in seen:
            raise ValueError(f"optimizer {name!r} is listed twice")
        seen.add(name)
    return names


def uses_alpha(name: str) -> bool:
    spec, explored = resolve(name)
    return explored or spec.takes_alpha


def alpha_beta(
    batch_size: int, alpha: float | None = None, beta: float | None = None
) -> tuple[float, float]:
    """α, β: the given ones, else ``adaptor.preset(batch_size)``; checked ``|α| < 1/(1-β)``."""
    chosen = preset(batch_size)
    a = chosen["alpha"] if alpha is None else alpha
    b = chosen["beta"] if beta is None else beta
    return check_alpha_beta(a, b)


def build(
    name: str,
    model: nn.Module,
    *,
    batch_size: int,
    lr: float | None = None,
    weight_decay: float | None = None,
    alpha: float | None = None,
    beta: float | None = None,
    seed: int = 0,
    spsa_perturbation: float = 1e-3,
) -> Built:
    """Build optimizer ``name`` over ``model``'s parameters.

    ``lr`` and ``weight_decay`` default to the spec's; α and β to ``preset(batch_size)``
    (used only by ``e-*`` names and ``alto``). ``seed`` seeds SPSA's perturbations.
    """
    spec, explored = resolve(name)
    lr = spec.lr if lr is None else float(lr)
    if not lr > 0:
        raise ValueError(f"learning rate must be > 0, got {lr}")
    weight_decay = spec.weight_decay if weight_decay is None else float(weight_decay)
    if weight_decay < 0:
        raise ValueError(f"weight decay must be >= 0, got {weight_decay}")
    uses = explored or spec.takes_alpha
    a, b = alpha_beta(batch_size, alpha, beta) if uses else (None, None)
    base = spec.make(model, lr=lr, weight_decay=weight_decay, alpha=a, beta=b, seed=seed)
    closure_kind = "loss" if spec.zeroth_order else "backward"
    if spec.zeroth_order:
        estimator = _spsa(spsa_perturbation, seed)
        # Without the adaptor SPSA still needs the explored optimizer to run the estimator:
        # α = 0 feeds the base the plain estimate g_k.
        optimizer: Optimizer = explore(
            estimator, base, alpha=a if explored else 0.0, beta=b if explored else 0.0
        )
    elif explored:
        optimizer = explore(Autograd(), base, alpha=a, beta=b)
    else:
        optimizer = base
    return Built(spec.name if not explored else name, optimizer, closure_kind, lr,
                 weight_decay, a, b)


def _spsa(perturbation: float, seed: int) -> Any:
    return _backend("SPSA")(perturbation=perturbation, seed=seed)
