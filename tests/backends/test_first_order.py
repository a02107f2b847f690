"""Lamb, AdaBelief and ALTO against float64 references written here from the formulas.

The references are plain per-tensor Python with the paper's two-buffer replacement
(``a`` and ``g_{k-1}``), bias corrections as ``1-β^k`` and the trust ratio
``φ(‖θ‖)/(‖r‖ + ε₂φ(‖θ‖))``; nothing is shared with ``backends.first_order``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import backends
from adaptor import Autograd, explore
from backends.first_order import ALTO, AdaBelief, Lamb, param_groups_for
from tests.probes import host_read_probe

SHAPES = [(7, 5), (5,), (3, 2, 4), (), (4,)]
STEPS = 7
F64 = dict(rtol=1e-9, atol=1e-12)


def initial(dtype=torch.float64, shapes=SHAPES, zero_last=True):
    generator = torch.Generator().manual_seed(0)
    theta = [torch.randn(s, generator=generator, dtype=dtype) for s in shapes]
    if zero_last:
        theta[-1].zero_()  # a zero tensor: trust ratio 1 (default) or φ(0)/‖r‖ ("paper")
    return theta


def grad_fn(theta, step):
    """∇ of Σ (θ - t_k)² + 0.1·cos θ, with targets t_k that change with the step."""
    generator = torch.Generator().manual_seed(100 + step)
    grads = []
    for t in theta:
        target = torch.randn(t.shape, generator=generator, dtype=t.dtype)
        grads.append(2.0 * (t - target) - 0.1 * torch.sin(t))
    return grads


def run(factory, theta0, steps=STEPS, skip=(), clip=None):
    """Our optimizer on fixed gradient functions; ``(step, i)`` in ``skip``: grad is None."""
    params = [t.clone().requires_grad_() for t in theta0]
    optimizer = factory(params)
    for step in range(steps):
        grads = grad_fn([p.detach() for p in params], step)
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = None if (step, i) in skip else g.clone()
        optimizer.step()
    return [p.detach() for p in params], optimizer


def clip_coefficient(grads, max_norm):
    total = math.sqrt(sum(float((g * g).sum()) for g in grads))
    return min(1.0, max_norm / (total + 1e-6))


def reference_lamb(
    theta0, *, lr, betas, eps=1e-6, trust_eps=1e-6, norm_eps=1e-10, weight_decay=0.0,
    bias_correction=True, layer_adaptation=True, trust_clip=None, alpha=0.0, beta=0.0,
    max_grad_norm=None, zero_norm_trust="one", steps=STEPS, skip=(),
):
    """Algorithm 2 of the paper (Lamb when α = 0), two-buffer replacement, float64.

    Trust ratio φ(‖θ‖)/(‖r‖ + ε₂φ(‖θ‖)), φ(x) = x + ε₃; with ``zero_norm_trust="one"`` it is
    1 where ‖θ‖ = 0 or ‖r‖ = 0 (LAMB's reference code), with ``"paper"`` the formula always.
    """
    beta2, beta3 = betas
    theta = [t.clone() for t in theta0]
    zeros = lambda: [torch.zeros_like(t) for t in theta]  # noqa: E731
    m, v, a, g_prev = zeros(), zeros(), zeros(), zeros()
    k = [0] * len(theta)
    for step in range(steps):
        grads = grad_fn(theta, step)
        live = [i for i in range(len(theta)) if (step, i) not in skip]
        if max_grad_norm is not None:
            coefficient = clip_coefficient([grads[i] for i in live], max_grad_norm)
            grads = [g * coefficient for g in grads]
        for i in live:
            g = grads[i]
            a[i] = beta * a[i] + (1 - beta) * (g - g_prev[i])
            g_prev[i] = g
            g_tilde = g + alpha * a[i]
            k[i] += 1
            m[i] = beta2 * m[i] + (1 - beta2) * g_tilde
            v[i] = beta3 * v[i] + (1 - beta3) * g_tilde * g_tilde
            m_hat, v_hat = m[i], v[i]
            if bias_correction:
                m_hat = m[i] / (1 - beta2 ** k[i])
                v_hat = v[i] / (1 - beta3 ** k[i])
            r = m_hat / (torch.sqrt(v_hat) + eps) + weight_decay * theta[i]
            ratio = 1.0
            if layer_adaptation:
                w_norm = float(torch.linalg.vector_norm(theta[i]))
                r_norm = float(torch.linalg.vector_norm(r))
                phi = w_norm + norm_eps
                ratio = phi / (r_norm + trust_eps * phi)
                if zero_norm_trust == "one" and (w_norm == 0.0 or r_norm == 0.0):
                    ratio = 1.0
                if trust_clip is not None:
                    ratio = min(max(ratio, trust_clip[0]), trust_clip[1])
            theta[i] = theta[i] - lr * ratio * r
    return theta


def reference_adabelief(
    theta0, *, lr, betas, eps, weight_decay, decoupled, steps=STEPS, skip=()
):
    beta1, beta2 = betas
    theta = [t.clone() for t in theta0]
    m = [torch.zeros_like(t) for t in theta]
    s = [torch.zeros_like(t) for t in theta]
    k = [0] * len(theta)
    for step in range(steps):
        grads = grad_fn(theta, step)
        for i in range(len(theta)):
            if (step, i) in skip:
                continue
            g = grads[i]
            if decoupled:
                theta[i] = theta[i] * (1 - lr * weight_decay)
            else:
                g = g + weight_decay * theta[i]
            k[i] += 1
            m[i] = beta1 * m[i] + (1 - beta1) * g
            s[i] = beta2 * s[i] + (1 - beta2) * (g - m[i]) ** 2 + eps
            m_hat = m[i] / (1 - beta1 ** k[i])
            s_hat = s[i] / (1 - beta2 ** k[i])
            theta[i] = theta[i] - lr * m_hat / (torch.sqrt(s_hat) + eps)
    return theta


def assert_all_close(actual, expected, **tolerance):
    for i, (x, y) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(x, y, msg=lambda msg, i=i: f"parameter {i}: {msg}", **tolerance)


BIG_EPS = dict(eps=1e-2, trust_eps=1e-2, norm_eps=1e-3)  # large enough to be seen
SKIP = {(2, 1), (3, 1), (4, 2)}  # per-parameter step counters


# -- Lamb ------------------------------------------------------------------------------------


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("bias_correction", [True, False], ids=["bc", "vanilla"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05], ids=["wd0", "wd"])
@pytest.mark.parametrize("epsilons", [{}, BIG_EPS], ids=["paper-eps", "big-eps"])
@pytest.mark.parametrize("zero_norm_trust", ["one", "paper"])
def test_lamb_matches_reference(foreach, bias_correction, weight_decay, epsilons, zero_norm_trust):
    hp = dict(lr=0.05, betas=(0.8, 0.95), weight_decay=weight_decay,
              bias_correction=bias_correction, zero_norm_trust=zero_norm_trust,
              **epsilons)  # fmt: skip
    theta0 = initial()
    ours, _ = run(lambda p: Lamb(p, foreach=foreach, **hp), theta0, skip=SKIP)
    assert_all_close(ours, reference_lamb(theta0, skip=SKIP, **hp), **F64)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
def test_lamb_trust_clip_layer_adaptation_and_clipping(foreach):
    theta0 = initial()
    hp = dict(lr=0.05, betas=(0.9, 0.99), weight_decay=0.02, trust_clip=(0.5, 1.2),
              max_grad_norm=0.7)  # fmt: skip
    ours, _ = run(lambda p: Lamb(p, foreach=foreach, **hp), theta0)
    assert_all_close(ours, reference_lamb(theta0, **hp), **F64)

    hp = dict(lr=0.05, betas=(0.9, 0.99), weight_decay=0.02, layer_adaptation=False)
    ours, _ = run(lambda p: Lamb(p, foreach=foreach, **hp), theta0)
    assert_all_close(ours, reference_lamb(theta0, **hp), **F64)


def test_reference_is_sensitive_to_each_epsilon():
    """The references can tell where each ε goes (so the tests above can fail)."""
    theta0 = initial()
    hp = dict(lr=0.05, betas=(0.8, 0.95), weight_decay=0.05, **BIG_EPS)
    ours, _ = run(lambda p: Lamb(p, **hp), theta0)
    for key in ("eps", "trust_eps", "norm_eps"):
        moved = reference_lamb(theta0, **{**hp, key: hp[key] * 2})
        assert any(not torch.allclose(x, y, **F64) for x, y in zip(ours, moved)), key


# -- ALTO ------------------------------------------------------------------------------------


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("bias_correction", [True, False], ids=["bc", "vanilla"])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2], ids=["wd0", "wd"])
@pytest.mark.parametrize(
    ("alpha", "beta"),
    [(-5.0, 0.9), (0.5, 0.3), (-(1 - 1e-9) / (1 - 0.9), 0.9)],
    ids=["explore", "exploit", "near-alpha-bound"],  # 1 + α(1-β) = 1e-9
)
def test_alto_matches_reference(foreach, bias_correction, weight_decay, alpha, beta):
    hp = dict(lr=0.02, weight_decay=weight_decay, bias_correction=bias_correction,
              alpha=alpha, **BIG_EPS)  # fmt: skip
    theta0 = initial()
    ours, _ = run(
        lambda p: ALTO(p, betas=(0.8, 0.95), beta=beta, foreach=foreach, **hp), theta0, skip=SKIP
    )
    expected = reference_lamb(theta0, betas=(0.8, 0.95), beta=beta, skip=SKIP, **hp)
    assert_all_close(ours, expected, **F64)


@given(
    beta=st.floats(0.0, 0.99),
    alpha_fraction=st.floats(-0.95, 0.95),
    beta2=st.floats(0.0, 0.999),
    beta3=st.floats(0.0, 0.999),
    lr=st.floats(1e-4, 0.1),
    weight_decay=st.sampled_from([0.0, 1e-4, 0.1]),
    bias_correction=st.booleans(),
    max_grad_norm=st.sampled_from([None, 1.0]),
)
def test_alto_matches_reference_for_any_admissible_hyperparameters(
    beta, alpha_fraction, beta2, beta3, lr, weight_decay, bias_correction, max_grad_norm
):
    alpha = alpha_fraction / (1 - beta)
    hp = dict(lr=lr, weight_decay=weight_decay, bias_correction=bias_correction, alpha=alpha,
              max_grad_norm=max_grad_norm)  # fmt: skip
    theta0 = initial(zero_last=False)
    ours, _ = run(lambda p: ALTO(p, betas=(beta2, beta3), beta=beta, **hp), theta0, steps=5)
    expected = reference_lamb(theta0, betas=(beta2, beta3), beta=beta, steps=5, **hp)
    assert_all_close(ours, expected, rtol=1e-8, atol=1e-10)


def test_alto_equals_explored_lamb():
    """ALTO is ``explore(Autograd(), Lamb(...))`` with the same settings (float32)."""
    theta0 = initial(torch.float32)
    for bias_correction in (True, False):
        hp = dict(lr=0.02, weight_decay=1e-3, bias_correction=bias_correction)

        def alto(p, hp=hp):
            return ALTO(p, betas=(0.8, 0.95), alpha=-4.0, beta=0.9, **hp)

        def explored_lamb(p, hp=hp):
            return explore(Autograd(), Lamb(p, betas=(0.8, 0.95), **hp), alpha=-4.0, beta=0.9)

        ours, _ = run(alto, theta0)
        explored, _ = run(explored_lamb, theta0)
        assert_all_close(ours, explored, rtol=1e-6, atol=1e-7)


def test_alto_state_is_exactly_three_parameter_sized_buffers():
    theta0 = initial(torch.float32)
    _, optimizer = run(lambda p: ALTO(p), theta0, steps=2)
    for p in optimizer.param_groups[0]["params"]:
        state = optimizer.state[p]
        assert set(state) == {"step", "exp_avg", "exp_avg_sq", "explore_buffer"}
        assert state["step"].dim() == 0 and state["step"].device == p.device
        for key in ("exp_avg", "exp_avg_sq", "explore_buffer"):
            assert state[key].shape == p.shape and state[key].dtype == p.dtype
    assert torch.equal(optimizer.state[optimizer.param_groups[0]["params"][0]]["step"],
                       torch.tensor(2.0))  # fmt: skip


def test_alto_leaves_the_replaced_gradient_in_grad():
    p = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    optimizer = ALTO([p], betas=(0.9, 0.99), alpha=-5.0, beta=0.9)
    p.grad = torch.tensor([1.0, 1.0], dtype=torch.float64)
    optimizer.step()
    # g̃_1 = g_1 + α(1-β)g_1
    torch.testing.assert_close(p.grad, torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_alto_matches_the_reference_package_up_to_its_epsilons():
    """e-optimizer-adaptor's ALTO: ratio ‖θ‖/‖r‖ (no ε₂, ε₃), clipping at 1.0 always."""
    from ALTO import ALTO as ReferenceALTO

    theta0 = initial(zero_last=False)
    hp = dict(lr=0.02, weight_decay=1e-2)
    ours, _ = run(
        lambda p: ALTO(p, betas=(0.9, 0.99), alpha=-5.0, beta=0.99, eps=1e-6, trust_eps=1e-30,
                       norm_eps=1e-30, max_grad_norm=1.0, **hp),
        theta0,
    )  # fmt: skip
    theirs, _ = run(
        lambda p: ReferenceALTO(p, betas=(0.99, 0.9, 0.99), alp=-5.0, eps=1e-6, **hp), theta0
    )
    assert_all_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_alto_checks_alpha_at_every_step_before_changing_anything():
    theta0 = initial(torch.float32)
    params, optimizer = run(lambda p: ALTO(p), theta0, steps=2)
    optimizer.param_groups[0]["explore_alpha"] = -200.0
    before = [p.clone() for p in params]
    state_before = copy.deepcopy(optimizer.state_dict()["state"])
    for p, g in zip(optimizer.param_groups[0]["params"], grad_fn(params, 2)):
        p.grad = g
    with pytest.raises(ValueError, match=r"\|alpha\| < 1/\(1-beta\)"):
        optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    for index, entry in optimizer.state_dict()["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, state_before[index][key])


# -- AdaBelief -------------------------------------------------------------------------------


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05], ids=["wd0", "wd"])
@pytest.mark.parametrize("decoupled", [True, False], ids=["decoupled", "coupled"])
@pytest.mark.parametrize("eps", [1e-16, 1e-3])
def test_adabelief_matches_reference(foreach, weight_decay, decoupled, eps):
    hp = dict(lr=0.03, betas=(0.8, 0.95), eps=eps, weight_decay=weight_decay)
    theta0 = initial()
    ours, _ = run(
        lambda p: AdaBelief(p, decoupled_weight_decay=decoupled, foreach=foreach, **hp),
        theta0, skip=SKIP,
    )  # fmt: skip
    expected = reference_adabelief(theta0, decoupled=decoupled, skip=SKIP, **hp)
    assert_all_close(ours, expected, **F64)


def test_adabelief_coupled_weight_decay_leaves_grad_alone():
    p = torch.ones(3, dtype=torch.float64, requires_grad=True)
    optimizer = AdaBelief([p], weight_decay=0.5, decoupled_weight_decay=False)
    p.grad = torch.full((3,), 2.0, dtype=torch.float64)
    optimizer.step()
    assert torch.equal(p.grad, torch.full((3,), 2.0, dtype=torch.float64))


# -- everything ------------------------------------------------------------------------------

ALL = [
    pytest.param(lambda p, **kw: Lamb(p, lr=0.01, weight_decay=0.01, **kw), id="Lamb"),
    pytest.param(lambda p, **kw: ALTO(p, lr=0.01, **kw), id="ALTO"),
    pytest.param(lambda p, **kw: AdaBelief(p, lr=0.01, weight_decay=0.01, **kw), id="AdaBelief"),
]


@pytest.mark.parametrize("make", ALL)
def test_complex_parameters_are_updated_as_their_real_views(make):
    generator = torch.Generator().manual_seed(3)
    z0 = torch.randn(4, 3, dtype=torch.complex128, generator=generator)
    z = z0.clone().requires_grad_()
    x = torch.view_as_real(z0).clone().requires_grad_()
    opt_z, opt_x = make([z]), make([x])
    for step in range(4):
        (g,) = grad_fn([torch.view_as_real(z.detach())], step)
        z.grad = torch.view_as_complex(g.clone())
        x.grad = g.clone()
        opt_z.step()
        opt_x.step()
    torch.testing.assert_close(torch.view_as_real(z.detach()), x.detach(), **F64)


@pytest.mark.parametrize("make", ALL)
def test_sparse_gradients_raise_before_anything_changes(make):
    dense = torch.randn(5, 2, requires_grad=True)
    embedding = torch.randn(5, 2, requires_grad=True)
    optimizer = make([dense, embedding])
    dense.grad = torch.ones(5, 2)
    embedding.grad = torch.sparse_coo_tensor([[0, 3]], torch.ones(2, 2), (5, 2))
    before = dense.detach().clone()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        optimizer.step()
    assert torch.equal(dense.detach(), before)
    assert not optimizer.state


@pytest.mark.parametrize("make", ALL)
def test_closure_runs_with_grad_enabled(make):
    p = torch.randn(3, requires_grad=True)
    optimizer = make([p])

    def closure():
        optimizer.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = optimizer.step(closure)
    assert loss.requires_grad and p.grad is not None


OPTIONS = [
    pytest.param(lambda p: Lamb(p, max_grad_norm=1.0, trust_clip=(0.1, 10.0)), id="Lamb-clips"),
    pytest.param(lambda p: Lamb(p, bias_correction=False, foreach=False), id="Lamb-single"),
    pytest.param(lambda p: Lamb(p, layer_adaptation=False, lr=torch.tensor(0.01)), id="Lamb-lr"),
    pytest.param(lambda p: ALTO(p, max_grad_norm=1.0, foreach=False), id="ALTO-single-clip"),
    pytest.param(lambda p: ALTO(p, bias_correction=False, trust_clip=(0, 5)), id="ALTO-vanilla"),
    pytest.param(lambda p: ALTO(p, layer_adaptation=False), id="ALTO-no-adaptation"),
    pytest.param(
        lambda p: AdaBelief(p, weight_decay=0.1, decoupled_weight_decay=False),
        id="AdaBelief-coupled",
    ),
    pytest.param(lambda p: AdaBelief(p, weight_decay=0.1, foreach=False), id="AdaBelief-single"),
]  # fmt: skip


@pytest.mark.parametrize("make", OPTIONS)
def test_options_step_on_meta_and_without_host_reads(make):
    meta = [torch.empty(s, device="meta").requires_grad_() for s in [(4, 3), (3,), ()]]
    optimizer = make(meta)
    for _ in range(2):
        for p in meta:
            p.grad = torch.empty_like(p)
        optimizer.step()
    theta0 = initial(torch.float32, zero_last=False)
    params, optimizer = run(make, theta0, steps=2)
    live = optimizer.param_groups[0]["params"]
    for p, g in zip(live, grad_fn(params, 2)):
        p.grad = g
    with host_read_probe() as reads:
        optimizer.step()
    assert reads == []


def test_meta_with_fused_requested_falls_back_to_foreach():
    meta = [torch.empty(300, 300, device="meta").requires_grad_()]
    for optimizer in (Lamb(meta, fused=True), ALTO(meta, fused=True)):
        meta[0].grad = torch.empty_like(meta[0])
        optimizer.step()


def test_tensor_lr_equals_float_lr():
    theta0 = initial(torch.float32)
    a, _ = run(lambda p: ALTO(p, lr=torch.tensor(0.02)), theta0)
    b, _ = run(lambda p: ALTO(p, lr=0.02), theta0)
    assert_all_close(a, b, rtol=1e-6, atol=1e-7)


def test_load_state_dict_puts_step_counters_on_the_parameter_device_and_dtype():
    theta0 = initial()
    params, optimizer = run(lambda p: Lamb(p), theta0, steps=2)
    saved = optimizer.state_dict()
    for entry in saved["state"].values():
        entry["step"] = entry["step"].to(torch.float32)
    fresh = Lamb([p.clone().requires_grad_() for p in params])
    fresh.load_state_dict(saved)
    for p in fresh.param_groups[0]["params"]:
        assert fresh.state[p]["step"].dtype == torch.float64
        assert fresh.state[p]["step"].device == p.device


# Five tensors ≥ FUSED_MIN_NUMEL (two of them of equal size) and one below, riding along:
# the compiled passes take the first four in one call, then the fifth and the small one
# alone (groups of 8, then 4, then single ones).
FUSED_SHAPES = [(300, 300), (256, 256), (260, 256), (256, 260), (257, 258), (40,)]


@pytest.mark.parametrize(
    ("cls", "hp"),
    [
        (ALTO, dict(lr=0.01, weight_decay=1e-2, alpha=-5.0, beta=0.9, betas=(0.8, 0.95))),
        (Lamb, dict(lr=0.01, bias_correction=False, trust_clip=(0.5, 1.5), weight_decay=0.1,
                    betas=(0.8, 0.95))),
        # β₂ < 0.5: the lerp's other form, g̃ - (g̃ - m)·β₂
        (ALTO, dict(lr=0.01, alpha=0.5, beta=0.5, betas=(0.3, 0.95), weight_decay=1e-2)),
        # ε₁, ε₂ and the norm's ε large enough to be seen at rtol 1e-9 (the defaults are not)
        (ALTO, dict(lr=0.01, alpha=-5.0, beta=0.9, betas=(0.8, 0.95), weight_decay=1e-2,
                    **BIG_EPS)),
    ],
    ids=["ALTO", "Lamb-vanilla-clip", "ALTO-low-beta2", "ALTO-big-eps"],
)  # fmt: skip
def test_fused_path_matches_the_float64_reference(cls, hp):
    """The compiled path itself (tensors ≥ FUSED_MIN_NUMEL) against the float64 reference at
    rtol 1e-9, with the paper's ε₂ = 1e-6: dropping ``ε₂·φ`` in the fused kernel moves the
    ratio by ~1e-6 (relative), far above 1e-9, and the zero (256, 256) tensor takes the
    ``‖θ‖ = 0`` branch of the compiled ratio."""
    from adaptor.replacement import FUSED_MIN_NUMEL

    theta0 = initial(torch.float64, shapes=FUSED_SHAPES, zero_last=False)
    theta0[1].zero_()
    assert all(t.numel() >= FUSED_MIN_NUMEL for t in theta0[:-1])
    # Gradients missing at some steps: the tensors of one compiled group then have different
    # step counts, hence different bias corrections.
    skip = {(1, 2), (2, 2), (3, 0)}
    ours, _ = run(lambda p: cls(p, fused=True, **hp), theta0, steps=5, skip=skip)
    reference_hp = {**hp}
    reference_hp.pop("alpha", None)
    expected = reference_lamb(
        theta0, alpha=hp.get("alpha", 0.0), beta=reference_hp.pop("beta", 0.0), steps=5,
        skip=skip, **reference_hp,
    )
    assert_all_close(ours, expected, **F64)
    assert not torch.equal(ours[1], theta0[1])  # the zero tensor moved (ratio 1)


@pytest.mark.parametrize("cls", [ALTO, Lamb])
def test_fused_calls_take_small_tensors_along_in_groups_of_eight_then_four(cls, monkeypatch):
    """Ten flattenable tensors (five large, five small of ranks 1-2) go in one call of eight,
    then two single ones; a small non-contiguous one and a one-element one take the foreach
    path. Every tensor matches the float64 reference at rtol 1e-9 (the riders' loops are the
    compiled pass's own), with a missing gradient at one step."""
    from backends import first_order

    counts = []
    real = first_order._kernel

    def recording(name, variant, device):
        kernel = real(name, variant, device)

        def call(*args, **kwargs):
            if name == "moments":
                counts.append(len(args[0]))
            return kernel(*args, **kwargs)

        return call

    monkeypatch.setattr(first_order, "_kernel", recording)
    shapes = [*FUSED_SHAPES[:5], (40,), (3, 7), (2,), (33,), (5, 5), (40,), ()]
    theta0 = initial(torch.float64, shapes=shapes, zero_last=False)
    params = [t.clone().requires_grad_() for t in theta0]
    strided = torch.zeros(40, 2, dtype=torch.float64)
    strided[:, 1] = theta0[-2]
    params[-2] = strided[:, 1].detach().requires_grad_()
    assert not params[-2].is_contiguous()
    hp = dict(lr=0.01, weight_decay=1e-2, betas=(0.8, 0.95))
    if cls is ALTO:
        hp.update(alpha=-5.0, beta=0.9)
    optimizer = cls(params, fused=True, **hp)
    skip = {(1, 6)}
    for step in range(4):
        grads = grad_fn([p.detach() for p in params], step)
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = None if (step, i) in skip else g.clone()
        optimizer.step()
    assert counts == [8, 1, 1] + [8, 1] + [8, 1, 1] * 2  # step 1: one gradient missing
    reference_hp = {**hp}
    alpha, beta = reference_hp.pop("alpha", 0.0), reference_hp.pop("beta", 0.0)
    expected = reference_lamb(theta0, alpha=alpha, beta=beta, steps=4, skip=skip,
                              **reference_hp)  # fmt: skip
    assert_all_close([p.detach() for p in params], expected, **F64)


def test_fused_alto_keeps_the_raw_gradient_of_the_tensors_it_takes():
    """The compiled pass keeps g̃ in registers: ``p.grad`` of every tensor it takes (the
    large ones and the small contiguous ones riding along in their calls) is the raw
    gradient after the step; a small non-contiguous tensor (foreach path) holds
    g̃ = g + α(1-β)g at the first step, as on the unfused paths, and so does a bucket
    without a large tensor (float32 here, all foreach)."""
    theta0 = initial(torch.float64, shapes=FUSED_SHAPES, zero_last=False)
    strided = torch.randn(40, 2, dtype=torch.float64)[:, 0]
    small32 = torch.randn(30, dtype=torch.float32)
    params = [t.clone().requires_grad_() for t in [*theta0, strided, small32]]
    optimizer = ALTO(params, lr=0.01, alpha=-5.0, beta=0.9, fused=True)
    grads = grad_fn([p.detach() for p in params[: len(theta0)]], 0)
    grads += [torch.randn(40, 2, dtype=torch.float64)[:, 1], torch.randn(30)]
    for p, g in zip(params, grads):
        p.grad = g if not g.is_contiguous() else g.clone()  # clone() would make it contiguous
    grads = [g.clone() for g in grads]
    assert not params[-2].grad.is_contiguous()
    optimizer.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(params[:-2], grads[:-2]))
    for p, g in zip(params[-2:], grads[-2:]):
        torch.testing.assert_close(p.grad, g * (1 - 5.0 * 0.1))


def test_fused_steps_under_a_changing_beta2_do_not_recompile_past_the_limit():
    """β₂ cycled through more values than dynamo's recompile limit (8): the lerp weight
    enters the compiled pass as a number, not as a constant of the graph (a specialised
    weight recompiled at every new value and ``fullgraph=True`` raised past the limit)."""
    theta0 = initial(torch.float32, shapes=FUSED_SHAPES, zero_last=False)
    params = [t.clone().requires_grad_() for t in theta0]
    optimizer = ALTO(params, lr=0.01, fused=True)
    for step in range(10):
        optimizer.param_groups[0]["betas"] = (0.8 + 0.01 * step, 0.99)
        for p, g in zip(params, grad_fn([p.detach() for p in params], step)):
            p.grad = g
        optimizer.step()
    assert all(torch.isfinite(p).all() for p in params)


def test_divide_into_both_branches_on_cpu():
    """Both the in-place (CPU default) and the new-list branch run with data here."""
    from backends.first_order import _divide_into

    generator = torch.Generator().manual_seed(1)
    n = [torch.randn(4, 3, generator=generator), torch.randn(5, generator=generator)]
    d = [torch.rand(4, 3, generator=generator) + 0.5, torch.rand(5, generator=generator) + 0.5]
    expected = [a / b for a, b in zip(n, d)]
    fresh = _divide_into(n, [t.clone() for t in d], in_place=False)
    reused_denominators = [t.clone() for t in d]
    reused = _divide_into(n, reused_denominators, in_place=True)
    for x, y, z, w in zip(fresh, reused, expected, reused_denominators):
        assert torch.equal(x, z) and torch.equal(y, z)
        assert y is w  # written over the temporaries
    assert not any(x is t for x, t in zip(fresh, d))


# -- param groups ----------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.conv = nn.Conv1d(4, 4, 3, bias=False)
        self.bn = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 3)
        self.ln = nn.LayerNorm(3)
        self.head = nn.Linear(3, 2, bias=False)


def test_param_groups_for_excludes_biases_and_norms():
    net = Net()
    groups = param_groups_for(net, weight_decay=0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    decayed = {id(p) for p in groups[0]["params"]}
    excluded = {id(p) for p in groups[1]["params"]}
    assert decayed == {id(net.embed.weight), id(net.conv.weight), id(net.fc.weight),
                       id(net.head.weight)}  # fmt: skip
    assert excluded == {id(net.bn.weight), id(net.bn.bias), id(net.fc.bias), id(net.ln.weight),
                        id(net.ln.bias)}  # fmt: skip
    assert "layer_adaptation" not in groups[1]

    groups = param_groups_for(net, 0.1, exclude_from_layer_adaptation=True, exclude_norm=False,
                              exclude=lambda name, p: name.startswith("embed"))  # fmt: skip
    assert groups[1]["layer_adaptation"] is False
    assert {id(p) for p in groups[1]["params"]} == {
        id(net.embed.weight), id(net.bn.bias), id(net.fc.bias), id(net.ln.bias)
    }
    for make in (Lamb, ALTO, AdaBelief, backends.AdamW, backends.SGD):
        optimizer = make(param_groups_for(net, 0.1, exclude_from_layer_adaptation=True), lr=0.1)
        assert optimizer.param_groups[1]["weight_decay"] == 0.0


def test_param_groups_for_layer_adaptation_off_moves_zero_biases():
    net = nn.Linear(3, 2)
    nn.init.zeros_(net.bias)
    x = torch.randn(8, 3)
    for flag, moves in ((False, False), (True, True)):
        model = copy.deepcopy(net)
        optimizer = Lamb(param_groups_for(model, 0.01, exclude_from_layer_adaptation=flag), lr=0.1,
                         zero_norm_trust="paper")  # the default ratio 1 moves them anyway
        model(x).square().sum().backward()
        optimizer.step()
        assert (model.bias.abs().max() > 1e-3) == moves


def test_param_groups_for_rejects_bad_input():
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        param_groups_for([torch.zeros(2)])
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups_for(nn.Linear(2, 2), weight_decay=-1.0)


def test_backends_exports_every_first_order_base():
    assert backends.SGD is torch.optim.SGD
    assert backends.Adam is torch.optim.Adam
    assert backends.AdamW is torch.optim.AdamW
    assert (backends.Lamb, backends.ALTO, backends.AdaBelief) == (Lamb, ALTO, AdaBelief)
    assert backends.param_groups_for is param_groups_for
    assert issubclass(ALTO, Lamb)


# -- copies, pickling, hooks and state dicts (issue 11) --------------------------------------

COPYABLE = [
    pytest.param(lambda p: Lamb(p, lr=0.01, max_grad_norm=1.0), id="Lamb-clip"),
    pytest.param(lambda p: ALTO(p, lr=0.01, max_grad_norm=1.0), id="ALTO-clip"),
    pytest.param(lambda p: AdaBelief(p, lr=0.01, weight_decay=0.01), id="AdaBelief"),
]


def _stepped(make, steps=2):
    theta0 = initial(torch.float64, zero_last=False)
    _, optimizer = run(make, theta0, steps=steps)
    return optimizer


def _set_grads(optimizer, step):
    live = [p for g in optimizer.param_groups for p in g["params"]]
    for p, g in zip(live, grad_fn([p.detach() for p in live], step)):
        p.grad = g
    return live


@pytest.mark.parametrize("make", COPYABLE)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_after_a_scheduler_and_hooks_steps_its_own_parameters(make, how):
    """Before: ``max_grad_norm`` was an instance attribute that torch's ``__getstate__`` drops,
    so the copy raised AttributeError on ``step()``."""
    import pickle

    optimizer = _stepped(make)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    calls = []
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append(1))
    _set_grads(optimizer, 2)
    optimizer.step()  # through the scheduler's step wrapper
    scheduler.step()
    twin = copy.deepcopy(optimizer) if how == "deepcopy" else pickle.loads(pickle.dumps(optimizer))
    originals = [p.detach().clone() for p in _set_grads(optimizer, 3)]
    copies = _set_grads(twin, 3)
    assert not any(p is q for p, q in zip(copies, optimizer.param_groups[0]["params"]))
    before = [p.detach().clone() for p in copies]
    twin.step()
    assert all(torch.equal(p, q) for p, q in zip(optimizer.param_groups[0]["params"], originals))
    assert all(not torch.equal(p, q) for p, q in zip(copies, before))
    assert twin.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"] == 0.005
    # the copy steps exactly as the original does from the same state
    optimizer.step()
    for p, q in zip(optimizer.param_groups[0]["params"], copies):
        assert torch.equal(p, q)
    assert calls == [1, 1]  # hooks stay with the original (torch's behaviour)


@pytest.mark.parametrize("make", COPYABLE)
def test_load_tolerates_a_post_hook_that_writes_non_dict_state(make):
    """torch's optimizers accept any value a load post-hook puts into ``optimizer.state``."""
    optimizer = _stepped(make)
    saved = optimizer.state_dict()

    def hook(opt):
        opt.state["note"] = 3

    fresh = make([p.detach().clone().requires_grad_() for p in optimizer.param_groups[0]["params"]])
    fresh.register_load_state_dict_post_hook(hook)
    fresh.load_state_dict(saved)
    assert fresh.state["note"] == 3
    _set_grads(fresh, 2)
    fresh.step()


# -- ALTO's layout: α and β are the adaptor's keys, betas is Lamb's ----------------------------


def test_alto_and_explored_lamb_have_identical_param_groups():
    from adaptor import E

    params = [torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)]
    hp = dict(lr=0.02, betas=(0.8, 0.95), weight_decay=1e-3, max_grad_norm=1.0)
    alto = ALTO([{"params": params[:1]}, {"params": params[1:], "lr": 0.1}], alpha=-3.0,
                beta=0.9, **hp)  # fmt: skip
    explored = E(Lamb([{"params": params[:1]}, {"params": params[1:], "lr": 0.1}], **hp),
                 alpha=-3.0, beta=0.9)  # fmt: skip
    assert alto.param_groups == explored.param_groups
    assert alto.param_groups[0]["explore_alpha"] == -3.0
    assert alto.param_groups[0]["explore_beta"] == 0.9
    assert alto.param_groups[0]["betas"] == (0.8, 0.95)
    assert ALTO.explores is True and Lamb.explores is False


def test_one_cycle_lr_cycles_lambs_beta2_and_leaves_alpha_and_beta_alone():
    """Before: ``betas[0]`` was the adaptor's β; OneCycleLR moved it 0.99 → 0.85 and α = −50
    then broke ``|α| < 1/(1-β)``."""
    params = [p.clone().requires_grad_() for p in initial(torch.float32, zero_last=False)]
    optimizer = ALTO(params, lr=0.01, alpha=-50.0, beta=0.99)
    total = 12
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.01, total_steps=total)
    seen = set()
    for step in range(total):
        _set_grads(optimizer, step)
        optimizer.step()
        scheduler.step() if step < total - 1 else None
        group = optimizer.param_groups[0]
        assert (group["explore_alpha"], group["explore_beta"]) == (-50.0, 0.99)
        seen.add(round(group["betas"][0], 6))
    assert min(seen) <= 0.86 and max(seen) >= 0.94  # the cycle did move β₂
    assert all(torch.isfinite(p).all() for p in params)


def test_alto_refuses_the_old_three_betas_with_the_new_spelling():
    params = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match=r"old layout .*betas=\(0\.9, 0\.99\), beta=0\.99"):
        ALTO(params, betas=(0.99, 0.9, 0.99))
    optimizer = ALTO(params)
    with pytest.raises(ValueError, match="old layout"):
        optimizer.add_param_group({"params": [torch.zeros(1)], "betas": (0.5, 0.9, 0.99)})


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
def test_zero_initialised_bias_moves_in_altos_first_step(foreach):
    """Before: φ(0) = ε₃ gave the zero tensor a ratio ~1e-10 (1e-11 after 10 steps at lr 0.01).

    First step with bias correction: m̂/(√v̂ + ε₁) = g̃/(|g̃| + ε₁) ≈ sign(g̃), so with ratio 1
    each element moves by lr (up to ε₁/|g̃|); with the paper's φ(0) the move is ~lr·ε₃/‖r‖."""
    for mode, low, high in (("one", 0.0099, 0.01), ("paper", 0.0, 1e-11)):
        bias = torch.zeros(4, requires_grad=True)
        weight = torch.ones(3, requires_grad=True)
        optimizer = ALTO([weight, bias], lr=0.01, foreach=foreach, zero_norm_trust=mode)
        weight.grad = torch.ones(3)
        bias.grad = torch.tensor([1.0, -2.0, 3.0, -0.5])
        optimizer.step()
        moved = bias.detach().abs()
        assert torch.all((moved >= low) & (moved <= high)), (mode, moved)


def _state_snapshot(optimizer):
    return copy.deepcopy(
        ({id(p): dict(s) for p, s in optimizer.state.items()}, optimizer.param_groups)
    )


def _assert_same_state(optimizer, snapshot):
    state, groups = snapshot
    assert {id(p) for p in optimizer.state} == set(state)
    for p, entry in optimizer.state.items():
        assert set(entry) == set(state[id(p)])
        for key, value in entry.items():
            old = state[id(p)][key]
            assert value.dtype == old.dtype and torch.equal(value, old), key
    for group, old in zip(optimizer.param_groups, groups):
        assert {k: v for k, v in group.items() if k != "params"} == {
            k: v for k, v in old.items() if k != "params"
        }


def _bad_state_dicts(optimizer):
    """(description, state dict, message regex) built from a good state dict."""
    good = optimizer.state_dict()
    key = next(k for k in good["state"][0] if k != "step")
    out = []
    bad = copy.deepcopy(good)
    bad["state"][0][key] = torch.zeros(2, 2)
    out.append((bad, rf"parameter 0: state '{key}' has shape \(2, 2\), the parameter has "
                     r"shape \(5,\)"))  # fmt: skip
    bad = copy.deepcopy(good)
    bad["state"][1]["exp_avg_typo"] = torch.zeros(3)
    out.append((bad, r"parameter 1: unknown state key\(s\) \['exp_avg_typo'\]"))
    bad = copy.deepcopy(good)
    del bad["state"][1]["exp_avg"]
    out.append((bad, r"parameter 1: missing state key\(s\) \['exp_avg'\]"))
    bad = copy.deepcopy(good)
    bad["state"][0]["step"] = torch.zeros(3)
    out.append((bad, r"parameter 0: state 'step' must have one element"))
    bad = copy.deepcopy(good)
    bad["param_groups"][0]["params"] = bad["param_groups"][0]["params"][:-1]
    out.append((bad, r"param group 0 has 1 parameters in the state dict, 2 in the optimizer"))
    bad = copy.deepcopy(good)
    bad["state"][7] = bad["state"][0]
    out.append((bad, r"state for parameter index 7, but the optimizer has 2 parameters"))
    return out


@pytest.mark.parametrize("make", COPYABLE)
def test_bad_state_dicts_raise_and_leave_the_optimizer_bit_identical(make):
    params = [torch.randn(5, requires_grad=True), torch.randn(3, requires_grad=True)]
    optimizer = make(params)
    for step in range(2):
        for p, g in zip(params, grad_fn([p.detach() for p in params], step)):
            p.grad = g
        optimizer.step()
    cases = _bad_state_dicts(optimizer)
    before = _state_snapshot(optimizer)
    weights = [p.detach().clone() for p in params]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            optimizer.load_state_dict(bad)
        _assert_same_state(optimizer, before)
        assert all(torch.equal(p, w) for p, w in zip(params, weights))


def test_alto_loads_a_lamb_state_dict_with_a_fresh_buffer():
    params = [torch.randn(5, requires_grad=True)]
    lamb = Lamb(params, betas=(0.9, 0.99), weight_decay=1e-4)
    params[0].grad = torch.ones(5)
    lamb.step()
    alto = ALTO([params[0].detach().clone().requires_grad_()])
    alto.load_state_dict(lamb.state_dict())
    assert "explore_buffer" not in alto.state[alto.param_groups[0]["params"][0]]
    assert alto.param_groups[0]["explore_alpha"] == -5.0  # the keys Lamb lacks: defaults
    alto.param_groups[0]["params"][0].grad = torch.ones(5)
    alto.step()


def test_alto_loads_a_state_dict_of_the_old_layout():
    params = [torch.randn(5, requires_grad=True)]
    alto = ALTO(params, alpha=-2.0, beta=0.9)
    params[0].grad = torch.ones(5)
    alto.step()
    old = alto.state_dict()
    group = old["param_groups"][0]
    group["betas"] = (0.5, *group["betas"])
    group["alpha"] = -3.0
    del group["explore_alpha"], group["explore_beta"]
    fresh = ALTO([params[0].detach().clone().requires_grad_()])
    fresh.load_state_dict(old)
    loaded = fresh.param_groups[0]
    assert (loaded["explore_alpha"], loaded["explore_beta"], loaded["betas"]) == (
        -3.0, 0.5, (0.9, 0.99)
    )
    assert "alpha" not in loaded


# -- precision: state dtype, one rounding, Kahan (issue 10) -----------------------------------

BF16_RESOLUTION = 2.0**-8  # relative spacing of bfloat16 (8 significant bits)


def _least_squares_run(make, dtype, steps=500):
    """Full-batch least squares ‖XWᵀ − XW*ᵀ‖²/n from a fixed start; gradients in float32
    (as autocast gives), handed to the optimizer in the parameter's dtype."""
    generator = torch.Generator().manual_seed(0)
    w0 = torch.randn(64, 32, generator=generator)
    x = torch.randn(256, 32, generator=generator)
    target = x @ torch.randn(64, 32, generator=generator).T
    p = w0.to(dtype).requires_grad_()
    optimizer = make([p])
    for _ in range(steps):
        residual = x @ p.detach().float().T - target
        p.grad = ((2.0 / residual.numel()) * residual.T @ x).to(dtype)  # ∇ of the mean square
        optimizer.step()
    return p.detach().float(), optimizer


def _relative_error(x, reference):
    return float((x - reference).norm() / reference.norm())


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
def test_bf16_alto_with_float32_state_tracks_its_float32_twin(foreach):
    """500 ALTO steps at lr 3e-3 on bf16 parameters against the same run in float32.

    With the default float32 state and ``kahan=True`` the relative parameter error stays
    below one bf16 resolution, 2⁻⁸ ≈ 0.0039 (measured 0.0025). Without Kahan the updates,
    below half an ulp of θ, round away (measured error 0.57); bf16 state with Kahan is
    measured 0.011 (so float32 state is what gets under 2⁻⁸)."""
    def make(**kw):
        return lambda p: ALTO(p, lr=3e-3, foreach=foreach, **kw)

    twin, _ = _least_squares_run(make(), torch.float32)
    kahan, optimizer = _least_squares_run(make(kahan=True), torch.bfloat16)
    state = optimizer.state[optimizer.param_groups[0]["params"][0]]
    assert state["exp_avg"].dtype == state["explore_buffer"].dtype == torch.float32
    assert state["kahan_comp"].dtype == torch.bfloat16
    kahan_error = _relative_error(kahan, twin)
    assert kahan_error < BF16_RESOLUTION
    plain, _ = _least_squares_run(make(), torch.bfloat16)
    assert _relative_error(plain, twin) > 25 * kahan_error  # 0.57 vs 0.0025
    bf16_state, _ = _least_squares_run(make(kahan=True, state_dtype=torch.bfloat16),
                                       torch.bfloat16)  # fmt: skip
    assert _relative_error(bf16_state, twin) > 2 * kahan_error  # 0.011 vs 0.0025


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
def test_bf16_weight_decay_is_exact_with_kahan_and_rounds_once_without(foreach):
    """100 steps, zero gradient, lr 0.02, decoupled wd 0.1 on bf16 θ₀ = 1: exact
    θ/θ₀ = (1 − 0.002)¹⁰⁰ = 0.8186. ``kahan=True`` gives 0.8203 (within 1 %). Without it,
    each step is θ ← bf16(θ − 0.002·θ) computed in float32 and rounded once: θ stops at 0.9766,
    where 0.002·θ falls below half an ulp (2⁻⁹). (Before: 0.585, the scalar 0.998 was rounded to
    bf16 0.99609 first.)"""
    exact = (1 - 0.02 * 0.1) ** 100
    assert abs(exact - 0.8186) < 1e-4
    results = {}
    for kahan in (True, False):
        p = torch.ones(1000, dtype=torch.bfloat16, requires_grad=True)
        optimizer = AdaBelief([p], lr=0.02, weight_decay=0.1, kahan=kahan, foreach=foreach)
        for _ in range(100):
            p.grad = torch.zeros_like(p)
            optimizer.step()
        assert torch.all(p == p[0])
        results[kahan] = float(p.detach()[0])
    assert abs(results[True] / exact - 1) < 0.01
    once = torch.ones((), dtype=torch.bfloat16)
    for _ in range(100):
        once = (once.float() + (-0.02 * 0.1) * once.float()).bfloat16()
    assert results[False] == float(once) == 0.9765625


def test_state_dtype_defaults_option_and_state_dict_round_trip():
    bf16 = torch.randn(4, dtype=torch.bfloat16, requires_grad=True)
    f32 = torch.randn(3, requires_grad=True)
    f64 = torch.randn(2, dtype=torch.float64, requires_grad=True)
    optimizer = ALTO([bf16, f32, f64], kahan=True)
    for p in (bf16, f32, f64):
        p.grad = torch.randn_like(p)
    optimizer.step()
    expected = {bf16: torch.float32, f32: torch.float32, f64: torch.float64}
    for p, dtype in expected.items():
        assert optimizer.state[p]["exp_avg_sq"].dtype == dtype
    assert "kahan_comp" in optimizer.state[bf16] and "kahan_comp" not in optimizer.state[f32]
    import io

    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # dtypes in param groups load safely
    fresh = ALTO([t.detach().clone().requires_grad_() for t in (bf16, f32, f64)], kahan=True)
    fresh.load_state_dict(saved)
    restored = fresh.state[fresh.param_groups[0]["params"][0]]
    assert restored["exp_avg"].dtype == torch.float32  # torch's load would round it to bf16
    assert torch.equal(restored["exp_avg"], optimizer.state[bf16]["exp_avg"])
    assert restored["kahan_comp"].dtype == torch.bfloat16
    wide = Lamb([f32], state_dtype=torch.float64)
    f32.grad = torch.randn_like(f32)
    wide.step()
    assert wide.state[f32]["exp_avg"].dtype == torch.float64
    with pytest.raises(TypeError, match="Lamb: state_dtype must be None or a floating"):
        Lamb([f32], state_dtype=torch.int32)
    with pytest.raises(TypeError, match="AdaBelief: kahan must be True or False"):
        AdaBelief([f32], kahan=1)


# -- non-finite steps and GradScaler ----------------------------------------------------------

SKIPPING = [
    pytest.param(lambda p, **kw: Lamb(p, lr=0.01, weight_decay=0.01, **kw), id="Lamb"),
    pytest.param(lambda p, **kw: Lamb(p, lr=0.01, foreach=False, max_grad_norm=1.0, **kw),
                 id="Lamb-single-clip"),
    pytest.param(lambda p, **kw: ALTO(p, lr=0.01, **kw), id="ALTO"),
    pytest.param(lambda p, **kw: ALTO(p, lr=0.01, foreach=False, **kw), id="ALTO-single"),
    pytest.param(lambda p, **kw: AdaBelief(p, lr=0.01, weight_decay=0.01, **kw), id="AdaBelief"),
    pytest.param(lambda p, **kw: AdaBelief(p, lr=0.01, foreach=False, **kw),
                 id="AdaBelief-single"),
]  # fmt: skip


def _everything(optimizer):
    """Params and every state tensor (the skip counter excepted), cloned."""
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            out.append(p.detach().clone())
            for key, value in sorted(optimizer.state.get(p, {}).items()):
                if key != "nonfinite_skips":
                    out.append(value.clone())
    return out


def _skip_run(make, dtype, bad_step, bad_value, steps=5, **kw):
    theta0 = initial(torch.float32, zero_last=False)
    params = [t.to(dtype).requires_grad_() for t in theta0]
    optimizer = make(params, **kw)
    snapshots = []
    for step in range(steps):
        grads = grad_fn([p.detach().float() for p in params], step)
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = g.to(dtype)
            if step == bad_step and i == 1:
                p.grad.view(-1)[0] = bad_value
        snapshots.append(_everything(optimizer))
        optimizer.step()
    snapshots.append(_everything(optimizer))
    return params, optimizer, snapshots


@pytest.mark.parametrize("make", SKIPPING)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_a_nonfinite_step_is_skipped_bit_identically(make, bad, dtype):
    """Step k = 2 has one NaN/Inf: after it, params and every state tensor (step counters,
    moments, buffer, Kahan compensation) equal those before it bit for bit, the count is 1,
    and the later steps equal a run that never had step 2 (its gradients are those of the
    clean run's step 2, recomputed from the same parameters)."""
    kw = dict(skip_nonfinite=True, kahan=dtype == torch.bfloat16)
    _, optimizer, snaps = _skip_run(make, dtype, bad_step=2, bad_value=bad, **kw)
    before, after = snaps[2], snaps[3]
    assert len(before) == len(after)
    for x, y in zip(before, after):
        assert x.dtype == y.dtype and torch.equal(x, y)
    assert torch.equal(optimizer.skipped_steps, torch.tensor(1.0))
    # later steps are normal: equal to a run whose step 2 had no gradient problem and whose
    # step-2 gradient was dropped (grad_fn depends on the step index only through targets)
    _, clean, clean_snaps = _skip_run(make, dtype, bad_step=-1, bad_value=0.0, steps=2, **kw)
    assert torch.equal(clean.skipped_steps, torch.tensor(0.0))
    for x, y in zip(clean_snaps[2], before):
        assert torch.equal(x, y)
    assert not all(torch.equal(x, y) for x, y in zip(snaps[4], snaps[3]))  # step 3 moved


def test_skipping_off_by_default_lets_nan_in():
    p = torch.ones(3, requires_grad=True)
    optimizer = Lamb([p])
    p.grad = torch.tensor([1.0, float("nan"), 1.0])
    optimizer.step()
    assert torch.isnan(p).any() and optimizer.skipped_steps is None


@pytest.mark.parametrize("make", SKIPPING)
def test_skip_kahan_and_bf16_step_on_meta_and_without_host_reads(make):
    kw = dict(skip_nonfinite=True, kahan=True)
    meta = [torch.empty(s, device="meta", dtype=torch.bfloat16).requires_grad_()
            for s in [(4, 3), (3,), ()]]  # fmt: skip
    optimizer = make(meta, **kw)
    for _ in range(2):
        for p in meta:
            p.grad = torch.empty_like(p)
        optimizer.step()
    _, optimizer, _ = _skip_run(make, torch.bfloat16, bad_step=-1, bad_value=0.0, steps=2, **kw)
    _set_grads(optimizer, 2)
    for p in optimizer.param_groups[0]["params"]:
        p.grad = p.grad.to(torch.bfloat16)
    with host_read_probe() as reads:
        optimizer.step()
    assert reads == []


def _scaler_run(make, autocast_dtype, inf_step, skip_step, steps=4, probe=False):
    """A Linear model trained under CPU autocast and ``torch.amp.GradScaler``; at
    ``inf_step`` one gradient gets an Inf after backward; ``skip_step`` is not stepped at all."""
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    optimizer = make(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 6, generator=generator), torch.randn(8, 3, generator=generator))
               for _ in range(steps)]  # fmt: skip
    reads = []
    for step, (x, y) in enumerate(batches):
        optimizer.zero_grad()
        if step == skip_step:
            continue
        with torch.autocast("cpu", dtype=autocast_dtype):
            loss = nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        if step == inf_step:
            model.weight.grad[0, 0] = float("inf")
        if probe:
            with host_read_probe() as found:
                scaler.step(optimizer)
            reads.extend(found)
        else:
            scaler.step(optimizer)
        scaler.update()
    return model, optimizer, reads


@pytest.mark.parametrize("make", SKIPPING[::2])  # Lamb, ALTO, AdaBelief (foreach)
@pytest.mark.parametrize("autocast_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_grad_scaler_inf_step_equals_a_skipped_step_without_host_reads(make, autocast_dtype):
    """GradScaler hands ``grad_scale``/``found_inf`` to the optimizer (``_step_supports_amp_
    scaling``): the step unscales on the device and skips where ``found_inf`` is set, so a run
    with an Inf at step 1 equals a run that never steps at step 1 (the scale is a power of
    two: unscaling is exact), and ``scaler.step(opt)`` makes no host read."""
    assert type(make(nn.Linear(1, 1).parameters()))._step_supports_amp_scaling is True
    injected, optimizer, reads = _scaler_run(make, autocast_dtype, inf_step=1, skip_step=-1,
                                             probe=True)  # fmt: skip
    skipped, _, _ = _scaler_run(make, autocast_dtype, inf_step=-1, skip_step=1)
    for p, q in zip(injected.parameters(), skipped.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(optimizer.skipped_steps, torch.tensor(1.0))
    assert reads == []


def test_fused_bf16_kahan_and_skip_match_the_foreach_path():
    """The compiled kernels with bf16 parameters, float32 state, Kahan writes and a NaN step:
    the skipped step leaves everything bit-identical (``torch.where`` inside the kernels), and
    the trajectory equals the foreach path's up to one bf16 rounding of an element (both
    compute in float32 and round once; summation order differs)."""
    kw = dict(lr=0.01, alpha=-5.0, beta=0.9, kahan=True, skip_nonfinite=True)
    generator = torch.Generator().manual_seed(2)
    theta0 = [torch.randn(256, 256, generator=generator), torch.randn(40, generator=generator)]

    def go(fused):
        params = [t.to(torch.bfloat16).requires_grad_() for t in theta0]
        optimizer = ALTO(params, fused=fused, **kw)
        snaps = []
        for step in range(4):
            for p, g in zip(params, grad_fn([p.detach().float() for p in params], step)):
                p.grad = g.to(torch.bfloat16)
            if step == 2:
                params[0].grad[3, 4] = float("nan")
            snaps.append(_everything(optimizer))
            optimizer.step()
        return params, optimizer, snaps

    fused, optimizer, snaps = go(True)
    for x, y in zip(snaps[2], snaps[3]):
        assert torch.equal(x, y)
    assert torch.equal(optimizer.skipped_steps, torch.tensor(1.0))
    state = optimizer.state[fused[0]]
    assert state["exp_avg"].dtype == torch.float32 and state["kahan_comp"].dtype == torch.bfloat16
    plain, _, _ = go(False)
    for x, y in zip(fused, plain):
        torch.testing.assert_close(x.float(), y.float(), rtol=2**-7, atol=1e-6)
    assert not torch.equal(fused[0], theta0[0].to(torch.bfloat16))


# -- torch.compile -----------------------------------------------------------------------------

COMPILED = [
    pytest.param(lambda p: Lamb(p, lr=0.01, weight_decay=0.01), id="Lamb"),
    pytest.param(lambda p: ALTO(p, lr=0.01), id="ALTO"),
    pytest.param(lambda p: AdaBelief(p, lr=0.01, weight_decay=0.01), id="AdaBelief"),
]
# aot_eager: dynamo's trace (where (None, None) device keys crashed) with eager kernels, so
# compiled and eager agree bit for bit; one inductor test checks the generated code (float32:
# rtol 1e-5, its reassociated sums differ from eager by a few ulps).
COMPILE_TOLERANCE = {"aot_eager": dict(rtol=0, atol=0), "inductor": dict(rtol=1e-5, atol=1e-6)}


def _compiled_vs_eager(make, backend, dtype=torch.float32, steps=3):
    generator = torch.Generator().manual_seed(4)
    theta0 = [torch.randn(8, 4, generator=generator), torch.randn(4, generator=generator)]
    grads = [[torch.randn(t.shape, generator=generator) for t in theta0] for _ in range(steps)]
    out = []
    for compiled in (False, True):
        params = [t.to(dtype).requires_grad_() for t in theta0]
        optimizer = make(params)

        def train_step(gs, params=params, optimizer=optimizer):
            for p, g in zip(params, gs):
                p.grad = g.to(dtype)
            optimizer.step()

        run_step = torch.compile(train_step, backend=backend) if compiled else train_step
        for gs in grads:
            run_step(gs)
        out.append([p.detach() for p in params])
    return out


@pytest.mark.parametrize("make", COMPILED)
def test_compiled_step_with_default_arguments_equals_eager(make):
    eager, compiled = _compiled_vs_eager(make, "aot_eager")
    assert_all_close(compiled, eager, **COMPILE_TOLERANCE["aot_eager"])


def test_inductor_compiled_alto_step_equals_eager():
    eager, compiled = _compiled_vs_eager(lambda p: ALTO(p, lr=0.01), "inductor")
    assert_all_close(compiled, eager, **COMPILE_TOLERANCE["inductor"])


def test_compiled_bf16_alto_with_kahan_and_skip_equals_eager():
    """The precision paths (float32 work copies, Kahan writes, the skip flag's masked
    restore) under ``torch.compile`` (aot_eager): bf16 results bit-identical to eager."""
    eager, compiled = _compiled_vs_eager(
        lambda p: ALTO(p, lr=0.01, kahan=True, skip_nonfinite=True), "aot_eager",
        dtype=torch.bfloat16,
    )
    assert_all_close(compiled, eager, **COMPILE_TOLERANCE["aot_eager"])


def test_fused_groups_take_any_ranks_and_non_contiguous_tensors_alone():
    """Large tensors of ranks 1, 2 and 4 share a compiled group (flattened); a
    non-contiguous one goes alone as it is. Both agree with the foreach path in float64, and
    other rank patterns reuse the group's graphs (no recompile per pattern)."""
    from torch._dynamo.utils import counters

    def params_for(shapes, transposed):
        generator = torch.Generator().manual_seed(7)
        made = []
        for i, shape in enumerate(shapes):
            t = torch.randn(shape, generator=generator, dtype=torch.float64)
            made.append((t.t() if i == transposed else t).detach().requires_grad_())
        return made

    def steps(optimizer, params, count):
        for step in range(count):
            for p, g in zip(params, grad_fn([p.detach() for p in params], step)):
                p.grad = g
            optimizer.step()

    shapes = [(256, 260), (66000,), (8, 8, 32, 33), (300, 230), (40,)]
    hp = dict(lr=0.01, weight_decay=1e-2, alpha=-5.0, beta=0.9)
    fused, generic = params_for(shapes, 3), params_for(shapes, 3)
    assert not fused[3].is_contiguous()
    steps(ALTO(fused, fused=True, **hp), fused, 4)
    steps(ALTO(generic, fused=False, **hp), generic, 4)
    assert_all_close(fused, generic, **F64)
    graphs = []
    for pattern in ([(66100,), (8, 8, 32, 34), (250, 270), (257, 256)],
                    [(4, 4, 64, 65), (66200,), (66300,), (262, 251)],
                    [(262, 251), (2, 130, 256), (66400,), (4, 4, 64, 66)]):
        others = params_for(pattern, None)
        steps(ALTO(others, fused=True, **hp), others, 2)  # one group of four
        graphs.append(counters["stats"]["unique_graphs"])
    assert len(set(graphs)) == 1, graphs
