"""torch.distributed.checkpoint for every optimizer of the library (one gloo process).

``get_optimizer_state_dict`` keys ``state`` and the groups' ``params`` by parameter name
(FQN); ``set_optimizer_state_dict`` maps them back. For each optimizer and each way of
saving (the default sharded-style dict, ``full_state_dict=True``,
``flatten_optimizer_state_dict=True``, and ``dcp.save`` → ``dcp.load`` through files), a
run trained 2 steps, saved, loaded into a fresh model and optimizer (different initial
weights, then the model's weights copied) and continued for 2 steps must equal the
uninterrupted run bit for bit, always into a fresh optimizer (no step before the load). The
FSDP2 (two-process) counterpart is in ``tests/backends/test_first_order_distributed.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from adaptor import E, explore
from backends import ALTO, SPSA, AdaBelief, Lamb, Muon, Shampoo

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing"),
    pytest.mark.xdist_group("torch_distributed"),
]

OPTIMIZERS = {
    "lamb": lambda ps: Lamb(ps, lr=0.05, weight_decay=0.1),
    "lamb-state-dtype": lambda ps: Lamb(ps, lr=0.05, state_dtype=torch.float64),
    "alto": lambda ps: ALTO(ps, lr=0.05),
    "adabelief": lambda ps: AdaBelief(ps, lr=0.05, weight_decay=0.1),
    "e-lamb": lambda ps: E(Lamb(ps, lr=0.05), alpha=-5.0, beta=0.99),
    "e-lamb-state-dtype": lambda ps: E(
        Lamb(ps, lr=0.05, state_dtype=torch.float64), alpha=-5.0, beta=0.99
    ),
    "muon": lambda ps: Muon(ps, lr=0.02, ns_dtype=torch.float32),
    "shampoo": lambda ps: Shampoo(
        ps, lr=0.01, precondition_frequency=1, start_preconditioning_step=1
    ),
    "shampoo-dtype": lambda ps: Shampoo(
        ps, lr=0.01, precondition_frequency=1, start_preconditioning_step=1,
        preconditioner_dtype=torch.float64,
    ),
    # every torch.dtype a group can hold, saved by name (DCP refuses torch.dtype values)
    "muon-state-dtype": lambda ps: Muon(ps, lr=0.02, state_dtype=torch.float64),
    "shampoo-state-dtype": lambda ps: Shampoo(
        ps, lr=0.01, precondition_frequency=1, start_preconditioning_step=1,
        preconditioner_dtype=torch.float32, state_dtype=torch.float64,
    ),
    "e-spsa-sgd": lambda ps: explore(
        SPSA(perturbation=1e-3, seed=5), torch.optim.SGD(ps, lr=0.05, momentum=0.9),
        alpha=0.5, beta=0.01,
    ),
}
OPTIMIZERS["e-spsa-sgd-own-estimator-entry"] = OPTIMIZERS["e-spsa-sgd"]
MODES = ("default", "full", "dcp", "flat")

@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    store = tmp_path_factory.mktemp("dcp_store") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _build(name: str, seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    return model, OPTIMIZERS[name](model.parameters())


def _train(name, model, optimizer, steps) -> None:
    for step in steps:
        generator = torch.Generator().manual_seed(step)
        x, y = torch.randn(5, 4, generator=generator), torch.randn(5, 2, generator=generator)
        loss = lambda x=x, y=y: torch.nn.functional.mse_loss(model(x), y)  # noqa: E731
        if name.startswith("e-spsa"):
            optimizer.step(loss)  # the estimator evaluates the loss itself
            continue
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()


def _resume(name: str, mode: str, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    model, optimizer = _build(name, seed=0)
    _train(name, model, optimizer, range(2))
    # A fresh optimizer: torch's get/set_optimizer_state_dict first make a dry step
    # (``_init_optim_state``: closure=None, zero gradients, lr 0) to create the state they
    # load into; E(SPSA) creates it without calling the estimator.
    resumed_model, resumed = _build(name, seed=1)
    resumed_model.load_state_dict(model.state_dict())
    options = StateDictOptions(
        full_state_dict=mode == "full", flatten_optimizer_state_dict=mode == "flat"
    )
    own_entry = name.endswith("own-estimator-entry")  # the workaround for SPSA's state
    if mode == "dcp":
        checkpoint = {"optim": get_optimizer_state_dict(model, optimizer)}
        if own_entry:
            checkpoint["estimator"] = optimizer.estimator.state_dict()
        dcp.save(checkpoint, checkpoint_id=tmp_path / "checkpoint")
        target = {"optim": get_optimizer_state_dict(resumed_model, resumed)}
        if own_entry:
            target["estimator"] = resumed.estimator.state_dict()
        dcp.load(target, checkpoint_id=tmp_path / "checkpoint")
        saved, estimator = target["optim"], target.get("estimator")
    else:
        saved = copy.deepcopy(get_optimizer_state_dict(model, optimizer, options=options))
        if mode != "flat":
            assert saved["param_groups"][0]["params"][0] == "0.weight"  # keyed by FQN
        estimator = optimizer.estimator.state_dict() if own_entry else None
    set_optimizer_state_dict(resumed_model, resumed, saved, options=options)
    if estimator is not None:
        resumed.estimator.load_state_dict(estimator)
    _train(name, model, optimizer, range(2, 4))
    _train(name, resumed_model, resumed, range(2, 4))
    return model, resumed_model


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_resume_is_bit_exact(process_group, tmp_path, name, mode):
    """Bit-exact resume. ``e-spsa-sgd-own-estimator-entry``: SPSA's seed and step saved
    beside the optimizer's dict (``optimizer.estimator.state_dict()``) and loaded back with
    ``optimizer.estimator.load_state_dict``: the workaround until E puts them where torch's
    functions keep them."""
    model, resumed_model = _resume(name, mode, tmp_path)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


# (entry, the group's dtype settings as saved, a state key kept in state_dtype)
_DTYPE_ENTRIES = [
    pytest.param("lamb-state-dtype", {"state_dtype": "float64"}, "exp_avg", id="Lamb"),
    pytest.param("muon-state-dtype", {"state_dtype": "float64", "ns_dtype": "bfloat16"},
                 "momentum_buffer", id="Muon"),
    pytest.param(
        "shampoo-state-dtype", {"state_dtype": "float64", "preconditioner_dtype": "float32"},
        "exp_avg", id="Shampoo",
    ),
]


@pytest.mark.parametrize(("name", "names", "state_key"), _DTYPE_ENTRIES)
def test_dtypes_in_groups_are_saved_by_name_and_load_back(name, names, state_key):
    """DCP refuses torch.dtype values, so a group's dtype settings are saved by name;
    loading turns them back into dtypes (state cast to ``state_dtype``), a saved
    ``torch.dtype`` loads too, and a name that is not a floating dtype raises, naming the
    group and the key, with the optimizer unchanged."""
    model, optimizer = _build(name, seed=0)
    _train(name, model, optimizer, range(2))
    saved = optimizer.state_dict()
    assert {key: saved["param_groups"][0][key] for key in names} == names
    for as_saved in (saved, _with_dtypes(saved)):
        _, fresh = _build(name, seed=1)
        for key in names:  # the load must restore every saved setting
            fresh.param_groups[0][key] = torch.float16
        fresh.load_state_dict(copy.deepcopy(as_saved))
        for key, dtype_name in names.items():
            assert fresh.param_groups[0][key] is getattr(torch, dtype_name)
        kept = [s[state_key].dtype for s in fresh.state.values() if state_key in s]
        assert kept and all(dtype == torch.float64 for dtype in kept)
    for key in names:
        broken = copy.deepcopy(saved)
        broken["param_groups"][0][key] = "int32"
        before = copy.deepcopy(optimizer.state_dict())
        with pytest.raises(ValueError, match=rf"param group 0: {key}: 'int32' is not the name"):
            optimizer.load_state_dict(broken)
        after = optimizer.state_dict()
        assert after["param_groups"] == before["param_groups"]
        for index, entry in before["state"].items():
            for k, v in entry.items():  # tensors, and Shampoo's int host_step
                same = torch.equal if isinstance(v, torch.Tensor) else (lambda a, b: a == b)
                assert same(v, after["state"][index][k])


def _with_dtypes(saved):
    """``saved`` with its dtype names turned back into ``torch.dtype`` values (an older
    state dict, or one written by torch's own ``state_dict``)."""
    saved = copy.deepcopy(saved)
    for group in saved["param_groups"]:
        for key in ("state_dtype", "ns_dtype", "preconditioner_dtype"):
            if isinstance(group.get(key), str):
                group[key] = getattr(torch, group[key])
    return saved
