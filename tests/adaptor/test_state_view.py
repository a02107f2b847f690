"""``E.state``: the adaptor's own per-parameter state seen merged with the base's.

``torch.distributed.checkpoint``'s flattened load rebuilds each parameter's entry from the
keys of ``optimizer.state[p]``; E keeps only its buffer there and the base keeps the rest,
so the view lists both (and writes each key back to the entry that owns it).
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from adaptor import E
from backends import Lamb


def _trained(base_factory, steps=2, **e_kwargs):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(4))]
    optimizer = E(base_factory(params), alpha=-2.0, beta=0.9, **e_kwargs)
    for step in range(steps):
        _step(optimizer, params, step)
    return params, optimizer


def _step(optimizer, params, step):
    generator = torch.Generator().manual_seed(step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    optimizer.step()


def _adam(params):
    return torch.optim.Adam(params, lr=1e-2)


def test_the_view_lists_the_adaptors_and_the_bases_keys_as_live_objects():
    params, optimizer = _trained(_adam)
    for p in params:
        entry = optimizer.state[p]
        assert list(entry) == ["explore_buffer", "step", "exp_avg", "exp_avg_sq"]
        assert len(entry) == 4 and "exp_avg" in entry and "nope" not in entry
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert entry[key] is optimizer.base.state[p][key]
        assert "explore_buffer" not in optimizer.base.state[p]
        assert dict(entry).keys() == {"explore_buffer", "step", "exp_avg", "exp_avg_sq"}
    assert list(optimizer.state) == params and len(optimizer.state) == 2
    assert all(p in optimizer.state for p in params)


def test_writes_go_to_the_entry_that_owns_the_key():
    params, optimizer = _trained(_adam)
    p = params[0]
    exp_avg, buffer = torch.ones_like(p), torch.full_like(p, 2.0)
    optimizer.state[p]["exp_avg"] = exp_avg
    optimizer.state[p]["explore_buffer"] = buffer
    optimizer.state[p]["note"] = 7  # a new key (hooks write such): the adaptor's own
    assert optimizer.base.state[p]["exp_avg"] is exp_avg
    assert "explore_buffer" not in optimizer.base.state[p]
    assert "note" not in optimizer.base.state[p]
    assert optimizer.state[p]["explore_buffer"] is buffer and optimizer.state[p]["note"] == 7
    del optimizer.state[p]["note"]
    assert "note" not in optimizer.state[p]
    # replacing a whole entry: each key to its owner, keys left out removed from both
    optimizer.state[p] = {"explore_buffer": buffer, "exp_avg": exp_avg, "step": torch.tensor(5.0)}
    assert set(optimizer.base.state[p]) == {"exp_avg", "step"}
    assert set(optimizer.state[p]) == {"explore_buffer", "exp_avg", "step"}
    del optimizer.state[p]
    assert p not in optimizer.state and p not in optimizer.base.state
    with pytest.raises(KeyError):
        optimizer.state[p]["exp_avg"]


def test_the_adaptors_skip_counter_shadows_the_bases():
    """Both count skipped steps under ``nonfinite_skips``; the view reads the adaptor's."""
    params, optimizer = _trained(
        lambda ps: Lamb(ps, lr=1e-2, skip_nonfinite=True), skip_nonfinite=True
    )
    p = params[0]
    base_counter = optimizer.base.state[p]["nonfinite_skips"]
    assert optimizer.state[p]["nonfinite_skips"] is not base_counter
    assert list(optimizer.state[p]).count("nonfinite_skips") == 1
    optimizer.state[p]["nonfinite_skips"] = torch.tensor(3.0)  # the adaptor's, not the base's
    assert optimizer.base.state[p]["nonfinite_skips"] is base_counter


def test_state_of_a_base_with_state_is_not_empty_so_torchs_dry_step_is_skipped():
    """E over a trained base (its own buffers not made yet, e.g. after loading a plain base
    state dict) has state: torch's ``_init_optim_state`` must not make its dry step, which
    would decay SGD's momentum (buf ← μ·buf with zero gradients)."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4))]
    base = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    params[0].grad = torch.randn(3, 4)
    base.step()
    base.zero_grad()
    momentum = base.state[params[0]]["momentum_buffer"].clone()
    optimizer = E(base, alpha=-2.0, beta=0.9)
    assert optimizer.state and "explore_buffer" not in optimizer.state[params[0]]
    _init_optim_state(optimizer)
    assert torch.equal(base.state[params[0]]["momentum_buffer"], momentum)


def test_copies_and_pickles_keep_a_working_view():
    params, optimizer = _trained(_adam)
    entry = copy.deepcopy(optimizer.state[params[0]])
    assert type(entry) is dict and set(entry) == {"explore_buffer", "step", "exp_avg", "exp_avg_sq"}
    assert entry["exp_avg"] is not optimizer.base.state[params[0]]["exp_avg"]
    twins = [copy.deepcopy(optimizer), pickle.loads(pickle.dumps(optimizer))]
    twin_params = [[p for group in t.param_groups for p in group["params"]] for t in twins]
    for twin, qs in zip(twins, twin_params):
        for p, q in zip(params, qs):
            assert set(twin.state[q]) == set(optimizer.state[p])
            assert twin.state[q]["exp_avg"] is twin.base.state[q]["exp_avg"]
            buffer = optimizer.state[p]["explore_buffer"]
            assert torch.equal(twin.state[q]["explore_buffer"], buffer)
    _step(optimizer, params, 5)
    for twin, qs in zip(twins, twin_params):
        _step(twin, qs, 5)
        assert all(torch.equal(p, q) for p, q in zip(params, qs))
