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


def _fresh_spsa(seed: int = 3):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    optimizer = explore(
        SPSA(perturbation=1e-3, seed=11), torch.optim.SGD(model.parameters(), lr=0.05,
                                                        momentum=0.9, weight_decay=0.1),
        alpha=0.5, beta=0.01,
    )
    return model, optimizer


def test_the_dry_step_on_a_fresh_spsa_optimizer_creates_state_without_stepping(process_group):
    """``get_optimizer_state_dict`` on a fresh E(SPSA) runs torch's dry step (closure=None,
    zero gradients, lr 0): the state exists afterwards (E's buffer c = 0 and SGD's first
    momentum buf = g̃ + λθ = λθ for every parameter: what torch's dry step makes of any SGD;
    the load replaces it), the parameters and the gradients are as before
    (untouched, ``None``), the estimator was not called (SPSA's step is still 0) and the
    learning rate is back."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model, optimizer = _fresh_spsa()
    before = [p.detach().clone() for p in model.parameters()]
    saved = get_optimizer_state_dict(model, optimizer)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b) and p.grad is None
    assert optimizer.estimator.state_dict() == {"seed": 11, "step": 0}
    assert optimizer.param_groups[0]["lr"] == 0.05
    for name, p in model.named_parameters():
        entry = optimizer.state[p]
        assert set(entry) == {"explore_buffer", "momentum_buffer"}
        assert torch.equal(entry["explore_buffer"], torch.zeros_like(p))
        torch.testing.assert_close(entry["momentum_buffer"], 0.1 * p.detach(), rtol=0, atol=0)
        assert set(saved["state"][name]) == {"explore_buffer", "momentum_buffer"}
    assert saved["param_groups"][0]["explore_estimator"] == {"seed": 11, "step": 0}


def test_a_closure_less_step_that_is_not_the_dry_step_still_raises(process_group):
    """Only torch's dry step is taken for one: without a closure, an E(SPSA) step with a
    non-zero lr, with a gradient missing, or with state already there raises as before,
    and changes nothing."""
    for case in ("lr", "grad", "state"):
        model, optimizer = _fresh_spsa()
        params = list(model.parameters())
        for p in params:
            p.grad = torch.zeros_like(p)
        if case == "lr":
            optimizer.param_groups[0]["lr"] = 0.05
        else:
            optimizer.param_groups[0]["lr"] = 0.0
        if case == "grad":
            params[0].grad = None
        if case == "state":
            optimizer.state[params[0]]["explore_buffer"] = torch.zeros_like(params[0])
        before = [p.detach().clone() for p in params]
        with pytest.raises(ValueError, match="SPSA needs a closure"):
            optimizer.step()
        assert all(torch.equal(p, b) for p, b in zip(params, before))
        assert not optimizer.base.state, case
        assert optimizer.estimator.state_dict()["step"] == 0


def test_flattened_load_into_a_fresh_spsa_optimizer_restores_the_estimator(process_group):
    """The estimator's seed and step come back through ``flatten_optimizer_state_dict``
    (torch rebuilds the groups from the live groups' keys: the dry step puts
    ``explore_estimator`` there, the load takes it out again)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(flatten_optimizer_state_dict=True)
    model, optimizer = _fresh_spsa()
    _train("e-spsa", model, optimizer, range(3))
    saved = copy.deepcopy(get_optimizer_state_dict(model, optimizer, options=options))
    assert saved["param_groups.0.weight.explore_estimator"] == {"seed": 11, "step": 3}
    resumed_model, resumed = _fresh_spsa(seed=4)
    set_optimizer_state_dict(resumed_model, resumed, saved, options=options)
    assert resumed.estimator.state_dict() == {"seed": 11, "step": 3}
    assert all("explore_estimator" not in group for group in resumed.param_groups)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        for key in ("explore_buffer", "momentum_buffer"):
            assert torch.equal(optimizer.state[p][key], resumed.state[q][key])
        # loaded where each key belongs: the base's momentum in the base, the buffer in E
        assert resumed.state[q]["momentum_buffer"] is resumed.base.state[q]["momentum_buffer"]
        assert "explore_buffer" not in resumed.base.state[q]


def test_the_dry_steps_estimator_copy_leaves_the_groups_at_the_first_step(process_group):
    """A fresh E(SPSA) that was only saved (dry step), then trained: the copy the dry step
    put in the first group goes away at the first real step (it would be stale)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model, optimizer = _fresh_spsa()
    get_optimizer_state_dict(model, optimizer)
    assert "explore_estimator" in optimizer.param_groups[0]
    _train("e-spsa", model, optimizer, range(1))
    assert "explore_estimator" not in optimizer.param_groups[0]
    assert optimizer.state_dict()["param_groups"][0]["explore_estimator"]["step"] == 1


def test_flattened_load_into_a_trained_spsa_optimizer_warns_that_the_estimator_stays(
    process_group,
):
    """Into an optimizer that already has state torch makes no dry step, so the live groups
    have no ``explore_estimator`` key and the flattened load cannot bring SPSA's seed and
    step back: a warning says so (and what to do); everything else loads."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(flatten_optimizer_state_dict=True)
    model, optimizer = _fresh_spsa()
    _train("e-spsa", model, optimizer, range(3))
    saved = copy.deepcopy(get_optimizer_state_dict(model, optimizer, options=options))
    resumed_model, resumed = _fresh_spsa(seed=4)
    _train("e-spsa", resumed_model, resumed, range(1))
    with pytest.warns(UserWarning, match="no state for the estimator SPSA"):
        set_optimizer_state_dict(resumed_model, resumed, saved, options=options)
    assert resumed.estimator.state_dict() == {"seed": 11, "step": 1}
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(optimizer.state[p]["explore_buffer"], resumed.state[q]["explore_buffer"])
