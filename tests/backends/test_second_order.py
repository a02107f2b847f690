"""Shampoo (backends.second_order): float64 reference, roots, blocking, resume, convergence."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from adaptor import E
from backends import Shampoo
from backends.second_order import matrix_inverse_root
from tests.amp import amp_run
from tests.probes import host_read_probe

# -- an independent float64 reference, written from the formulas --------------------------


def _ref_inverse_root(a: np.ndarray, eps: float) -> np.ndarray:
    """(A + ρI)^{-1/4} with ρ = eps·‖A‖_F (+ the documented floor), by eigendecomposition."""
    rho = eps * np.linalg.norm(a) + math.sqrt(np.finfo(np.float64).tiny)
    w, q = np.linalg.eigh(a)
    return (q * (np.maximum(w, 0.0) + rho) ** -0.25) @ q.T


def _ref_splits(size: int, block: int) -> list[slice]:
    """ceil(size/block) parts of ceil(size/parts) rows each, the last one shorter."""
    parts = -(-size // block)
    width = -(-size // parts)
    return [slice(i, min(i + width, size)) for i in range(0, size, width)]


class ReferenceShampoo:
    """Shampoo with grafting, one parameter at a time, one block at a time, in numpy.

    ``b2 = 1``: summed statistics, no bias correction of the factors. ``gb2``: Adam
    grafting's β₂. ``after``: momentum on the update direction instead of the gradient.
    """

    def __init__(self, shapes, *, lr, betas, eps, matrix_eps, weight_decay, every, start,
                 block, grafting="adam", maximize=False, grafting_beta2=None, after=False):
        self.hp = dict(lr=lr, b1=betas[0], b2=betas[1], eps=eps, meps=matrix_eps,
                       wd=weight_decay, every=every, start=start, block=block,
                       grafting=grafting, maximize=maximize, after=after,
                       gb2=betas[1] if grafting_beta2 is None else grafting_beta2)
        self.t = 0
        self.m = [np.zeros(s) for s in shapes]
        self.v = [np.zeros(s) for s in shapes]
        self.stats = []
        for s in shapes:
            if len(s) < 2:
                self.stats.append(None)
                continue
            rows, cols = s[0], int(np.prod(s[1:]))
            blocks = {}
            for r in _ref_splits(rows, block):
                for c in _ref_splits(cols, block):
                    nr, nc = r.stop - r.start, c.stop - c.start
                    blocks[(r.start, c.start)] = dict(
                        r=r, c=c, L=np.zeros((nr, nr)), R=np.zeros((nc, nc)),
                        Lroot=None, Rroot=None)
            self.stats.append(blocks)

    def step(self, params, grads):
        h = self.hp
        self.t += 1
        t = self.t
        out = []
        for i, (p, g) in enumerate(zip(params, grads)):
            g = -g if h["maximize"] else g
            p = p * (1 - h["lr"] * h["wd"])
            c1 = 1 - h["b1"] ** t
            if h["grafting"] == "adagrad":
                self.v[i] = self.v[i] + g * g
                denominator = np.sqrt(self.v[i]) + h["eps"]
            else:  # adam, and none where a grafted step is taken
                self.v[i] = h["gb2"] * self.v[i] + (1 - h["gb2"]) * g * g
                denominator = np.sqrt(self.v[i] / (1 - h["gb2"] ** t)) + h["eps"]
            if h["after"]:
                filtered = g
            else:
                self.m[i] = h["b1"] * self.m[i] + (1 - h["b1"]) * g
                filtered = self.m[i] / c1
            graft = filtered if h["grafting"] == "sgd" else filtered / denominator
            direction = graft
            # the factors' bias correction: none for summed statistics (β₂ = 1)
            c2 = 1.0 if h["b2"] == 1.0 else 1 - h["b2"] ** t
            if self.stats[i] is not None:
                shape = p.shape
                g2 = g.reshape(shape[0], -1)
                m2 = filtered.reshape(shape[0], -1)
                a2 = graft.reshape(shape[0], -1)
                d2 = np.zeros_like(g2)
                for b in self.stats[i].values():
                    gb = g2[b["r"], b["c"]]
                    if h["b2"] == 1.0:
                        b["L"] = b["L"] + gb @ gb.T
                        b["R"] = b["R"] + gb.T @ gb
                    else:
                        b["L"] = h["b2"] * b["L"] + (1 - h["b2"]) * gb @ gb.T
                        b["R"] = h["b2"] * b["R"] + (1 - h["b2"]) * gb.T @ gb
                    if t >= h["start"] and (t - h["start"]) % h["every"] == 0:
                        b["Lroot"] = _ref_inverse_root(b["L"] / c2, h["meps"])
                        b["Rroot"] = _ref_inverse_root(b["R"] / c2, h["meps"])
                    if t >= h["start"]:
                        pb = b["Lroot"] @ m2[b["r"], b["c"]] @ b["Rroot"]
                        if h["grafting"] != "none":
                            pb = pb * np.linalg.norm(a2[b["r"], b["c"]]) / np.linalg.norm(pb)
                    else:
                        pb = a2[b["r"], b["c"]]
                    d2[b["r"], b["c"]] = pb
                direction = d2.reshape(shape)
            if h["after"]:
                self.m[i] = h["b1"] * self.m[i] + (1 - h["b1"]) * direction
                direction = self.m[i] / c1
            out.append(np.asarray(p - h["lr"] * direction))
        return out


def _grad(p: torch.Tensor, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 + step)
    target = torch.randn(p.shape, generator=generator, dtype=p.dtype)
    return (p - target) + 0.1 * torch.sin(3 * p)


SHAPES = [(7, 5), (5,), (3, 2, 2, 2), (7, 5), (4, 3), ()]


@pytest.mark.parametrize(
    "options",
    [
        dict(block=4, grafting="adam"),
        dict(block=3, grafting="none", maximize=True),
        dict(block=16, grafting="adam", every=1, start=1),
        dict(block=4, grafting="adam", betas=(0.8, 1.0), grafting_beta2=0.95),
        dict(block=3, grafting="adagrad", betas=(0.5, 1.0)),
        dict(block=4, grafting="none", betas=(0.7, 1.0)),
        dict(block=4, grafting="sgd", betas=(0.7, 0.9), after=True),
        dict(block=16, grafting="adam", betas=(0.6, 1.0), grafting_beta2=0.9, after=True),
    ],
    ids=["blocked-adam", "blocked-none-maximize", "whole-every-step", "summed-adam",
         "summed-adagrad", "summed-none", "sgd-momentum-after", "summed-adam-momentum-after"],
)
def test_matches_float64_reference(options):
    options = {"every": 2, "start": 3, "betas": (0.8, 0.95), **options}
    hp = dict(lr=3e-2, eps=1e-8, matrix_eps=1e-4, weight_decay=0.1)
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=generator, dtype=torch.float64).requires_grad_()
              for s in SHAPES]
    grafting_beta2 = options.get("grafting_beta2", options["betas"][1])
    optimizer = Shampoo(
        params, **hp, betas=options["betas"], precondition_frequency=options["every"],
        start_preconditioning_step=options["start"], max_preconditioner_dim=options["block"],
        grafting=options["grafting"], maximize=options.get("maximize", False),
        grafting_beta2=grafting_beta2 if grafting_beta2 < 1 else 0.999,
        momentum_position="after" if options.get("after") else "before",
    )
    reference = ReferenceShampoo(
        SHAPES, **hp, **{**options, "grafting_beta2": grafting_beta2 if grafting_beta2 < 1
                         else 0.999}
    )
    ref_params = [p.detach().numpy().copy() for p in params]
    for step in range(8):
        for p in params:
            p.grad = _grad(p.detach(), step)
        ref_grads = [_grad(torch.from_numpy(q), step).numpy() for q in ref_params]
        optimizer.step()
        ref_params = reference.step(ref_params, ref_grads)
        for i, (p, q) in enumerate(zip(params, ref_params)):
            np.testing.assert_allclose(
                p.detach().numpy(), q, rtol=1e-10, atol=1e-12, err_msg=f"param {i} step {step}"
            )
    assert not np.allclose(ref_params[0], params[0].detach().numpy() * 0)


def test_before_start_and_for_vectors_it_is_adamw():
    generator = torch.Generator().manual_seed(1)
    shapes = [(6, 5), (6,)]
    ours = [torch.randn(s, generator=generator, dtype=torch.float64).requires_grad_()
            for s in shapes]
    twins = [p.detach().clone().requires_grad_() for p in ours]
    shampoo = Shampoo(ours, lr=1e-2, weight_decay=0.1, start_preconditioning_step=6,
                      betas=(0.9, 1.0), grafting_beta2=0.999)
    adamw = torch.optim.AdamW(twins, lr=1e-2, weight_decay=0.1, foreach=False)
    for step in range(8):
        for p, q in zip(ours, twins):
            p.grad = _grad(p.detach(), step)
            q.grad = _grad(q.detach(), step)
        shampoo.step()
        adamw.step()
        matrix_close = torch.allclose(ours[0], twins[0], rtol=1e-12, atol=1e-14)
        assert matrix_close == (step < 5), step  # steps 1..5 are Adam's, step 6 is Shampoo's
        torch.testing.assert_close(ours[1], twins[1], rtol=1e-12, atol=1e-14)


# -- the inverse root ---------------------------------------------------------------------


def _spd(n: int, cond: float, seed: int, rank: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    w = np.logspace(0, -math.log10(cond), n)
    if rank is not None:
        w[rank:] = 0.0
    return (q * w) @ q.T * rng.uniform(0.1, 10.0)


@pytest.mark.parametrize("method", ["eigh", "newton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_inverse_root_matches_scipy(method, dtype):
    eps = 1e-6
    matrices = [_spd(12, 1e3, 0), _spd(12, 1e8, 1), _spd(12, 1.0, 2), _spd(12, 1e2, 3, rank=4)]
    batch = torch.tensor(np.stack(matrices), dtype=dtype)
    roots = matrix_inverse_root(batch, 4, eps=eps, method=method).double().numpy()
    # float32: the ridge allows a condition number of 1e6, whose fourth root amplifies
    # eigenvalue rounding; 1e-2 relative still fails for any wrong exponent or ridge.
    tolerance = 1e-9 if dtype == torch.float64 else 1e-2
    for a, root in zip(matrices, roots):
        rho = eps * np.linalg.norm(a)
        expected = np.real(scipy.linalg.fractional_matrix_power(a + rho * np.eye(12), -0.25))
        error = np.linalg.norm(root - expected) / np.linalg.norm(expected)
        assert error < tolerance, (method, dtype, error)


def test_inverse_root_other_powers_and_zero_matrix():
    a = _spd(6, 1e2, 5)
    root = matrix_inverse_root(torch.tensor(a), 2, eps=1e-6).numpy()
    expected = scipy.linalg.sqrtm(np.linalg.inv(a + 1e-6 * np.linalg.norm(a) * np.eye(6)))
    np.testing.assert_allclose(root, np.real(expected), rtol=1e-8)
    for method in ("eigh", "newton"):
        zero = matrix_inverse_root(torch.zeros(2, 3, 3), 4, method=method)
        assert torch.isfinite(zero).all()
    with pytest.raises(ValueError, match="method must be one of"):
        matrix_inverse_root(torch.eye(3), 4, method="svd")
    with pytest.raises(ValueError, match="square matrices"):
        matrix_inverse_root(torch.ones(3, 2), 4)


# -- scheduling, state, errors ------------------------------------------------------------


def _params(shapes, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=generator, dtype=dtype).requires_grad_() for s in shapes]


def _set_grads(params, step):
    for p in params:
        p.grad = _grad(p.detach(), step)


def test_roots_are_recomputed_on_schedule_only():
    params = _params([(5, 4)])
    optimizer = Shampoo(params, precondition_frequency=3, start_preconditioning_step=2)
    roots = []
    for step in range(8):
        _set_grads(params, step)
        optimizer.step()
        roots.append(optimizer.state[params[0]]["left_root"].clone())
    changed = [not torch.equal(a, b) for a, b in itertools.pairwise(roots)]
    # host steps 2..8: refresh at t = 2, 5, 8 → changes between consecutive snapshots at those t
    assert changed == [True, False, False, True, False, False, True]
    assert optimizer.state_dict()["state"][0]["host_step"] == 8


def test_blocking_layout_and_memory():
    params = _params([(10, 3), (2, 3, 4, 4)])
    optimizer = Shampoo(params, max_preconditioner_dim=4)
    _set_grads(params, 0)
    optimizer.step()
    first, conv = (optimizer.state[p] for p in params)
    # 10 rows → 3 parts of 4 (padded by 2), 3 columns → 1 part
    assert first["left"].shape == (3, 4, 4) and first["right"].shape == (3, 3, 3)
    # conv (2, 3·4·4 = 48): 1 × 12 parts of 4
    assert conv["left"].shape == (12, 2, 2) and conv["right"].shape == (12, 4, 4)
    assert all(s["step"].device == p.device for s, p in zip((first, conv), params))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_resume_keeps_state_dtypes_and_is_bit_exact(dtype):
    params = _params([(6, 5), (6,)], dtype=dtype)
    optimizer = Shampoo(params, lr=1e-2, precondition_frequency=2, start_preconditioning_step=2)
    for step in range(3):
        _set_grads(params, step)
        optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    twins = [p.detach().clone().requires_grad_() for p in params]
    resumed = Shampoo(twins, lr=1e-2, precondition_frequency=2, start_preconditioning_step=2)
    resumed.load_state_dict(saved)
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert resumed.state[twins[0]]["left"].dtype == expected_dtype
    # Adam's moments: float32 for bf16 parameters (state_dtype=None), the dtype otherwise
    assert resumed.state[twins[0]]["exp_avg"].dtype == expected_dtype
    for step in range(3, 7):
        _set_grads(params, step)
        _set_grads(twins, step)
        optimizer.step()
        resumed.step()
    for p, q in zip(params, twins):
        assert torch.equal(p, q)


def test_mismatched_state_dict_and_changed_block_size_are_rejected():
    params = _params([(6, 5)])
    optimizer = Shampoo(params, max_preconditioner_dim=4)
    _set_grads(params, 0)
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    # loading restores the saved hyperparameters (torch's rule), so the block size comes along
    other = Shampoo(_params([(6, 5)]), max_preconditioner_dim=8)
    other.load_state_dict(copy.deepcopy(saved))
    assert other.param_groups[0]["max_preconditioner_dim"] == 4
    broken = copy.deepcopy(saved)
    broken["state"][0]["left"] = torch.zeros(1, 6, 6)
    other = Shampoo(_params([(6, 5)]), max_preconditioner_dim=4)
    with pytest.raises(ValueError, match=r"'left'.*expected \(4, 3, 3\)"):
        other.load_state_dict(broken)
    assert not other.state
    wrong = Shampoo(_params([(5, 6)]), max_preconditioner_dim=4)
    with pytest.raises(ValueError, match="exp_avg"):
        wrong.load_state_dict(saved)
    before = params[0].detach().clone()
    optimizer.param_groups[0]["max_preconditioner_dim"] = 2
    with pytest.raises(ValueError, match="changed mid-run"):
        optimizer.step()
    assert torch.equal(params[0].detach(), before)


def test_bad_gradients_and_parameters_raise_before_any_update():
    params = _params([(4, 3), (3,)])
    optimizer = Shampoo(params)
    params[0].grad = torch.ones(4, 3)
    params[1].grad = torch.ones(3).to_sparse()
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="sparse gradients"):
        optimizer.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert not optimizer.state
    with pytest.raises(TypeError, match="complex parameters"):
        Shampoo([torch.zeros(2, 2, dtype=torch.complex64, requires_grad=True)])


@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_no_host_reads_with_many_same_shaped_blocks(method):
    params = _params([(9, 9), (9, 9), (4, 9), (9,), (3, 3, 3)])
    optimizer = Shampoo(params, precondition_frequency=1, start_preconditioning_step=1,
                        max_preconditioner_dim=3, root_method=method)
    _set_grads(params, 0)
    optimizer.step()
    _set_grads(params, 1)
    with host_read_probe() as reads:
        optimizer.step()
    assert reads == []
    assert all(torch.isfinite(p).all() for p in params)


def test_newton_and_eigh_take_the_same_steps():
    results = []
    for method in ("eigh", "newton"):
        params = _params([(6, 5), (4, 6)], dtype=torch.float64)
        optimizer = Shampoo(params, lr=1e-2, precondition_frequency=2,
                            start_preconditioning_step=2, root_method=method)
        for step in range(6):
            _set_grads(params, step)
            optimizer.step()
        results.append(params)
    for p, q in zip(*results):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)


# -- convergence: an ill-conditioned, rotated least-squares matrix problem ----------------


def _least_squares(seed: int):
    """½‖XW − Y‖²/‖Y‖², X with a rotated input covariance of condition number 1e4."""
    generator = torch.Generator().manual_seed(seed)
    d, k, n = 16, 8, 64
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    scales = torch.logspace(0, -2, d, dtype=torch.float64)
    x = torch.randn(n, d, generator=generator, dtype=torch.float64) @ (q * scales) @ q.T
    y = x @ torch.randn(d, k, generator=generator, dtype=torch.float64)
    return x, y


def _relative_loss_after(make, seed: int, steps: int = 100) -> float:
    x, y = _least_squares(seed)
    w = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = make([w])

    def loss_fn():
        return 0.5 * ((x @ w - y) ** 2).sum() / (y**2).sum()

    start = loss_fn().item()
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn().backward()
        optimizer.step()
    with torch.no_grad():
        return loss_fn().item() / start


LRS = (1e-1, 3e-1, 1.0)


def _shampoo(lr):
    return lambda params: Shampoo(params, lr=lr, precondition_frequency=5,
                                  start_preconditioning_step=5)


def _best(factory, seed):
    return min(_relative_loss_after(factory(lr), seed) for lr in LRS)


@pytest.mark.parametrize("seed", [0, 1])
def test_beats_sgd_and_adam_on_ill_conditioned_least_squares(seed):
    """Each optimizer at its best learning rate of the same grid, 100 steps."""
    adam = _best(lambda lr: lambda p: torch.optim.Adam(p, lr=lr), seed)
    sgd = _best(lambda lr: lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9), seed)
    shampoo = _best(_shampoo, seed)
    explored_exploit = _best(lambda lr: lambda p: E(_shampoo(lr)(p), alpha=0.5, beta=0.01), seed)
    explored_explore = _best(lambda lr: lambda p: E(_shampoo(lr)(p), alpha=-5, beta=0.99), seed)
    assert shampoo < adam / 3, (shampoo, adam)
    assert shampoo < sgd / 20, (shampoo, sgd)
    assert explored_exploit < adam / 3, (explored_exploit, adam)
    assert explored_explore < adam / 3, (explored_explore, adam)


# -- behaving like a torch optimizer: copies, hooks, bad state dicts (issue 11) ------------

MIXED = [(6, 5), (5,), (3, 2, 2, 2), ()]


def _run(optimizer, params, steps):
    for step in steps:
        _set_grads(params, step)
        optimizer.step()


def _small_shampoo(params, **kw):
    return Shampoo(params, **{"lr": 1e-2, "weight_decay": 0.01, "precondition_frequency": 2,
                              "start_preconditioning_step": 2, "max_preconditioner_dim": 4,
                              **kw})


def _assert_same_state_dict(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for key, entry in a["state"].items():
        assert entry.keys() == b["state"][key].keys(), key
        for name, value in entry.items():
            other = b["state"][key][name]
            if isinstance(value, torch.Tensor):
                assert value.dtype == other.dtype and torch.equal(value, other), (key, name)
            else:
                assert value == other, (key, name)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_after_a_scheduler_with_hooks_steps_its_own_parameters(how):
    import pickle

    params = _params(MIXED)
    optimizer = _small_shampoo(params)
    calls = []
    optimizer.register_step_pre_hook(lambda *_: calls.append("pre"))
    optimizer.register_step_post_hook(lambda *_: calls.append("post"))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    for step in range(3):
        _run(optimizer, params, [step])
        scheduler.step()
    assert calls == ["pre", "post"] * 3
    clone = copy.deepcopy(optimizer) if how == "deepcopy" else pickle.loads(pickle.dumps(optimizer))
    clone_params = [p for g in clone.param_groups for p in g["params"]]
    assert all(c is not p for c, p in zip(clone_params, params))
    before = [p.detach().clone() for p in params]
    _run(clone, clone_params, range(3, 6))
    assert all(torch.equal(p, b) for p, b in zip(params, before)), "the copy moved the original"
    _run(optimizer, params, range(3, 6))
    assert all(torch.equal(c, p) for c, p in zip(clone_params, params))


def test_state_dict_hooks_and_non_dict_state_written_by_a_load_hook_behave_as_in_torch():
    params = _params(MIXED)
    optimizer = _small_shampoo(params)
    optimizer.register_state_dict_pre_hook(lambda opt: opt.state.__setitem__("test", 1))
    optimizer.register_load_state_dict_pre_hook(
        lambda opt, sd: sd["param_groups"][0].__setitem__("lr", 0.002)
    )
    optimizer.register_load_state_dict_post_hook(
        lambda opt: opt.state.__setitem__("ran_load_state_dict_post_hook", True)
    )
    _run(optimizer, params, range(3))
    saved = optimizer.state_dict()
    assert saved["state"]["test"] == 1  # torch keeps what a pre-hook put in the state
    optimizer.load_state_dict(saved)  # raised "state for unknown parameter 'test'"
    assert optimizer.state["ran_load_state_dict_post_hook"] is True
    assert optimizer.param_groups[0]["lr"] == 0.002
    _run(optimizer, params, range(3, 5))
    optimizer.load_state_dict(optimizer.state_dict())


def _case(name, corrupt, match):
    return pytest.param(corrupt, match, id=name)


def _left(sd):
    sd["state"][0]["left"] = torch.zeros(1, 6, 6)


def _unknown(sd):
    sd["state"][2]["L"] = sd["state"][2].pop("left")


def _missing(sd):
    del sd["state"][1]["host_step"]


def _host_step(sd):
    sd["state"][0]["host_step"] = 2.0


def _moment(sd):
    sd["state"][1]["exp_avg"] = torch.zeros(6)


def _too_many(sd):
    sd["state"][4] = dict(sd["state"][1])


def _count(sd):
    sd["param_groups"][0]["params"].append(4)


def _group_value(sd):
    sd["param_groups"][0]["betas"] = (0.9, 1.5)


BAD = [
    _case("left", _left, r"parameter 0 \(shape \(6, 5\)\): state 'left' has shape \(1, 6, 6\), "
          r"expected \(4, 3, 3\)"),
    _case("unknown", _unknown, r"parameter 2 \(shape \(3, 2, 2, 2\)\) has unknown state keys "
          r"\['L'\]"),
    _case("missing", _missing, r"parameter 1 \(shape \(5,\)\) lacks state keys \['host_step'\]"),
    _case("host-step", _host_step, r"parameter 0 .*'host_step' must be an int >= 0, got 2.0"),
    _case("moment", _moment, r"parameter 1 .*'exp_avg' has shape \(6,\), expected \(5,\)"),
    _case("too-many", _too_many, r"state for parameter index 4, but its param groups list 4"),
    _case("count", _count, r"param group 0 has 5 parameters, the optimizer's has 4"),
    _case("group-value", _group_value, r"^Shampoo \(state_dict param group 0\): invalid "
          r"betas\[1\]=1.5, must satisfy 0 <= betas\[1\] <= 1$"),
]


@pytest.mark.parametrize(("corrupt", "match"), BAD)
def test_a_bad_state_dict_raises_a_clear_error_and_changes_nothing(corrupt, match):
    params = _params(MIXED)
    source = _small_shampoo(params)
    _run(source, params, range(3))
    broken = copy.deepcopy(source.state_dict())
    corrupt(broken)
    target_params = _params(MIXED, seed=4)
    target = _small_shampoo(target_params, lr=0.05)
    _run(target, target_params, range(2))
    before = copy.deepcopy(target.state_dict())
    values = [p.detach().clone() for p in target_params]
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(broken)
    _assert_same_state_dict(target.state_dict(), before)
    assert all(torch.equal(p, v) for p, v in zip(target_params, values))
    target.load_state_dict(copy.deepcopy(source.state_dict()))
    assert target.param_groups[0]["lr"] == 1e-2


# -- precision, non-finite steps, GradScaler (issue 10) -----------------------------------

BF16_RESOLUTION = 2.0**-8


def test_weight_decay_on_bf16_parameters_with_kahan_is_exact_to_one_percent():
    """100 steps, zero gradient, lr 0.02, weight decay 0.1: θ/θ₀ = (1 − 0.002)^100 = 0.8186.

    Before: 0.585 (0.998 rounded to bf16 0.996 first). Rounded once without compensation,
    each 0.2 % decrement is below half an ulp: θ/θ₀ stays in [0.98, 1.0].
    """
    exact = (1.0 - 0.02 * 0.1) ** 100
    start = torch.rand(8, 8, generator=torch.Generator().manual_seed(0)) * 1.5 + 0.5
    start = start.to(torch.bfloat16)
    ratios = {}
    for kahan in (False, True):
        p = start.clone().requires_grad_()
        optimizer = Shampoo([p], lr=0.02, weight_decay=0.1, kahan=kahan,
                            precondition_frequency=5, start_preconditioning_step=5)
        for _ in range(100):
            p.grad = torch.zeros_like(p)
            optimizer.step()
        ratios[kahan] = p.detach().double() / start.double()
    torch.testing.assert_close(ratios[True], torch.full_like(ratios[True], exact), rtol=0.01,
                               atol=0)
    assert ratios[False].min() >= 0.98


def _tracking_run(dtype, steps=500, **options):
    shapes = [(6, 5), (5,), (4, 6)]
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=generator).to(dtype).requires_grad_() for s in shapes]
    targets = [torch.randn(s, generator=generator) for s in shapes]
    optimizer = Shampoo(params, lr=0.01, weight_decay=0.01, precondition_frequency=5,
                        start_preconditioning_step=5, **options)
    noise = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p, t in zip(params, targets):
            g = p.detach().float() - t + 0.5 * torch.randn(p.shape, generator=noise)
            p.grad = g.to(dtype)
        optimizer.step()
    return [p.detach().double() for p in params]


def test_bf16_parameters_with_float32_state_track_a_float32_twin():
    """Relative error ‖θ_bf16 − θ_fp32‖/‖θ_fp32‖ per tensor after 500 steps.

    Measured: kahan=True ≤ 0.0017 (≈ 0.45 × 2^-8); bound 2 × 2^-8. Without Kahan (float32
    state, one rounding per write): 0.025–0.10, the lr·‖D‖ ~ 0.01 steps near the optimum
    being partly below half an ulp of |θ| ~ 1.
    """
    twin = _tracking_run(torch.float32)
    errors = {}
    for kahan in (False, True):
        run_bf16 = _tracking_run(torch.bfloat16, kahan=kahan)
        errors[kahan] = [((a - b).norm() / b.norm()).item() for a, b in zip(run_bf16, twin)]
    assert max(errors[True]) < 2 * BF16_RESOLUTION, errors
    assert max(errors[False]) > 3 * max(errors[True]), errors


def _state_tensors(optimizer, params):
    return {
        (i, key): value.clone()
        for i, p in enumerate(params)
        for key, value in optimizer.state.get(p, {}).items()
        if isinstance(value, torch.Tensor) and key != "nonfinite_skips"
    }


def _grads_with(params, step, inject, value):
    _set_grads(params, step)
    if step == inject:
        params[0].grad[1, 2] = value


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_nonfinite_gradient_skips_the_step_bit_identically(value, dtype):
    """Step 4 (k = 3) is a root recomputation (start 2, every 2): the roots, L, R, the moments,
    the step counter and the parameters all equal step 3's."""
    k = 3
    params = _params(MIXED, dtype=dtype)
    optimizer = _small_shampoo(params, skip_nonfinite=True, kahan=dtype == torch.bfloat16)
    for step in range(k):
        _grads_with(params, step, k, value)
        optimizer.step()
    before = [p.detach().clone() for p in params]
    state_before = _state_tensors(optimizer, params)
    _grads_with(params, k, k, value)
    optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    after = _state_tensors(optimizer, params)
    assert after.keys() == state_before.keys() and ("left_root" in {n for _, n in after})
    for key, tensor in state_before.items():
        assert torch.equal(after[key], tensor), key
    assert optimizer.skipped_steps.item() == 1
    # host_step, the host-side schedule clock, counts the call (documented)
    assert optimizer.state[params[0]]["host_step"] == k + 1
    for step in range(k + 1, k + 4):
        _set_grads(params, step)
        optimizer.step()
    assert all(torch.isfinite(p).all() for p in params)
    assert optimizer.skipped_steps.item() == 1


def test_after_a_skip_it_continues_as_a_run_without_that_step():
    """With roots every step the schedule clock does not matter: bit-equal to omitting step k."""
    k = 2
    options = dict(skip_nonfinite=True, precondition_frequency=1, start_preconditioning_step=1)
    params, twin = _params(MIXED), _params(MIXED)
    ours, reference = _small_shampoo(params, **options), _small_shampoo(twin, **options)
    for step in range(6):
        _grads_with(params, step, k, float("nan"))
        ours.step()
        if step != k:
            _set_grads(twin, step)
            reference.step()
    assert all(torch.equal(p, q) for p, q in zip(params, twin))


def _amp_run(make, dtype, inject_at, steps=5, generic=False):
    params, optimizer, reads, scale = amp_run(make, dtype, inject_at, steps=steps, generic=generic)
    return params, optimizer, scale, reads


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grad_scaler_skips_on_the_device_like_its_generic_path(dtype):
    """Roots every step (the schedule clock then cannot differ): equal to torch's generic
    path, which never calls step() for the skipped iteration; no host read in scaler.step."""

    def make(params):
        return Shampoo(params, lr=1e-2, precondition_frequency=1, start_preconditioning_step=1,
                       max_preconditioner_dim=8)

    ours, optimizer, scale, reads = _amp_run(make, dtype, inject_at=2)
    generic, _, generic_scale, _ = _amp_run(make, dtype, inject_at=2, generic=True)
    assert reads == []
    assert scale == generic_scale == 2.0**9
    assert all(torch.equal(a, b) for a, b in zip(ours, generic))
    assert optimizer.skipped_steps.item() == 1


def test_skip_and_kahan_step_on_the_meta_device_without_host_reads():
    params = [torch.empty(s, device="meta", dtype=torch.bfloat16).requires_grad_()
              for s in [(6, 5), (5,), (3, 2, 2)]]
    optimizer = _small_shampoo(params, kahan=True, skip_nonfinite=True)
    for _ in range(3):
        for p in params:
            p.grad = torch.empty_like(p)
        optimizer.step()
    assert optimizer.skipped_steps.device.type == "meta"
    assert optimizer.state[params[0]]["exp_avg"].dtype == torch.float32
    cpu = _params(MIXED, dtype=torch.bfloat16)
    optimizer = _small_shampoo(cpu, kahan=True, skip_nonfinite=True)
    for step in range(3):
        _grads_with(cpu, step, 2, float("nan"))
        if step == 2:
            with host_read_probe() as reads:
                optimizer.step()
        else:
            optimizer.step()
    assert reads == []


# -- torch.compile --------------------------------------------------------------------------


_COMPILED = {}


def _step_compiled():
    _COMPILED["optimizer"].step()


def _compiled_vs_eager(steps, shapes=MIXED, nan_at=None, **options):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager_params, compiled_params = _params(shapes), _params(shapes)
    eager = Shampoo(eager_params, **options)
    # a module global, as in a training script (dynamo guards a closure's optimizer state
    # differently and then hides the recompilations this test counts)
    _COMPILED["optimizer"] = Shampoo(compiled_params, **options)
    compiled_step = torch.compile(_step_compiled)
    for step in range(steps):
        _grads_with(eager_params, step, nan_at, float("nan"))
        _grads_with(compiled_params, step, nan_at, float("nan"))
        eager.step()
        compiled_step()
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    if nan_at is not None:  # each parameter's own counter holds exactly one skip
        for p in compiled_params:
            assert _COMPILED["optimizer"].state[p]["nonfinite_skips"].item() == 1.0
    _COMPILED.clear()
    return eager_params, compiled_params, graphs


def test_compiled_step_with_default_arguments_does_not_recompile_every_step():
    """``host_step`` is advanced outside the graph (one graph break). Traced, the changing
    Python integer recompiled every step: 6 graphs in 6 steps (then eager after 8); now 2
    (the first step, which creates the state, and the steady step)."""
    eager, compiled, graphs = _compiled_vs_eager(6, [(6, 5), (5,), (4, 6)])
    assert graphs <= 3, graphs
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=0, atol=1e-6)


def test_compiled_step_matches_eager_across_root_recomputations():
    """Start 2, every 2: 7 steps cross 3 recomputations, and a NaN step is skipped (each
    parameter's skip counter must hold 1). float32: absolute 2e-5, 0.3 % of the
    7·lr = 7e-3 the parameters move (fused kernels reorder sums, and the fourth roots of
    nearly singular 2×2 blocks amplify that: measured 5.4e-6)."""
    eager, compiled, graphs = _compiled_vs_eager(
        7, nan_at=4, precondition_frequency=2, start_preconditioning_step=2, skip_nonfinite=True
    )
    for a, b, start in zip(eager, compiled, _params(MIXED)):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=0, atol=2e-5)
        assert (a.detach() - start).abs().max() > 100 * 2e-5
    # first step (+ the resumed frames of its counter-creation break), before start,
    # recompute step, steady step
    assert graphs <= 8, graphs


def test_bf16_checkpoint_keeps_state_dtypes_and_loads_older_state_dicts():
    """Mutation caught: loading with torch's cast-to-parameter-dtype policy."""
    options = dict(kahan=True, skip_nonfinite=True)
    params = _params(MIXED, dtype=torch.bfloat16)
    optimizer = _small_shampoo(params, **options)
    _run(optimizer, params, range(3))
    saved = copy.deepcopy(optimizer.state_dict())
    twins = [p.detach().clone().requires_grad_() for p in params]
    resumed = _small_shampoo(twins, **options)
    resumed.load_state_dict(copy.deepcopy(saved))
    state = resumed.state[twins[0]]
    assert state["exp_avg"].dtype == state["left"].dtype == torch.float32
    assert state["kahan_comp"].dtype == torch.bfloat16
    _run(optimizer, params, range(3, 6))
    _run(resumed, twins, range(3, 6))
    assert all(torch.equal(p, q) for p, q in zip(params, twins))
    older = copy.deepcopy(saved)
    for entry in older["state"].values():
        entry.pop("kahan_comp", None)
        entry.pop("nonfinite_skips", None)
    for group in older["param_groups"]:
        for key in ("state_dtype", "kahan", "skip_nonfinite"):
            group.pop(key)
    fresh_params = _params(MIXED, dtype=torch.bfloat16)
    fresh = _small_shampoo(fresh_params, **options)
    fresh.load_state_dict(older)
    assert fresh.param_groups[0]["skip_nonfinite"] is True
    _run(fresh, fresh_params, range(3, 4))
    assert "kahan_comp" in fresh.state[fresh_params[0]] and fresh.skipped_steps.item() == 0
