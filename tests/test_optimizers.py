"""Generic tests run over every entry of the capability table (``tests/optim_db.py``)."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from tests.optim_db import (
    EXPLORED,
    OPTIMIZERS,
    entries,
    loss_fn,
    make_closure,
    make_params,
    run_steps,
    step_with_empty_grads,
)
from tests.probes import compiled_graph_reads, host_read_probe

by_name = pytest.mark.parametrize("info", entries())


def _snapshot(params):
    return [p.detach().clone() for p in params]


def _assert_all_equal(actual, expected):
    for i, (a, b) in enumerate(zip(actual, expected)):
        assert torch.equal(a, b), f"parameter {i} differs: max |diff| {(a - b).abs().max()}"


@by_name
def test_step_on_meta_device(info):
    """No host reads: a step must run where tensors hold no data at all.

    ``str(t)`` and f-strings of a meta tensor do not fail (they print ``device='meta'``), so
    the steps also run under the host-read probe, which counts them (``direct``: reads
    written in library code; torch's meta kernels may format the data-less meta tensors).
    """
    params = make_params(info, device="meta")
    optimizer = info.build(params)
    with host_read_probe(direct=True) as reads:
        step_with_empty_grads(info, optimizer, params, range(3))
    assert reads == [], f"host reads inside step() on meta: {reads}"
    assert all(p.device.type == "meta" for p in params)


@by_name
def test_no_host_reads_in_steady_state_step(info):
    params = make_params(info)
    optimizer = info.build(params)
    run_steps(info, optimizer, params, range(3))
    closure = make_closure(info, optimizer, params, 3)
    if info.closure_kind == "loss":
        with host_read_probe() as reads:
            optimizer.step(closure)
    else:
        closure()  # backward outside the probe: only the optimizer's step is measured
        with host_read_probe() as reads:
            optimizer.step()
    assert reads == [], f"host reads inside step(): {reads}"


@pytest.mark.parametrize(
    "info", entries(when=lambda info: info.fused_compile and info.shapes is not None)
)
def test_compiled_kernels_read_no_value_on_the_host(info):
    """The entries whose tensors are large enough for the compiled kernels (the CUDA
    default), with their kernels traced anew: no graph holds a host read (``item``,
    ``tolist``), which the probe of the test above cannot see inside a compiled kernel.
    Mutation caught: ``float(ratio)`` in Lamb/ALTO's compiled pass 1."""
    params = make_params(info)
    optimizer = info.build(params)
    with compiled_graph_reads() as (graphs, reads):
        run_steps(info, optimizer, params, range(3))
    assert graphs, "no kernel was compiled: the entry's compiled path did not run"
    assert reads == [], f"host reads inside compiled kernels: {reads}"


@by_name
def test_resume_from_state_dict_is_bit_exact(info, device):
    params = make_params(info, device)
    optimizer = info.build(params)
    run_steps(info, optimizer, params, range(4))
    saved = copy.deepcopy(optimizer.state_dict())
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    run_steps(info, optimizer, params, range(4, 9))

    resumed = info.build(resumed_params)
    resumed.load_state_dict(copy.deepcopy(saved))
    run_steps(info, resumed, resumed_params, range(4, 9))
    _assert_all_equal([p.detach() for p in resumed_params], [p.detach() for p in params])


@by_name
def test_parameter_without_grad_keeps_its_state(info):
    params = make_params(info)
    optimizer = info.build(params)
    run_steps(info, optimizer, params, range(2))
    frozen = params[1]
    state_before = copy.deepcopy(optimizer.state_dict()["state"].get(1))
    value_before = frozen.detach().clone()
    if info.closure_kind == "loss":
        frozen.requires_grad_(False)
        frozen.grad = None
        optimizer.step(make_closure(info, optimizer, params, 2))
    else:
        optimizer.zero_grad()
        loss_fn(params, 2).backward()
        frozen.grad = None
        optimizer.step()
    assert torch.equal(frozen.detach(), value_before)
    state_after = optimizer.state_dict()["state"].get(1)
    if state_before is None:
        assert not state_after
    else:
        assert state_after.keys() == state_before.keys()
        for key, value in state_before.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(state_after[key], value), key
            else:
                assert state_after[key] == value, key
    assert not torch.equal(params[0].detach(), make_params(info)[0]), "others must move"


@by_name
def test_param_groups_with_different_hyperparameters(info):
    params = make_params(info)
    first, second = params[:2], params[2:]
    optimizer = info.build([{"params": first}, {"params": second, **info.group_override}])
    for key, value in info.group_override.items():
        assert optimizer.param_groups[1][key] == value
    start = _snapshot(params)
    run_steps(info, optimizer, params, range(5))
    if not info.groups_independent:
        for p, p0 in zip(params, start):
            assert not torch.equal(p.detach(), p0)
        return
    # Each group must behave as its own optimizer with its own hyperparameters.
    alone = [p.detach().clone().requires_grad_() for p in start]
    opt_first = info.build(alone[:2])
    opt_second = info.build(alone[2:], **info.group_override)
    for step in range(5):
        for opt in (opt_first, opt_second):
            opt.zero_grad()
        loss_fn(alone, step).backward()
        opt_first.step()
        opt_second.step()
    for p, q in zip(params, alone):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


_INVALID = [
    pytest.param(info, make, exc, match, id=f"{info.name}-{i}")
    for info in OPTIMIZERS
    for i, (make, exc, match) in enumerate(info.invalid)
]


@pytest.mark.parametrize(("info", "make", "exc", "match"), _INVALID)
def test_invalid_hyperparameters_raise_clear_errors(info, make, exc, match):
    params = make_params(info)
    before = _snapshot(params)
    with pytest.raises(exc, match=match):
        make(params)
    _assert_all_equal([p.detach() for p in params], before)


def test_every_entry_declares_invalid_inputs():
    missing = [info.name for info in OPTIMIZERS if not info.invalid]
    assert missing == []


@pytest.mark.parametrize("info", entries(EXPLORED))
def test_alpha_zero_is_the_base_bit_for_bit(info):
    params = make_params(info)
    twin = [p.detach().clone().requires_grad_() for p in params]
    explored = info.build(params, alpha=0.0)
    base = info.base(twin)
    run_steps(info, explored, params, range(10))
    run_steps(info, base, twin, range(10))
    _assert_all_equal([p.detach() for p in params], [p.detach() for p in twin])
    # and the adaptor is not a no-op otherwise
    moved = [p.detach().clone().requires_grad_() for p in make_params(info)]
    explored = info.build(moved)
    run_steps(info, explored, moved, range(10))
    assert any(not torch.equal(a.detach(), b.detach()) for a, b in zip(moved, twin))


def test_names_are_unique_and_readable():
    for info in OPTIMIZERS:
        assert re.fullmatch(r"[\w()\-.,+= ]+", info.name), info.name
