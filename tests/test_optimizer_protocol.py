"""Generic tests of the ``torch.optim.Optimizer`` protocol, over every capability-table entry.

Written after torch's own ``test/test_optim.py`` (``test_deepcopy_copies_all_public_attrs``,
``test_save_load_equality_with_weights_only``, ``test_step_all_hooks``,
``test_state_dict_pre_hook``, ``test_load_state_dict_post_hook``, ...): copies and pickles
after an LR scheduler and with hooks, a ``weights_only=True`` checkpoint, hook counts, the
state-dict hook patterns, and bad state dicts that must be refused with nothing changed.
"""

from __future__ import annotations

import copy
import io
import pickle
import re

import pytest
import torch
from torch.optim.lr_scheduler import StepLR
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from tests.optim_db import (
    OptimizerInfo,
    all_params,
    assert_same,
    clone_params,
    entries,
    make_params,
    run_steps,
    state_snapshot,
)

# torch's own optimizers, run through the same tests where torch has the behaviour the
# contract asks for: they show each test is passable and that it checks torch's semantics.
REFERENCE = [
    OptimizerInfo(
        name="torch.optim.Adam (reference)",
        build=lambda params, **kw: torch.optim.Adam(params, lr=1e-2, **kw),
    ),
    OptimizerInfo(
        name="torch.optim.SGD-momentum (reference)",
        build=lambda params, **kw: torch.optim.SGD(params, lr=1e-2, momentum=0.9, **kw),
    ),
]
by_entry = pytest.mark.parametrize("info", entries() + entries(REFERENCE))


def _assert_params_equal(actual, expected, what="parameter"):
    for i, (a, b) in enumerate(zip(actual, expected, strict=True)):
        assert_same(a.detach(), b.detach(), f"{what} {i}")


# -- copies ---------------------------------------------------------------------------------


def _copy(optimizer, how):
    if how == "deepcopy":
        return copy.deepcopy(optimizer)
    return pickle.loads(pickle.dumps(optimizer))


@by_entry
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_after_scheduler_and_hooks_steps_its_own_parameters(info, how):
    """A copy made after ``StepLR(opt)`` and with step hooks registered steps its own
    parameters (the original's stay bit-identical), exactly as the original then steps.

    Like torch's optimizers, the copy carries defaults, state, param groups and the
    optimizer's own settings, not the instance's hooks or the scheduler's step wrapper
    (found on today's code: the copy of ``E`` moved the original's parameters; pickling
    raised on the wrapper; a copied Lamb/ALTO lost ``max_grad_norm``).
    """
    params = make_params(info)
    optimizer = info.build(params)
    run_steps(info, optimizer, params, range(2))
    scheduler = StepLR(optimizer, step_size=1, gamma=0.5)
    fired = []
    optimizer.register_step_pre_hook(lambda *_: fired.append("pre"))
    optimizer.register_step_post_hook(lambda *_: fired.append("post"))
    run_steps(info, optimizer, params, range(2, 3))
    scheduler.step()
    assert fired == ["pre", "post"]

    twin = _copy(optimizer, how)
    twin_params = all_params(twin)
    assert len(twin_params) == len(params)
    for p, q in zip(params, twin_params):
        assert q is not p and q.data_ptr() != p.data_ptr(), "the copy shares a parameter"
    for group, twin_group in zip(optimizer.param_groups, twin.param_groups):
        assert twin_group["lr"] == group["lr"]
    before = [p.detach().clone() for p in params]

    run_steps(info, twin, twin_params, range(3, 5))
    _assert_params_equal(params, before, "original parameter (after stepping the copy)")
    assert any(not torch.equal(q.detach(), b) for q, b in zip(twin_params, before)), (
        "the copy's parameters did not move"
    )
    assert fired == ["pre", "post"], "the copy ran the original instance's hooks"

    run_steps(info, optimizer, params, range(3, 5))
    assert fired == ["pre", "post"] * 3
    _assert_params_equal(twin_params, params, "copy's parameter vs original's")
    scheduler.step()  # the original's scheduler still drives the original


@by_entry
def test_deepcopy_copies_all_public_attributes(info):
    """torch's ``test_deepcopy_copies_all_public_attrs``, after a few steps."""
    params = make_params(info)
    optimizer = info.build(params)
    run_steps(info, optimizer, params, range(3))

    def public(obj):
        return {k for k in obj.__dict__ if not k.startswith("_")}

    assert public(copy.deepcopy(optimizer)) == public(optimizer)


@by_entry
def test_weights_only_checkpoint_resumes_bit_exactly(info):
    """``torch.load(weights_only=True)`` reads the state dict back equal and resumes exactly."""
    params = make_params(info)
    optimizer = info.build(params)
    run_steps(info, optimizer, params, range(3))
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert_same(loaded, optimizer.state_dict())

    twin_params = clone_params(params)
    twin = info.build(twin_params)
    twin.load_state_dict(loaded)
    run_steps(info, optimizer, params, range(3, 6))
    run_steps(info, twin, twin_params, range(3, 6))
    _assert_params_equal(twin_params, params)


# -- hooks ----------------------------------------------------------------------------------


@by_entry
def test_global_and_instance_step_hooks_fire_once_per_step(info):
    """torch's ``test_step_all_hooks``: global pre, local pre, local post, global post, once
    per user-visible ``step()`` (today the global hooks fire again for E's base)."""
    params = make_params(info)
    optimizer = info.build(params)
    data = []
    seen = []

    def global_pre(opt, args, kwargs):
        seen.append(opt)
        data.append(0)

    def global_post(opt, args, kwargs):
        seen.append(opt)
        data.append(5)

    handles = [
        register_optimizer_step_pre_hook(global_pre),
        register_optimizer_step_post_hook(global_post),
        optimizer.register_step_pre_hook(lambda *_: data.append(1)),
        optimizer.register_step_post_hook(lambda *_: data.append(2)),
    ]
    try:
        run_steps(info, optimizer, params, range(1))
        assert data == [0, 1, 2, 5]
        run_steps(info, optimizer, params, range(1, 2))
        assert data == [0, 1, 2, 5] * 2
        assert all(opt is optimizer for opt in seen), "a hook saw an inner optimizer"
    finally:
        for handle in handles:
            handle.remove()
    run_steps(info, optimizer, params, range(2, 3))
    assert data == [0, 1, 2, 5] * 2


def _state_dict_pre_hook(optimizer):
    optimizer.state["test"] = 1


def _state_dict_post_hook(optimizer, state_dict):
    state_dict["ran_state_dict_pre_hook"] = "test" in state_dict["state"]
    state_dict["state"].pop("test", None)
    return state_dict


@by_entry
def test_state_dict_keeps_what_a_pre_hook_puts_in_state(info):
    """torch's ``test_state_dict_pre_hook`` / ``_pre_post_hook``, after a few steps."""
    params = make_params(info)
    optimizer = info.build(params)
    run_steps(info, optimizer, params, range(2))
    optimizer.register_state_dict_pre_hook(_state_dict_pre_hook)
    assert optimizer.state_dict()["state"]["test"] == 1
    optimizer.register_state_dict_post_hook(_state_dict_post_hook)
    state_dict = optimizer.state_dict()
    assert state_dict["ran_state_dict_pre_hook"] is True
    assert "test" not in state_dict["state"]


def _load_pre_hook_lr_002(optimizer, state_dict):
    state_dict["param_groups"][0]["lr"] = 0.002


def _load_pre_hook_lr_003(optimizer, state_dict):
    state_dict = copy.deepcopy(state_dict)
    state_dict["param_groups"][0]["lr"] = 0.003
    return state_dict


def _load_post_hook(optimizer):
    optimizer.state["ran_load_state_dict_pre_hook2"] = optimizer.param_groups[0]["lr"] == 0.003
    optimizer.state["ran_load_state_dict_post_hook"] = True


@by_entry
def test_load_state_dict_pre_hooks_and_prepend(info):
    """torch's ``test_load_state_dict_pre_hook_and_prepend``."""
    params = make_params(info)
    optimizer = info.build(params)
    run_steps(info, optimizer, params, range(2))
    state_dict = optimizer.state_dict()
    optimizer.register_load_state_dict_pre_hook(_load_pre_hook_lr_002)
    optimizer.load_state_dict(state_dict)
    assert optimizer.param_groups[0]["lr"] == 0.002
    optimizer.register_load_state_dict_pre_hook(_load_pre_hook_lr_003, prepend=True)
    optimizer.load_state_dict(state_dict)
    assert optimizer.param_groups[0]["lr"] == 0.002


@by_entry
def test_load_post_hook_may_write_a_non_dict_value_into_state(info):
    """torch's ``test_load_state_dict_post_hook``: a post-hook writes ``True`` under a string
    key of ``optimizer.state``. torch's optimizers accept it, save it, load it again and step
    (today Lamb, ALTO, AdaBelief and Muon crash inside ``load_state_dict``)."""
    params = make_params(info)
    optimizer = info.build(params)
    run_steps(info, optimizer, params, range(2))
    optimizer.register_load_state_dict_pre_hook(_load_pre_hook_lr_003)
    optimizer.register_load_state_dict_post_hook(_load_post_hook)
    optimizer.load_state_dict(optimizer.state_dict())
    assert optimizer.state["ran_load_state_dict_pre_hook2"] is True
    assert optimizer.state["ran_load_state_dict_post_hook"] is True
    optimizer.load_state_dict(optimizer.state_dict())  # the non-dict value round-trips
    assert optimizer.state["ran_load_state_dict_post_hook"] is True
    before = [p.detach().clone() for p in params]
    run_steps(info, optimizer, params, range(2, 3))
    assert any(not torch.equal(p.detach(), b) for p, b in zip(params, before))


# -- bad state dicts ------------------------------------------------------------------------

# Keys created lazily by the precision contract (a state dict without them loads): deleting
# one is not a fault.
_OPTIONAL_KEYS = {"kahan_comp", "nonfinite_skips"}
# Keys an optimizer creates afresh when a state dict lacks them, as torch does: torch's SGD
# (and Muon after it) starts a missing ``momentum_buffer`` at the next gradient, and the
# adaptor loads a base-only checkpoint with fresh ``explore_buffer``\ s. Deleting one of
# them is a valid (if lossy) checkpoint, not a fault.
_RECREATED_KEYS = {"momentum_buffer", "explore_buffer"}


def _victim(state_dict, *, required=False):
    """``(index, key)``: a parameter-sized state tensor of the last parameter with state.

    Keys of the base are preferred to the adaptor's ``explore_buffer``. ``required``: only
    keys the optimizer cannot recreate (``None`` when there is none).
    """
    index = max(i for i in state_dict["state"] if isinstance(i, int))
    entry = state_dict["state"][index]
    skip = _OPTIONAL_KEYS | (_RECREATED_KEYS if required else set())
    keys = [
        k for k, v in entry.items()
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and k not in skip
    ]
    keys.sort(key=lambda k: (k == "explore_buffer", str(k)))
    if not keys:
        assert required, f"no parameter-sized state tensor for parameter {index}: {sorted(entry)}"
        return index, None
    return index, keys[0]


def _shape_pattern(shape):
    dims = [str(d) for d in shape]
    return r"[\[(]" + r",\s*".join(dims) + r",?[\])]"


def _corrupt(state_dict, fault):
    """The corrupted state dict and the regex the ``ValueError`` message must match."""
    bad = copy.deepcopy(state_dict)
    if fault in ("wrong-shape", "missing-key", "unknown-key"):
        index, key = _victim(bad, required=fault == "missing-key")
        if key is None:
            pytest.skip(
                "every parameter-sized state key of this optimizer is recreated when missing "
                f"({sorted(_RECREATED_KEYS)}): a missing key is not a fault"
            )
        entry = bad["state"][index]
        if fault == "wrong-shape":
            shape = list(entry[key].shape)
            shape[-1] += 1
            entry[key] = torch.zeros(shape, dtype=entry[key].dtype)
            # names the parameter index, the key and the wrong shape
            return bad, rf"(?s)(?=.*\b{index}\b)(?=.*{re.escape(key)})(?=.*{_shape_pattern(shape)})"
        if fault == "missing-key":
            del entry[key]
            return bad, rf"(?s)(?=.*\b{index}\b)(?=.*{re.escape(key)})"
        entry["bogus_key"] = torch.zeros(3)
        return bad, rf"(?s)(?=.*\b{index}\b)(?=.*bogus_key)"
    if fault == "param-count":
        bad["param_groups"][0]["params"] = bad["param_groups"][0]["params"][:-1]
        return bad, r"size|number|param"
    if fault == "group-count":
        bad["param_groups"].append({**bad["param_groups"][0], "params": []})
        return bad, r"number of parameter groups|param.*group"
    raise AssertionError(fault)


_FAULTS = [
    pytest.param(*param.values, fault, id=f"{fault}-{param.id}", marks=param.marks)
    for fault in ("wrong-shape", "missing-key", "unknown-key", "param-count", "group-count")
    # torch loads wrong shapes and keys silently: its reference runs only the count faults
    for param in entries() + (entries(REFERENCE) if fault.endswith("count") else [])
]


@pytest.mark.parametrize(("info", "fault"), _FAULTS)
def test_bad_state_dict_raises_and_leaves_the_optimizer_unchanged(info, fault):
    """A corrupted checkpoint is refused with a ``ValueError`` naming the parameter index,
    the key (and, for shapes, the shape), and nothing is half-loaded: state, param groups
    and parameters are bit-identical, and the next steps equal those of a twin loaded from
    the good state dict. (torch itself raises ``ValueError`` for the param/group counts.)"""
    params = make_params(info)
    optimizer = info.build(params)
    run_steps(info, optimizer, params, range(3))
    good = state_snapshot(optimizer)
    before = [p.detach().clone() for p in params]
    bad, message = _corrupt(good, fault)

    with pytest.raises(ValueError, match=message):
        optimizer.load_state_dict(bad)

    assert_same(state_snapshot(optimizer), good)
    _assert_params_equal(params, before)
    twin_params = clone_params(params)
    twin = info.build(twin_params)
    twin.load_state_dict(copy.deepcopy(good))
    run_steps(info, optimizer, params, range(3, 5))
    run_steps(info, twin, twin_params, range(3, 5))
    _assert_params_equal(params, twin_params)
