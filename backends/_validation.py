"""Argument checks shared by the backends: one message style, the owner named first.

Every check takes ``owner`` (the class or function whose argument it is, e.g. ``"Lamb"``)
and the argument's ``name``, and raises ``TypeError`` for a value of the wrong kind and
``ValueError`` for one out of range, with the allowed range in the message::

    Lamb: invalid eps=-1.0, must satisfy 0 <= eps < inf
    Lamb: betas[1] must be a real number, got str

Checks are made when an optimizer is built and when a param group is added, never inside
``step()`` (they read Python numbers only; a tensor ``lr`` is accepted as it is).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "check_betas",
    "check_choice",
    "check_finite",
    "check_flag",
    "check_float_dtype",
    "check_int",
    "check_lr",
    "check_nonneg",
    "check_optional_positive",
    "check_pair",
    "check_positive",
    "check_precision",
    "check_state_dtype",
    "check_tuple",
    "check_unit",
    "dtype_from_name",
    "dtype_name",
    "real",
]


def real(owner: str, name: str, value: object) -> float:
    """``value`` as a float: a real number (not a bool, not a tensor) that is not NaN."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a real number, got {type(value).__name__}")
    result = float(value)
    if math.isnan(result):
        raise ValueError(f"{owner}: {name} must not be NaN")
    return result


def check_finite(owner: str, name: str, value: object) -> float:
    """``value`` as a float: a real number with ``-inf < value < inf``."""
    result = real(owner, name, value)
    if not math.isfinite(result):
        raise ValueError(f"{owner}: invalid {name}={value}, must satisfy -inf < {name} < inf")
    return result


def check_int(owner: str, name: str, value: object, *, low: int, high: int | None = None) -> int:
    """An ``int`` (not a bool) with ``low <= value`` (and ``value <= high`` when given)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__}")
    result = int(value)
    if result < low or (high is not None and result > high):
        rule = f"{low} <= {name}" + (f" <= {high}" if high is not None else "")
        raise ValueError(f"{owner}: invalid {name}={result}, must be an int with {rule}")
    return result


def check_lr(owner: str, lr: object) -> None:
    """A learning rate: a float in [0, inf) or a one-element tensor (not read on the host)."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"{owner}: a tensor lr must have exactly one element")
        return
    if not 0.0 <= real(owner, "lr", lr) < math.inf:
        raise ValueError(f"{owner}: invalid lr={lr}, must satisfy 0 <= lr < inf")


def check_unit(owner: str, name: str, value: object) -> None:
    """``0 <= value < 1`` (decay rates)."""
    if not 0.0 <= real(owner, name, value) < 1.0:
        raise ValueError(f"{owner}: invalid {name}={value}, must satisfy 0 <= {name} < 1")


def check_nonneg(owner: str, name: str, value: object) -> None:
    """``0 <= value < inf``."""
    if not 0.0 <= real(owner, name, value) < math.inf:
        raise ValueError(f"{owner}: invalid {name}={value}, must satisfy 0 <= {name} < inf")


def check_positive(owner: str, name: str, value: object) -> None:
    """``0 < value < inf``."""
    if not 0.0 < real(owner, name, value) < math.inf:
        raise ValueError(f"{owner}: invalid {name}={value}, must satisfy 0 < {name} < inf")


def check_optional_positive(owner: str, name: str, value: object) -> None:
    """``None`` or ``0 < value < inf``."""
    if value is not None:
        check_positive(owner, name, value)


def check_tuple(
    owner: str, name: str, value: object, count: int, *, names: Sequence[str] = ()
) -> Sequence[Any]:
    """A tuple (or list) of ``count`` items (checked by the caller), returned as it is.

    ``names`` (optional) spells the tuple in the error, e.g. ``("β₂", "β₃")``.
    """
    if not isinstance(value, (tuple, list)) or len(value) != count:
        layout = f" ({', '.join(names)})" if names else ""
        raise ValueError(
            f"{owner}: {name} must be a tuple of {count} numbers{layout}, got {value!r}"
        )
    return value


def check_betas(
    owner: str, betas: object, count: int, *, names: Sequence[str] = (), name: str = "betas"
) -> None:
    """A tuple (or list) of ``count`` decay rates, each in [0, 1) (see :func:`check_tuple`)."""
    for i, beta in enumerate(check_tuple(owner, name, betas, count, names=names)):
        check_unit(owner, f"{name}[{i}]", beta)


def check_flag(owner: str, name: str, value: object, *, allow_none: bool = False) -> None:
    """``True`` or ``False`` (or ``None`` with ``allow_none``)."""
    if isinstance(value, bool) or (allow_none and value is None):
        return
    allowed = "True, False or None" if allow_none else "True or False"
    raise TypeError(f"{owner}: {name} must be {allowed}, got {value!r}")


def check_choice(owner: str, name: str, value: object, choices: Sequence[Any]) -> None:
    """One of ``choices`` (compared with ``==``, strings quoted in the message)."""
    if not any(type(value) is type(c) and value == c for c in choices):
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{owner}: invalid {name}={value!r}, must be one of {allowed}")


def check_pair(owner: str, name: str, value: object, *, optional: bool = True) -> None:
    """``None`` (with ``optional``) or a pair ``(low, high)`` with ``0 <= low <= high``."""
    if value is None and optional:
        return
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        prefix = "None or " if optional else ""
        raise ValueError(f"{owner}: {name} must be {prefix}a pair (low, high), got {value!r}")
    low = real(owner, f"{name}[0]", value[0])
    high = real(owner, f"{name}[1]", value[1])
    if not 0.0 <= low <= high:
        raise ValueError(
            f"{owner}: invalid {name}={tuple(value)}, must satisfy 0 <= low <= high"
        )


def check_state_dtype(owner: str, value: object) -> torch.dtype | None:
    """``None`` or a real floating ``torch.dtype`` (see ``adaptor.precision``)."""
    from adaptor.precision import check_state_dtype as check

    return check(value, owner)


def check_precision(owner: str, group: dict[str, Any]) -> None:
    """The precision options every backend takes: ``state_dtype``, ``kahan``,
    ``skip_nonfinite`` (see ``adaptor.precision``)."""
    check_state_dtype(owner, group["state_dtype"])
    check_flag(owner, "kahan", group["kahan"])
    check_flag(owner, "skip_nonfinite", group["skip_nonfinite"])


def check_float_dtype(
    owner: str,
    name: str,
    value: object,
    *,
    optional: bool = False,
    allowed: Sequence[torch.dtype] = (),
) -> torch.dtype | None:
    """A real floating ``torch.dtype`` (``None`` too with ``optional``), one of ``allowed``
    when given: ``TypeError`` for anything that is not one, ``ValueError`` for a dtype
    outside ``allowed``."""
    if value is None and optional:
        return None
    prefix = "None or " if optional else ""
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise TypeError(f"{owner}: {name} must be {prefix}a floating torch.dtype, got {value!r}")
    if allowed and value not in allowed:
        choices = ", ".join(map(str, allowed))
        raise ValueError(f"{owner}: invalid {name}={value}, must be {prefix}one of {choices}")
    return value



def dtype_from_name(value: object, where: str) -> object:
    """``"float32"`` → ``torch.float32``: how the optimizers' ``state_dict()`` save a
    group's dtypes (``torch.distributed.checkpoint`` refuses ``torch.dtype`` values:
    ``full_state_dict=True`` raises "Unexpected value type <class 'torch.dtype'>").

    Anything that is not a string passes through unchanged (a dtype, ``None``; the
    group's own check judges it); a string that is not the name of a floating dtype is a
    ``ValueError`` naming ``where``.
    """
    if not isinstance(value, str):
        return value
    dtype = getattr(torch, value, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{where}: {value!r} is not the name of a floating torch dtype")
    return dtype


def dtype_name(value: object) -> object:
    """``torch.float32`` → ``"float32"`` (the inverse of :func:`dtype_from_name`); anything
    else unchanged."""
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value
