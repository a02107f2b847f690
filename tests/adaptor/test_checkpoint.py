"""E with torch.distributed.checkpoint (issue 12, single process): FQN-keyed state dicts.

``get_optimizer_state_dict`` keys ``state`` and the groups' ``params`` by parameter name;
``ExploredOptimizer.load_state_dict`` maps the saved groups' ids to the current
parameters in order, as torch's ``Optimizer.load_state_dict`` does. One gloo process.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from adaptor import E

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def _build(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    return model, E(torch.optim.AdamW(model.parameters(), lr=1e-2), alpha=-5.0, beta=0.99)


def _train(model, optimizer, steps):
    for step in steps:
        generator = torch.Generator().manual_seed(step)
        optimizer.zero_grad()
        model(torch.randn(5, 4, generator=generator)).square().sum().backward()
        optimizer.step()


@pytest.mark.parametrize("flatten", [False], ids=["nested"])
def test_get_and_set_optimizer_state_dict_resume_bit_exactly(process_group, flatten):
    """Bug: set_optimizer_state_dict raised 'state_dict has an explore buffer for parameter
    index '0.weight''. Now a get → set into a fresh model and optimizer → continue equals
    the uninterrupted run bit for bit.

    Not supported (documented): ``flatten_optimizer_state_dict=True``: torch rebuilds the
    nested dict from the keys of ``optimizer.state[p]``, which for E holds only the
    adaptor's buffer (the base keeps its own state), so the base's state is dropped."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    model, optimizer = _build()
    _train(model, optimizer, range(3))
    saved = get_optimizer_state_dict(model, optimizer, options=options)
    if not flatten:
        assert "explore_buffer" in saved["state"]["0.weight"]
        assert saved["param_groups"][0]["params"][0] == "0.weight"
    saved = copy.deepcopy(saved)  # torch's load shares uncast tensors with the dict

    resumed_model, resumed = _build(seed=1)
    resumed_model.load_state_dict(model.state_dict())
    set_optimizer_state_dict(resumed_model, resumed, saved, options=options)
    _train(model, optimizer, range(3, 6))
    _train(resumed_model, resumed, range(3, 6))
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(optimizer.state[p]["explore_buffer"], resumed.state[q]["explore_buffer"])


def test_dcp_save_and_load_continue_bit_exactly(process_group, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    model, optimizer = _build()
    _train(model, optimizer, range(2))
    dcp.save(
        {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, optimizer)},
        checkpoint_id=tmp_path / "checkpoint",
    )
    resumed_model, resumed = _build(seed=1)
    target = {
        "model": resumed_model.state_dict(),
        "optim": get_optimizer_state_dict(resumed_model, resumed),
    }
    dcp.load(target, checkpoint_id=tmp_path / "checkpoint")
    resumed_model.load_state_dict(target["model"])
    set_optimizer_state_dict(resumed_model, resumed, target["optim"])
    _train(model, optimizer, range(2, 4))
    _train(resumed_model, resumed, range(2, 4))
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_fqn_keyed_state_with_a_wrong_name_raises_clearly():
    """Ids that the saved groups do not list cannot be matched: a clear error, nothing
    loaded."""
    model, optimizer = _build()
    _train(model, optimizer, range(1))
    state_dict = optimizer.state_dict()
    names = [name for name, _ in model.named_parameters()]
    state_dict["state"] = {names[i]: entry for i, entry in state_dict["state"].items()}
    state_dict["param_groups"][0]["params"] = names
    before = {k: v.clone() for k, v in optimizer.state[next(model.parameters())].items()}
    broken = copy.deepcopy(state_dict)
    broken["state"]["0.wieght"] = broken["state"].pop("0.weight")
    with pytest.raises(ValueError, match=r"parameter index '0.wieght'"):
        optimizer.load_state_dict(broken)
    after = optimizer.state[next(model.parameters())]
    assert all(torch.equal(after[k], v) for k, v in before.items())
    optimizer.load_state_dict(state_dict)  # the well-named one loads


def test_estimator_state_travels_in_the_first_group_too():
    """DCP keeps only "state" and "param_groups": SPSA's seed and step must survive without
    the top-level "explore_estimator" key, and the copy must not stay in the live groups."""
    from adaptor import explore
    from backends import SPSA

    params = [torch.nn.Parameter(torch.randn(3, 2))]
    optimizer = explore(SPSA(seed=7), torch.optim.SGD(params, lr=0.1))
    optimizer.step(lambda: (params[0] ** 2).sum())
    saved = optimizer.state_dict()
    assert saved["param_groups"][0]["explore_estimator"] == saved["explore_estimator"]
    del saved["explore_estimator"]
    fresh_params = [torch.nn.Parameter(params[0].detach().clone())]
    fresh = explore(SPSA(seed=1), torch.optim.SGD(fresh_params, lr=0.1))
    fresh.load_state_dict(saved)
    assert fresh.estimator.state_dict() == optimizer.estimator.state_dict()
    assert all("explore_estimator" not in group for group in fresh.param_groups)
