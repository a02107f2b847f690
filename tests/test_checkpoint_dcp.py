"""torch.distributed.checkpoint for every optimizer of the library (one gloo process).

``get_optimizer_state_dict`` keys ``state`` and the groups' ``params`` by parameter name
(FQN); ``set_optimizer_state_dict`` maps them back. For each optimizer and each way of
saving (the default sharded-style dict, ``full_state_dict=True``,
``flatten_optimizer_state_dict=True``, and ``dcp.save`` → ``dcp.load`` through files), a
run trained 2 steps, saved, loaded into a fresh model and optimizer (different initial
weights, then the model's weights copied) and continued for 2 steps must equal the
uninterrupted run bit for bit. Known failures are strict xfails with their cause. The FSDP2
(two-process) counterpart is in ``tests/backends/test_first_order_distributed.py``.
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
    "e-spsa-sgd": lambda ps: explore(
        SPSA(perturbation=1e-3, seed=5), torch.optim.SGD(ps, lr=0.05, momentum=0.9),
        alpha=0.5, beta=0.01,
    ),
}
OPTIMIZERS["e-spsa-sgd-own-estimator-entry"] = OPTIMIZERS["e-spsa-sgd"]
MODES = ("default", "full", "dcp", "flat")

# Known failures, each for a reason outside backends/first_order.py (see the notes):
_DTYPE_IN_GROUP = (
    "a torch.dtype in a param group (Muon's ns_dtype, Shampoo's preconditioner_dtype): "
    "full_state_dict=True raises 'Unexpected value type <class 'torch.dtype'>'"
)
_ESTIMATOR_DROPPED = (
    "get_optimizer_state_dict keeps only 'state' and 'param_groups': E's top-level "
    "'explore_estimator' (SPSA's seed and step) is dropped, the resumed run draws other "
    "directions"
)
_FLAT_DROPS_BASE_STATE = (
    "flatten_optimizer_state_dict=True: torch rebuilds each parameter's entry from the keys "
    "of optimizer.state[p], which for E holds only the adaptor's buffer: the base's state "
    "(Lamb's moments, SGD's momentum) is silently dropped"
)
XFAIL = {
    ("e-lamb", "flat"): _FLAT_DROPS_BASE_STATE,
    ("e-lamb-state-dtype", "flat"): _FLAT_DROPS_BASE_STATE,
    ("e-spsa-sgd", "flat"): _FLAT_DROPS_BASE_STATE,
    ("e-spsa-sgd-own-estimator-entry", "flat"): _FLAT_DROPS_BASE_STATE,
    ("muon", "full"): _DTYPE_IN_GROUP,
    ("shampoo-dtype", "full"): _DTYPE_IN_GROUP,
    ("e-spsa-sgd", "default"): _ESTIMATOR_DROPPED,
    ("e-spsa-sgd", "full"): _ESTIMATOR_DROPPED,
    ("e-spsa-sgd", "dcp"): _ESTIMATOR_DROPPED,
}


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
    resumed_model, resumed = _build(name, seed=1)
    if name.startswith("e-spsa"):
        # torch's get/set_optimizer_state_dict first call optimizer.step(closure=None) on an
        # optimizer with empty state and no gradients (``_init_optim_state``: a dry step that
        # creates the state DCP loads into), which SPSA refuses (it needs a closure). One
        # real step before loading creates the state; the load replaces all of it.
        _train(name, resumed_model, resumed, range(1))
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


CASES = [
    pytest.param(name, mode, marks=[pytest.mark.xfail(strict=True, reason=XFAIL[name, mode])]
                 if (name, mode) in XFAIL else [])
    for name in OPTIMIZERS
    for mode in MODES
]


@pytest.mark.parametrize(("name", "mode"), CASES)
def test_resume_is_bit_exact(process_group, tmp_path, name, mode):
    """Bit-exact resume. ``e-spsa-sgd-own-estimator-entry``: SPSA's seed and step saved
    beside the optimizer's dict (``optimizer.estimator.state_dict()``) and loaded back with
    ``optimizer.estimator.load_state_dict``: the workaround until E puts them where torch's
    functions keep them."""
    model, resumed_model = _resume(name, mode, tmp_path)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_state_dtype_is_saved_by_name_and_loads_back():
    """DCP refuses torch.dtype values, so a group's ``state_dtype`` is saved as its name;
    loading turns it back into the dtype (state cast to it), and a name that is not a
    floating dtype raises, naming the group, with the optimizer unchanged."""
    model, optimizer = _build("lamb-state-dtype", seed=0)
    _train("lamb-state-dtype", model, optimizer, range(2))
    saved = optimizer.state_dict()
    assert saved["param_groups"][0]["state_dtype"] == "float64"
    _, fresh = _build("lamb-state-dtype", seed=1)
    fresh.param_groups[0]["state_dtype"] = torch.float32  # the load must restore float64
    fresh.load_state_dict(copy.deepcopy(saved))
    assert fresh.param_groups[0]["state_dtype"] is torch.float64
    assert all(s["exp_avg"].dtype == torch.float64 for s in fresh.state.values())
    broken = copy.deepcopy(saved)
    broken["param_groups"][0]["state_dtype"] = "int32"
    before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError, match=r"param group 0: state_dtype: 'int32'"):
        optimizer.load_state_dict(broken)
    after = optimizer.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for index, entry in before["state"].items():
        assert all(torch.equal(v, after["state"][index][k]) for k, v in entry.items())
