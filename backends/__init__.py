"""Gradient estimators and base updates for the adaptor, one module per family.

    from backends import SPSA, Lamb, AdaBelief, ALTO, Shampoo, Muon, SGD, Adam, AdamW

- ``backends.zeroth_order``: SPSA finite-difference gradient estimator
- ``backends.first_order``: Lamb, AdaBelief, ALTO (the adapted Lamb); torch's SGD/Adam/AdamW
- ``backends.second_order``: Shampoo-like preconditioning
- ``backends.matrix``: Muon (Newton–Schulz orthogonalised momentum)

Names are imported lazily so that importing one family does not import the others.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch.optim import SGD, Adam, AdamW

_LAZY = {
    "SPSA": "backends.zeroth_order",
    "Lamb": "backends.first_order",
    "AdaBelief": "backends.first_order",
    "ALTO": "backends.first_order",
    "param_groups_for": "backends.first_order",
    "Shampoo": "backends.second_order",
    "Muon": "backends.matrix",
}

__all__ = ["SGD", "Adam", "AdamW", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'backends' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
