"""Typed optimizer state for Muon and Shampoo: compute dtypes, one-rounding writes, checked loads.

**Precision.** A step's arithmetic runs in :func:`compute_dtype` (at least float32, at least
the state's dtype); state kept in a narrower dtype is read into it and stored back once
(:func:`as_dtype`), and low-precision parameters are written once per step, rounded once or
Kahan-compensated (:func:`write_params_`, built on ``adaptor.precision``).

**Loading.** :func:`load_checked` follows ``torch.optim.Optimizer.load_state_dict``
(pre-hooks, saved hyperparameters replace the groups', state not keyed by a parameter index
is kept as it is, post-hooks), with two differences:

* everything is checked before anything is modified: a state dict of another model or
  optimizer (wrong number of groups or parameters, a missing or unknown state key, a wrong
  shape) raises a ``ValueError`` naming the parameter index, the key and both shapes, and
  the optimizer is left exactly as it was;
* every state tensor is copied to its parameter's device in the dtype the optimizer keeps it
  in (torch casts floating state to the parameter's dtype, which would round the float32
  state of bf16 parameters).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from copy import deepcopy
from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from adaptor import precision
from backends._validation import dtype_from_name, dtype_name

# A state entry: a tensor of (shape, dtype), or ``int`` for a host-side Python integer.
Spec = dict[str, "tuple[tuple[int, ...], torch.dtype] | type[int]"]

KAHAN_KEY = "kahan_comp"
SKIPS_KEY = "nonfinite_skips"


def compute_dtype(param_dtype: torch.dtype, state_dtype: torch.dtype) -> torch.dtype:
    """The dtype a step's arithmetic runs in: at least float32, at least the state's."""
    return torch.promote_types(torch.promote_types(param_dtype, state_dtype), torch.float32)


def as_dtype(tensors: Sequence[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """``tensors`` themselves (the same list object) when all have ``dtype``, else copies."""
    if all(t.dtype == dtype for t in tensors):
        return tensors if isinstance(tensors, list) else list(tensors)
    return [t.to(dtype) for t in tensors]


def write_params_(
    params: Sequence[Tensor],
    deltas: Sequence[Tensor],
    comps: Sequence[Tensor],
    drop: Tensor | None = None,
) -> None:
    """``θ ← round(θ + d)``: one rounding per parameter, or Kahan-compensated with ``comps``.

    ``drop`` (a 0-d bool device tensor, with ``d = 0`` where it is set): a skipped step.
    ``θ + 0`` rounds back to θ; a Kahan write would flush the compensation into θ, so θ and
    the compensation are selected with ``torch.where`` instead.
    """
    if comps and drop is not None:
        for p, d, c in zip(params, deltas, comps):
            work = d.dtype if d.dtype.itemsize >= 4 else torch.float32
            theta = p.to(work)
            y = d.to(work) + c.to(work)
            new = (theta + y).to(p.dtype)
            c.copy_(torch.where(drop, c, (y - (new.to(work) - theta)).to(c.dtype)))
            p.copy_(torch.where(drop, p, new))
        return
    if comps:
        for p, d, c in zip(params, deltas, comps):
            precision.kahan_add_(p, d, c)
    else:
        for p, d in zip(params, deltas):
            precision.add_to_param_(p, d)


@torch.compiler.disable
def _create_skip_counters(states: list[dict[str, Any]], device: torch.device) -> None:
    for state in states:
        state[SKIPS_KEY] = torch.zeros((), dtype=torch.float32, device=device)


def count_skips_(
    state: Mapping[Any, dict[str, Any]], params: Sequence[Tensor], skip: Tensor
) -> None:
    """``state[p]["nonfinite_skips"] += skip`` for every parameter (``precision.count_skip_``).

    Missing counters are created eagerly, outside ``torch.compile``'s graph: created inside
    it, the identical computations ``zeros() + skip`` of several parameters are merged into
    one output, and every parameter's counter then aliases one storage (measured: a count of
    3 after one skip with 3 parameters). The graph break happens only on the step that
    creates them.
    """
    missing = [state[p] for p in params if SKIPS_KEY not in state[p]]
    if missing:
        _create_skip_counters(missing, params[0].device)
    for p in params:
        precision.count_skip_(state[p], skip, p)


def optional_spec(p: Tensor) -> Spec:
    """Keys any parameter may hold, created lazily (a state dict without them loads)."""
    return {KAHAN_KEY: (tuple(p.shape), p.dtype), SKIPS_KEY: ((), torch.float32)}


def _describe(value: Any) -> str:
    return str(tuple(value.shape)) if isinstance(value, Tensor) else type(value).__name__


# Settings added after the first release: filled in for groups of older pickles.
LATER_DEFAULTS = {"state_dtype": None, "kahan": False, "skip_nonfinite": False}


def fill_later_defaults(optimizer: Any) -> None:
    """Give every group the settings it was saved without (``LATER_DEFAULTS``), from the
    optimizer's defaults when it has them (Muon and Shampoo's ``__setstate__``)."""
    for group in optimizer.param_groups:
        for key, default in LATER_DEFAULTS.items():
            group.setdefault(key, optimizer.defaults.get(key, default))


def name_dtypes(state_dict: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """``state_dict`` with the groups' ``keys`` saved by name (``torch.float32`` →
    ``"float32"``; :func:`load_checked` turns them back): ``torch.distributed.checkpoint``
    refuses ``torch.dtype`` values (``get_optimizer_state_dict`` with
    ``full_state_dict=True`` raises "Unexpected value type <class 'torch.dtype'>").
    Rewrites the groups in place: torch's ``state_dict()`` builds new group dicts."""
    for group in state_dict["param_groups"]:
        for key in keys:
            if key in group:
                group[key] = dtype_name(group[key])
    return state_dict


def load_checked(
    optimizer: Optimizer,
    state_dict: Mapping[str, Any],
    owner: str,
    check_group: Callable[[dict[str, Any], str], None],
    spec: Callable[[dict[str, Any], Tensor], Spec],
    dtype_keys: Sequence[str] = (),
) -> None:
    """Check ``state_dict`` against ``optimizer`` and load it (see the module docstring).

    ``spec(group, p)`` gives the keys a parameter with state must hold (the loaded group's
    settings decide, e.g. Muon's routing); :func:`optional_spec` the keys it may hold.
    The saved groups' ``dtype_keys`` may hold a ``torch.dtype`` or its name
    (:func:`name_dtypes`); the loaded groups hold the dtype.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{owner} state_dict must be a dict, got {type(state_dict).__name__}")
    state_dict = dict(state_dict)  # shallow copy, as torch does
    for pre_hook in optimizer._optimizer_load_state_dict_pre_hooks.values():
        hooked = pre_hook(optimizer, state_dict)
        if hooked is not None:
            state_dict = hooked
    if "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError(f"{owner} state_dict must be a dict with 'state' and 'param_groups'")
    groups = optimizer.param_groups
    saved_groups = deepcopy(state_dict["param_groups"])
    if len(saved_groups) != len(groups):
        raise ValueError(
            f"{owner} state_dict has {len(saved_groups)} param groups, the optimizer has "
            f"{len(groups)}"
        )
    merged = []
    for index, (group, saved) in enumerate(zip(groups, saved_groups)):
        if not isinstance(saved, Mapping) or "params" not in saved:
            raise ValueError(f"{owner} state_dict param group {index} has no 'params' list")
        for key in dtype_keys:
            if key in saved:
                where = f"{owner} state_dict param group {index}: {key}"
                saved[key] = dtype_from_name(saved[key], where)
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"{owner} state_dict param group {index} has {len(saved['params'])} "
                f"parameters, the optimizer's has {len(group['params'])}"
            )
        both = {**group, **{k: v for k, v in saved.items() if k != "params"}}
        both["params"] = group["params"]
        check_group(both, f"state_dict param group {index}")
        merged.append(both)
    saved_ids = list(chain.from_iterable(g["params"] for g in saved_groups))
    params = list(chain.from_iterable(g["params"] for g in groups))
    id_map = dict(zip(saved_ids, params))
    group_of = {id(p): g for g in merged for p in g["params"]}

    state: defaultdict[Any, Any] = defaultdict(dict)
    for key, entry in state_dict["state"].items():
        p = id_map.get(key) if not isinstance(key, Tensor) else None
        if p is None:
            if isinstance(key, int) and not isinstance(key, bool):
                raise ValueError(
                    f"{owner} state_dict has state for parameter index {key}, but its param "
                    f"groups list {len(saved_ids)} parameters (a state dict of another model?)"
                )
            state[key] = entry  # torch keeps state not keyed by a parameter (hooks write it)
            continue
        where = f"{owner} state_dict parameter {key} (shape {tuple(p.shape)})"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}: its state must be a dict, got {type(entry).__name__}")
        required = spec(group_of[id(p)], p)
        allowed = {**required, **optional_spec(p)}
        if entry:
            unknown = sorted(str(k) for k in entry if k not in allowed)
            if unknown:
                raise ValueError(
                    f"{where} has unknown state keys {unknown}; expected {sorted(required)} "
                    f"(optionally {sorted(optional_spec(p))})"
                )
            missing = [k for k in required if k not in entry]
            if missing:
                raise ValueError(
                    f"{where} lacks state keys {missing}; it has {sorted(map(str, entry))}"
                )
        loaded = {}
        for name, value in entry.items():
            expected = allowed[name]
            if expected is int:
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ValueError(
                        f"{where}: state {name!r} must be an int >= 0, got {value!r}"
                    )
                loaded[name] = value
                continue
            shape, dtype = expected  # type: ignore[misc]
            if not isinstance(value, Tensor) or tuple(value.shape) != shape:
                raise ValueError(
                    f"{where}: state {name!r} has shape {_describe(value)}, expected {shape}"
                )
            if not (value.is_floating_point() or value.is_complex()):
                raise ValueError(
                    f"{where}: state {name!r} has dtype {value.dtype}, expected a floating dtype"
                )
            loaded[name] = value.to(device=p.device, dtype=dtype, copy=True)
        state[p] = loaded

    def update_group(group: dict[str, Any], new_group: dict[str, Any]) -> dict[str, Any]:
        new_group["params"] = group["params"]
        if "param_names" in group and "param_names" not in new_group:
            new_group["param_names"] = group["param_names"]
        return new_group

    param_groups = [update_group(g, ng) for g, ng in zip(groups, saved_groups)]
    optimizer.__setstate__({"state": state, "param_groups": param_groups})
    for post_hook in optimizer._optimizer_load_state_dict_post_hooks.values():
        post_hook(optimizer)
