"""SPSA (backends.zeroth_order): unbiasedness, convergence, memory, round-off, errors.

The generic tests (meta step, host reads, bit-exact resume, frozen parameters, α = 0 equals
SPSA + the base without the adaptor, bad input) run over the entries of
``tests/infos/zeroth_order.py``; this file holds what is specific to a zero-order estimator.
"""

from __future__ import annotations

import copy
import math
from statistics import NormalDist

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from adaptor import explore
from backends import SPSA

# -- helpers ------------------------------------------------------------------------------


class SPSAThenBase:
    """SPSA + a base optimizer without the adaptor: ``estimate`` then ``base.step()``."""

    def __init__(self, estimator, base):
        self.estimator, self.base = estimator, base

    def step(self, closure):
        loss = self.estimator.estimate(closure, self.base.param_groups)
        self.base.step()
        return loss


def _quadratic(dim: int, seed: int, dtype=torch.float64):
    """``f(x) = ½ xᵀAx + bᵀx`` with ``A`` symmetric positive definite; returns ``(A, b)``."""
    generator = torch.Generator().manual_seed(seed)
    m = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    a = m @ m.T / dim + torch.eye(dim, dtype=torch.float64)
    b = torch.randn(dim, generator=generator, dtype=torch.float64)
    return a.to(dtype), b.to(dtype)


def _two_params(seed: int = 0, dtype=torch.float64):
    """Parameters of two shapes, so that the estimate couples separate tensors."""
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(6, generator=generator, dtype=dtype).requires_grad_(),
        torch.randn(2, 2, generator=generator, dtype=dtype).requires_grad_(),
    ]


def _flat(params):
    return torch.cat([p.reshape(-1) for p in params])


def _bonferroni_z(count: int, family_error: float = 1e-6) -> float:
    """Two-sided critical |z| so that ``count`` checks all pass with probability 1 - error."""
    return NormalDist().inv_cdf(1.0 - family_error / (2.0 * count))


# -- the estimate is unbiased -----------------------------------------------------------------


def _max_z_of_mean(estimates, true, variance):
    """max over coordinates of ``|mean − true| / sqrt(variance / N)``."""
    n = estimates.shape[0]
    return ((estimates.mean(0) - true).abs() / (variance / n).sqrt()).max().item()


@pytest.mark.parametrize(("distribution", "samples"), [("rademacher", 1), ("gaussian", 1),
                                                       ("rademacher", 3), ("gaussian", 2)])
def test_estimate_is_unbiased_for_a_quadratic(distribution, samples):
    """The mean of N estimates matches ∇f within a bound from the estimator's variance.

    For a quadratic the central difference is exact, so ``ĝ = (1/n) Σ Δ_s Δ_sᵀ ∇f``. With
    ``E[ΔΔᵀ] = I`` it is unbiased, with per-coordinate variance ``(‖∇f‖² − ∇ᵢ²)/n``
    (Rademacher, ``Δᵢ² = 1``) or ``(‖∇f‖² + ∇ᵢ²)/n`` (Gaussian, ``E Δᵢ⁴ = 3``). The mean over
    N estimates is then within ``z·sqrt(var/N)`` of ``∇f`` for every coordinate, with ``z`` the
    Bonferroni bound for a family error of 1e-6 (the seeds are fixed: the test is
    deterministic). The same statistic rejects an estimate that is off by the factor 2 of
    the central difference, so the check has power. The sample variance is checked against
    the formula too, within ``z`` standard errors estimated from the fourth moment, and
    the other distribution's variance is rejected.
    """
    params = _two_params()
    dim = sum(p.numel() for p in params)
    a, b = _quadratic(dim, seed=1)

    def loss():
        x = _flat(params)
        return 0.5 * x @ a @ x + b @ x

    spsa = SPSA(perturbation=1e-2, samples=samples, distribution=distribution, seed=7, chunk=5)
    groups = [{"params": params}]
    true = a @ _flat(params).detach() + b
    n = 1000
    estimates = torch.empty(n, dim, dtype=torch.float64)
    for i in range(n):
        spsa.estimate(loss, groups)
        estimates[i] = _flat([p.grad for p in params])
    sign = -1.0 if distribution == "rademacher" else 1.0
    variance = (true.square().sum() + sign * true.square()) / samples

    z = _bonferroni_z(dim)
    assert _max_z_of_mean(estimates, true, variance) < z
    assert _max_z_of_mean(2.0 * estimates, true, variance) > z, "the check has no power"

    centred = estimates - estimates.mean(0)
    sample_var = centred.square().mean(0)
    fourth = centred.pow(4).mean(0)
    standard_error = ((fourth - sample_var.square()) / n).sqrt()
    assert ((sample_var - variance).abs() / standard_error).max().item() < z
    other = (true.square().sum() - sign * true.square()) / samples  # the other distribution's
    assert ((sample_var - other).abs() / standard_error).max().item() > z, "no power"


def test_estimate_of_a_linear_loss_is_rank_one_and_exact():
    """``f = bᵀθ`` gives exactly ``ĝ = Δ(Δᵀb)`` with ``Δ = ±sign(ĝ)`` (float64 reference)."""
    params = _two_params()
    dim = sum(p.numel() for p in params)
    _, b = _quadratic(dim, seed=2)
    spsa = SPSA(perturbation=2.0**-8, seed=3)
    for _ in range(5):
        spsa.estimate(lambda: b @ _flat(params), [{"params": params}])
        g = _flat([p.grad for p in params])
        delta = torch.sign(g)
        assert delta.abs().min() == 1.0
        torch.testing.assert_close(g, delta * (delta @ b), rtol=1e-9, atol=0.0)


@pytest.mark.parametrize("samples", [1, 3], ids=["one-sample", "three-samples"])
def test_returned_loss_is_the_mean_of_the_two_evaluations(samples):
    """For ``f = ½Σλᵢθᵢ²`` and Rademacher Δ: ``(f₊+f₋)/2 = f(θ) + (c²/2)·Σλᵢ`` exactly.

    Both paths (``samples == 1`` keeps Δ in ``p.grad``; ``samples > 1`` regenerates it), by
    ``estimate`` and through the explored optimizer's ``step``. Mutation caught: the
    one-sample path returning ``f₊`` (or ``f₋``) instead of ``(f₊+f₋)/2`` — they differ
    from the reference by ``±c·Δᵀ∇f`` (about 1e-2 here, against rtol 1e-12).
    """
    theta = torch.linspace(-1.0, 1.0, 9, dtype=torch.float64).requires_grad_()
    lam = torch.arange(1.0, 10.0, dtype=torch.float64)
    c = 1e-2
    spsa = SPSA(perturbation=c, samples=samples, seed=0)

    def loss():
        return 0.5 * (lam * theta * theta).sum()

    with torch.no_grad():
        expected = loss() + 0.5 * c * c * lam.sum()
    returned = spsa.estimate(loss, [{"params": [theta]}])
    assert isinstance(returned, torch.Tensor) and returned.dim() == 0
    torch.testing.assert_close(returned, expected, rtol=1e-12, atol=0.0)
    as_float = spsa.estimate(lambda: loss().item(), [{"params": [theta]}])
    assert isinstance(as_float, float)
    assert math.isclose(as_float, expected.item(), rel_tol=1e-12)

    # through explore(...).step: the loss of θ before the base moves it
    optimizer = explore(
        SPSA(perturbation=c, samples=samples, seed=1), torch.optim.SGD([theta], lr=0.1),
        alpha=0.5, beta=0.01,
    )
    with torch.no_grad():
        expected = loss() + 0.5 * c * c * lam.sum()
    torch.testing.assert_close(optimizer.step(loss), expected, rtol=1e-12, atol=0.0)


# -- convergence ------------------------------------------------------------------------------


def _replacement_noise_gain(alpha: float, beta: float) -> float:
    """``Σ wⱼ²`` of the filter ``g̃ = Σ wⱼ g_{k−j}``: how much E amplifies white noise.

    ``w₀ = 1 + α·s`` and ``wⱼ = −α·s²·β^{j−1}`` for ``j ≥ 1`` (``s = 1−β``; ``Σ wⱼ = 1``).
    """
    s = 1.0 - beta
    return (1.0 + alpha * s) ** 2 + alpha**2 * s**4 / (1.0 - beta**2)


@pytest.mark.parametrize(
    "adaptor", [None, (-5.0, 0.99), (0.5, 0.01)], ids=["SGD", "E(SGD)-large-batch",
                                                      "E(SGD)-small-batch"]
)
@settings(max_examples=3, deadline=None)
@given(
    dim=st.integers(10, 100),
    condition=st.floats(1.0, 2.0),
    seed=st.integers(0, 2**16),
)
def test_spsa_sgd_reduces_a_convex_quadratic_100_fold(adaptor, dim, condition, seed):
    """SPSA-SGD, with and without E, divides ``f − f*`` by 100 within a fixed budget.

    With Rademacher Δ, ``E ĝ = ∇f`` and ``E‖ĝ‖² = d‖∇f‖²``. For ``f = ½ eᵀAe`` with
    eigenvalues in ``[μ, L]`` and ``η = 1/(L(d+2))`` one step gives
    ``E f⁺ ≤ f − η‖∇f‖²/2 ≤ (1 − 1/(κ(d+2)))·f``, so after
    ``K = 3·ln(100)·κ(d+2)`` steps ``E f_K ≤ 10⁻⁶ f₀`` and, by Markov, ``f_K ≤ f₀/100``
    fails with probability ≤ 1e-4. Under E the same budget is used with η divided (and K
    multiplied) by ``max(1, Σwⱼ²)``, the replacement's white-noise gain; that part is a
    heuristic (the replacement also delays the signal) which the test checks empirically.
    """
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    eigenvalues = torch.linspace(1.0, condition, dim, dtype=torch.float64)
    a = ((q * eigenvalues) @ q.T).float()
    optimum = torch.randn(dim, generator=generator)
    x = (optimum + torch.randn(dim, generator=generator)).requires_grad_()

    def loss():
        e = x - optimum
        return 0.5 * e @ (a @ e)

    gain = 1.0 if adaptor is None else max(1.0, _replacement_noise_gain(*adaptor))
    lr = 1.0 / (condition * (dim + 2) * gain)
    budget = math.ceil(3.0 * math.log(100.0) * condition * (dim + 2) * gain)
    spsa = SPSA(perturbation=1e-3, seed=seed)
    sgd = torch.optim.SGD([x], lr=lr)
    if adaptor is None:
        optimizer = SPSAThenBase(spsa, sgd)
    else:
        optimizer = explore(spsa, sgd, alpha=adaptor[0], beta=adaptor[1])
    with torch.no_grad():
        start = loss().item()
    for _ in range(budget):
        optimizer.step(loss)
    with torch.no_grad():
        end = loss().item()
    assert end <= start / 100.0, (start, end, budget)


def test_spsa_adam_lowers_the_training_loss_of_a_small_mlp():
    """SPSA-Adam (under E with α = 0.5, β = 0.01) on 4 Gaussian blobs, a 2-32-4 MLP (228 params).

    Chance level is ln 4 ≈ 1.39; after 300 steps the training loss must be at most half its
    start (observed: about a fifth) and above-chance accuracy must follow.
    """
    generator = torch.Generator().manual_seed(0)
    centers = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    labels = torch.randint(0, 4, (256,), generator=generator)
    inputs = centers[labels] + 0.7 * torch.randn(256, 2, generator=generator)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 4))

    def loss():
        return nn.functional.cross_entropy(model(inputs), labels)

    optimizer = explore(
        SPSA(perturbation=1e-3, seed=0), torch.optim.Adam(model.parameters(), lr=1e-2),
        alpha=0.5, beta=0.01,
    )
    with torch.no_grad():
        start = loss().item()
    for _ in range(300):
        optimizer.step(loss)
    with torch.no_grad():
        end = loss().item()
        accuracy = (model(inputs).argmax(1) == labels).float().mean().item()
    assert end <= 0.5 * start, (start, end)
    assert accuracy > 0.5


# -- memory -----------------------------------------------------------------------------------


class AllocationRecorder(TorchDispatchMode):
    """Records the element count of every new storage an op creates (views and in-place ops
    return existing storages and are not counted) in ``new``, and in ``scratch`` the bytes of
    those of an integer dtype (the packed signs and their unpacked bits). ``paused`` skips
    ops (the closure's)."""

    def __init__(self, existing):
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in existing}
        self.new: list[int] = []
        self.scratch: list[int] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    ptr = t.untyped_storage().data_ptr()
                    if ptr not in self.known:
                        self.known.add(ptr)
                        if t.is_floating_point():
                            self.new.append(t.untyped_storage().nbytes() // t.element_size())
                        else:
                            self.scratch.append(t.untyped_storage().nbytes())
        return out


def _memory_problem():
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=generator).requires_grad_() for s in [(64, 32), (32,),
                                                                              (10, 64), (10,)]]
    targets = [torch.randn(p.shape, generator=generator) for p in params]
    return params, targets


def _recorded_step(step, params, targets, recorders=None):
    existing = [*params, *targets, *(p.grad for p in params if p.grad is not None)]
    recorder = AllocationRecorder(existing)
    if recorders is not None:
        recorders.append(recorder)

    def closure():  # the forward pass is the user's; it is not counted
        recorder.paused = True
        try:
            return sum(((p - t) ** 2).sum() for p, t in zip(params, targets))
        finally:
            recorder.paused = False

    with recorder:
        step(closure)
    return recorder.new


def test_one_sample_step_allocates_nothing_but_the_gradients():
    """Floating-point allocations: the gradients on the first step, nothing after. Integer
    scratch: the packed words and unpacked bits of one block, one byte per element at most
    (``chunk = 256`` here: the 2048-element parameter goes through 8 blocks)."""
    params, targets = _memory_problem()
    chunk = 256
    spsa = SPSA(seed=0, chunk=chunk)

    def estimate(closure):
        spsa.estimate(closure, [{"params": params}])

    first = _recorded_step(estimate, params, targets)
    big = sorted(n for n in first if n > 1)
    assert big == sorted(p.numel() for p in params), "the first step allocates the grads"
    recorders = []
    steady = _recorded_step(estimate, params, targets, recorders)
    assert max(steady, default=0) <= 1, f"steady-state step allocated {steady}"
    assert 0 < max(recorders[0].scratch) <= chunk, f"integer scratch {recorders[0].scratch}"

    # the whole explored step (replacement and SGD in place) allocates nothing either
    optimizer = explore(SPSA(seed=0), torch.optim.SGD(params, lr=1e-3), alpha=0.5, beta=0.01)
    optimizer.step(lambda: sum(((p - t) ** 2).sum() for p, t in zip(params, targets)))
    steady = _recorded_step(optimizer.step, params, targets)
    assert max(steady, default=0) <= 1, f"steady-state explored step allocated {steady}"


def test_several_samples_use_one_block_sized_scratch():
    params, targets = _memory_problem()
    chunk = 48
    spsa = SPSA(samples=3, seed=0, chunk=chunk)

    def estimate(closure):
        spsa.estimate(closure, [{"params": params}])

    _recorded_step(estimate, params, targets)
    recorders = []
    steady = _recorded_step(estimate, params, targets, recorders)
    assert max(steady) == chunk, f"scratch sizes {steady}"
    assert all(n <= chunk for n in steady)
    # the unpacked bits: one byte per element of a block, rounded up to whole 64-bit words
    assert max(recorders[0].scratch) <= 64 * -(-chunk // 64), recorders[0].scratch


# -- round-off, devices, resume, errors -------------------------------------------------------


def test_restore_drift_is_within_the_documented_bound():
    """``|θ' − θ| ≤ u·(3|θ| + 2c|Δ|)`` per sample (float32, Rademacher ``|Δ| = 1``).

    Values span 2⁻³⁰ to 2⁶, so some lose low bits in ``θ + c``: the drift is not zero (the
    docs say a power-of-two ``c`` is not exact in general), but it is within the bound.
    """
    generator = torch.Generator().manual_seed(0)
    magnitudes = torch.exp2(torch.empty(4096).uniform_(-30, 6, generator=generator))
    signs = torch.randint(0, 2, (4096,), generator=generator) * 2.0 - 1.0
    theta = (magnitudes * signs).float().requires_grad_()
    start = theta.detach().clone()
    c = 2.0**-10
    u = 2.0**-24
    for samples in (1, 2):
        before = theta.detach().clone()
        SPSA(perturbation=c, samples=samples, seed=samples).estimate(
            lambda: theta.sum(), [{"params": [theta]}]
        )
        bound = samples * u * (3 * before.abs() + 2 * c) * (1 + 1e-5)
        assert ((theta.detach() - before).abs() <= bound).all()
    assert not torch.equal(theta.detach(), start), "expected some round-off drift"


@pytest.mark.parametrize(("distribution", "samples", "dtype"), [
    ("rademacher", 1, torch.float32), ("gaussian", 3, torch.float32),
    ("rademacher", 2, torch.bfloat16),  # the low-precision path (saved copy, realized steps)
])
def test_step_on_meta_device_with_both_paths(distribution, samples, dtype):
    params = [torch.empty(5, 4, device="meta", requires_grad=True, dtype=dtype),
              torch.empty(7, device="meta", requires_grad=True)]
    optimizer = explore(
        SPSA(distribution=distribution, samples=samples, chunk=6),
        torch.optim.Adam(params, lr=1e-3),
    )
    for _ in range(2):
        loss = optimizer.step(lambda: sum((p * p).sum() for p in params))
    assert loss.device.type == "meta"
    assert all(p.grad.device.type == "meta" for p in params)


def test_non_contiguous_parameters_match_their_contiguous_twins():
    base = torch.randn(8, 6, dtype=torch.float64)
    contiguous = base.t().contiguous().requires_grad_()
    strided = base.clone().t().requires_grad_()  # same values, transposed strides
    assert not strided.is_contiguous()
    for samples in (1, 2):
        grads = []
        for p in (contiguous, strided):
            spsa = SPSA(samples=samples, seed=5, chunk=7)
            # .contiguous(): the same summation order for both layouts
            spsa.estimate(
                lambda p=p: (p.contiguous().sin() * torch.arange(48.0).view(6, 8)).sum(),
                [{"params": [p]}],
            )
            grads.append(p.grad.clone())
        assert torch.equal(grads[0], grads[1])
        assert torch.equal(contiguous.detach(), strided.detach())


def test_resume_of_the_estimator_is_bit_exact_and_seed_none_follows_torch_seed():
    torch.manual_seed(123)
    first = SPSA(samples=2, distribution="gaussian")
    torch.manual_seed(123)
    assert SPSA().seed == first.seed

    params = _two_params(dtype=torch.float32)

    def closure(ps):
        return lambda: sum((p.cos() * (1 + i)).sum() for i, p in enumerate(ps))

    first.estimate(closure(params), [{"params": params}])
    saved = copy.deepcopy(first.state_dict())
    twin = [p.detach().clone().requires_grad_() for p in params]
    assert saved == {"seed": first.seed, "step": 1}
    first.estimate(closure(params), [{"params": params}])

    resumed = SPSA(samples=2, distribution="gaussian", seed=999)
    resumed.load_state_dict(saved)
    resumed.estimate(closure(twin), [{"params": twin}])
    for p, q in zip(params, twin):
        assert torch.equal(p.grad, q.grad)


def test_frozen_parameter_keeps_its_value_and_no_grad():
    params = _two_params()
    params[1].requires_grad_(False)
    frozen = params[1].detach().clone()
    SPSA(seed=0).estimate(lambda: sum((p * p).sum() for p in params), [{"params": params}])
    assert params[1].grad is None
    assert torch.equal(params[1], frozen)
    assert params[0].grad is not None


@pytest.mark.parametrize(
    ("kwargs", "exception", "match"),
    [
        ({"perturbation": -1.0}, ValueError, r"perturbation must satisfy 0 < c < inf"),
        ({"perturbation": float("inf")}, ValueError, r"perturbation must satisfy 0 < c < inf"),
        ({"perturbation": "small"}, TypeError, r"perturbation must be a real number c > 0"),
        ({"samples": True}, ValueError, r"samples must be an integer >= 1"),
        ({"distribution": "Gaussian"}, ValueError, r"distribution must be one of"),
        ({"seed": 1.5}, TypeError, r"seed must be an integer or None"),
        ({"chunk": 0}, ValueError, r"chunk must be an integer >= 1"),
    ],
)
def test_invalid_arguments_name_the_argument_and_range(kwargs, exception, match):
    with pytest.raises(exception, match=match):
        SPSA(**kwargs)


def test_bad_closures_and_parameters_raise_clear_errors():
    params = _two_params()
    groups = [{"params": params}]
    spsa = SPSA(seed=0)
    with pytest.raises(ValueError, match="SPSA needs a closure"):
        spsa.estimate(None, groups)
    with pytest.raises(ValueError, match="needs a closure"):
        explore(spsa, torch.optim.SGD(params, lr=1e-3)).step()
    with pytest.raises(ValueError, match="scalar loss"):
        spsa.estimate(lambda: params[0] * 2, groups)
    with pytest.raises(TypeError, match="must return the loss"):
        spsa.estimate(lambda: None, groups)
    complex_param = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(TypeError, match="real floating-point parameters"):
        spsa.estimate(lambda: 0.0, [{"params": [complex_param]}])
    with pytest.raises(ValueError, match=r"keys \['seed', 'step'\]"):
        spsa.load_state_dict({"seed": 1})
    assert spsa.step == 0, "nothing counted by failed calls"


@pytest.mark.parametrize("samples", [1, 2])
def test_a_raising_closure_leaves_the_parameters_restored(samples):
    theta = torch.linspace(-2.0, 2.0, 33).requires_grad_()
    start = theta.detach().clone()
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:  # while θ − cΔ is in place
            raise RuntimeError("data loader failed")
        return theta.square().sum()

    with pytest.raises(RuntimeError, match="data loader failed"):
        SPSA(perturbation=2.0**-7, samples=samples, seed=0).estimate(
            closure, [{"params": [theta]}]
        )
    bound = 2 * 2.0**-24 * (3 * start.abs() + 2 * 2.0**-7)
    assert ((theta.detach() - start).abs() <= bound).all()


# -- copies and pickling ----------------------------------------------------------------------


def _estimates(spsa, params, steps=2):
    """The gradients of ``steps`` estimates on a fixed loss (θ unchanged between them)."""
    out = []
    for _ in range(steps):
        spsa.estimate(lambda: sum((p.sin() * (1 + i)).sum() for i, p in enumerate(params)),
                      [{"params": params}])
        out.append([p.grad.clone() for p in params])
    return out


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("samples", [1, 2])
def test_copies_and_pickles_continue_the_stream_independently(how, samples):
    """A copy (deepcopy or pickle round trip) of a used SPSA draws what the original would
    draw next, and stepping it leaves the original's step counter and generators alone.

    Mutations caught: ``__deepcopy__`` sharing ``_generators`` with the original (``twin``
    ``_generators is spsa._generators``), and ``__getstate__`` resetting ``step`` (the
    copy would redraw step 0's directions).
    """
    import pickle

    params = _two_params(dtype=torch.float32)
    spsa = SPSA(samples=samples, distribution="gaussian", seed=11, chunk=5)
    _estimates(spsa, params, steps=1)
    twin = copy.deepcopy(spsa) if how == "deepcopy" else pickle.loads(pickle.dumps(spsa))
    assert twin is not spsa and twin.step == spsa.step == 1 and twin.seed == spsa.seed
    assert repr(twin) == repr(spsa)
    assert twin._generators is not spsa._generators and not twin._generators
    twin_params = [p.detach().clone().requires_grad_() for p in params]
    from_twin = _estimates(twin, twin_params, steps=2)
    assert spsa.step == 1, "stepping the copy moved the original's counter"
    from_original = _estimates(spsa, params, steps=2)
    for mine, theirs in zip(from_original, from_twin):
        for a, b in zip(mine, theirs):
            assert torch.equal(a, b)
    assert twin.step == spsa.step == 3


def test_explored_spsa_deepcopies_with_an_independent_estimator():
    """``copy.deepcopy(explore(SPSA, SGD))`` steps its own parameters with its own estimator."""
    params = _two_params(dtype=torch.float32)
    optimizer = explore(SPSA(seed=3), torch.optim.SGD(params, lr=0.1), alpha=0.5, beta=0.01)

    def closure_for(ps):
        return lambda: sum((p.cos() * (1 + i)).sum() for i, p in enumerate(ps))

    optimizer.step(closure_for(params))
    twin = copy.deepcopy(optimizer)
    twin_params = twin.param_groups[0]["params"]
    assert all(a is not b for a, b in zip(params, twin_params))
    before = [p.detach().clone() for p in params]
    twin.step(closure_for(twin_params))
    assert all(torch.equal(a, b) for a, b in zip(params, before)), "copy moved the original"
    optimizer.step(closure_for(params))
    for a, b in zip(params, twin_params):
        assert torch.equal(a, b)


def test_process_group_argument_is_validated():
    """Validation of ``process_group``: a non-group is a TypeError naming the argument."""
    with pytest.raises(TypeError, match="SPSA process_group must be None"):
        SPSA(process_group="world")
    assert SPSA(process_group=False).process_group is False


# -- bf16 / fp16 parameters ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "coarse_range", "fine_range"),
    [(torch.bfloat16, (0.25, 0.5), (1 / 16, 1 / 8)), (torch.float16, (2.0, 4.0), (0.25, 0.5))],
    ids=["bf16", "fp16"],
)
def test_low_precision_estimate_is_unbiased_where_the_format_can_move_and_restores_exactly(
    dtype, coarse_range, fine_range
):
    """bf16/fp16: ``E ĝᵢ = ∇ᵢf`` on coordinates whose perturbation the grid rounds to ≠ 2c.

    ``f = bᵀθ`` (evaluated in float64), Rademacher, ``c = 1e-3``. The test computes the
    realized half-steps ``mᵢ = (rnd(θᵢ+c) − rnd(θᵢ−c))/2`` itself (float64 of the rounded
    values): ``|θ|`` in a coarse binade has ``m = 2⁻⁹ ≈ 1.95c`` (bf16 ``[0.25, 0.5)``, fp16
    ``[2, 4)``), in a fine one ``m = 2⁻¹⁰ ≈ 0.98c``. With ``ĝᵢ = (f₊−f₋)/(2mᵢΔᵢ)`` the
    per-coordinate variance is ``Σ_{j≠i} b_j² m_j²/mᵢ²``; the mean of N estimates must be
    within a Bonferroni bound of ``b``, and the naive estimator's expectation
    ``(mᵢ/c)·bᵢ`` (slope 1.95 on the coarse binade) must be rejected by the regression
    slope over that binade (power). The parameters are restored bit for bit after every
    estimate.

    Mutations caught: dividing by ``2cΔᵢ`` instead of the realized difference (the former
    behaviour: slope 1.95 on the coarse binade), restoring with ``θ += cΔ`` instead of the
    saved copy (the parameters drift).
    """
    generator = torch.Generator().manual_seed(0)
    coarse = torch.empty(96, dtype=torch.float64).uniform_(*coarse_range, generator=generator)
    fine = torch.empty(96, dtype=torch.float64).uniform_(*fine_range, generator=generator)
    signs = torch.randint(0, 2, (192,), generator=generator) * 2.0 - 1.0
    theta = (torch.cat([coarse, fine]) * signs).to(dtype).requires_grad_()
    start = theta.detach().clone()
    b = torch.randn(192, generator=generator, dtype=torch.float64)
    c = 1e-3
    t64 = start.double()
    half_step = ((t64 + c).to(dtype).double() - (t64 - c).to(dtype).double()) / 2.0
    assert (half_step > 0).all()
    spsa = SPSA(perturbation=c, seed=4)
    n = 600
    total = torch.zeros(192, dtype=torch.float64)
    for _ in range(n):
        spsa.estimate(lambda: (theta.double() * b).sum(), [{"params": [theta]}])
        assert torch.equal(theta.detach(), start), "the parameters were not restored exactly"
        assert theta.grad.dtype == dtype
        total += theta.grad.double()
    mean = total / n
    variance = ((b * half_step).square().sum() - (b * half_step).square()) / half_step.square()
    z = _bonferroni_z(192)
    # the estimate is written to p.grad in the parameter's dtype: allow its rounding
    rounding = 2.0 ** -(8 if dtype == torch.bfloat16 else 11) * (mean.abs() + b.abs())
    scores = ((mean - b).abs() - rounding).clamp_min(0) / (variance / n).sqrt()
    assert scores.max().item() < z
    # slope of the mean estimate on b over the coarse binade: 1 here, m/c ≈ 1.95 if naive
    bc, mc, vc = b[:96], mean[:96], variance[:96] / n
    slope = (mc * bc).sum() / bc.square().sum()
    slope_error = (bc.square() * vc).sum().sqrt() / bc.square().sum()
    naive_slope = (half_step[:96] / c).mean()
    assert naive_slope > 1.9
    assert abs(slope - 1.0) < 4 * slope_error + 2e-3, (slope, slope_error)
    assert abs(slope - naive_slope) > 10 * slope_error, "the check has no power"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("distribution", "samples"), [("rademacher", 1), ("gaussian", 2)])
def test_exact_restore_leaves_float_parameters_bit_identical(dtype, distribution, samples):
    """``exact_restore=True``: after every estimate the parameters are the same bits (the
    in-place walk of the default drifts by an ulp here), and the estimate is the usual one
    to rounding (float64 reference: ``(f₊−f₋)/(2c)·Δ`` for a linear loss is ``Δ(Δᵀb)``).

    Mutation caught: ``p.copy_(theta.float().add_(delta, ...))`` — ``.float()`` of a float32
    tensor is the tensor itself, so the saved copy was overwritten and the "restore" wrote
    ``θ + cΔ − cΔ`` back (found by the generic skipped-step test).
    """
    generator = torch.Generator().manual_seed(3)
    magnitudes = torch.exp2(torch.empty(256).uniform_(-12, 3, generator=generator))
    theta = (magnitudes * torch.randn(256, generator=generator).sign()).to(dtype)
    theta.requires_grad_()
    start = theta.detach().clone()
    b = torch.randn(256, generator=generator, dtype=torch.float64)
    exact = SPSA(perturbation=1e-3, samples=samples, distribution=distribution, seed=2,
                 exact_restore=True)
    walk = SPSA(perturbation=1e-3, samples=samples, distribution=distribution, seed=2)
    twin = start.clone().requires_grad_()
    drifted = False
    for _ in range(5):
        exact.estimate(lambda: (theta.double() * b).sum(), [{"params": [theta]}])
        assert torch.equal(theta.detach(), start)
        walk.estimate(lambda: (twin.double() * b).sum(), [{"params": [twin]}])
        drifted |= not torch.equal(twin.detach(), start)
        rtol = 1e-4 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(theta.grad, twin.grad, rtol=rtol, atol=rtol * b.abs().sum())
    assert drifted, "the in-place walk was expected to drift on these values"


def test_exact_restore_packs_mixed_dtypes_blocks_and_strides():
    """The copy path over bf16, fp16 and float32 parameters (one non-contiguous), packed in
    packs of ``chunk = 7`` elements with a parameter larger than a pack, against a float64
    reference: for ``f = bᵀθ`` and Rademacher Δ, ``f₊ − f₋ = S = Σⱼ bⱼΔⱼmⱼ`` with
    ``mⱼ = rnd(θⱼ+c) − rnd(θⱼ−c)`` (computed here), and ``ĝᵢ = S/(Δᵢmᵢ)``. The test reads
    ``Δᵢ = sign(ĝᵢ)·sign(S)`` from the estimate, rebuilds ``S`` and checks every coordinate.
    Mutations caught: the estimate shifted by one element within a pack
    (``torch.roll(estimate, 1)`` before the copy into the gradients), the first pack's
    restore skipped (parameters not bit-identical)."""
    generator = torch.Generator().manual_seed(7)
    shapes_dtypes = [((4, 5), torch.bfloat16), ((3,), torch.float32), ((6,), torch.float16),
                     ((2, 2), torch.float32)]
    params = []
    for shape, dtype in shapes_dtypes:
        values = torch.empty(shape, dtype=torch.float64).uniform_(0.3, 3.0, generator=generator)
        params.append(values.to(dtype))
    params[3] = params[3].t().contiguous().t()  # non-contiguous
    assert not params[3].is_contiguous()
    for p in params:
        p.requires_grad_()
    start = [p.detach().clone() for p in params]
    bs = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in params]
    c = 2e-3
    spsa = SPSA(perturbation=c, seed=1, chunk=7)

    def loss():
        return sum((p.double() * b).sum() for p, b in zip(params, bs))

    for _ in range(3):
        spsa.estimate(loss, [{"params": params}])
        for p, s in zip(params, start):
            assert torch.equal(p.detach(), s) and p.grad.dtype == p.dtype
        g = torch.cat([p.grad.double().reshape(-1) for p in params])
        m = torch.cat([((s.double() + c).to(s.dtype).double()
                        - (s.double() - c).to(s.dtype).double()).reshape(-1) for s in start])
        b = torch.cat([b.reshape(-1) for b in bs])
        signs = torch.sign(g)  # = Δ·sign(S)
        total = (b * signs * m).sum()  # = S·sign(S) = |S|
        expected = total / (signs * m)  # |S|/(Δᵢ·sign(S)·mᵢ) = S/(Δᵢmᵢ) = ĝᵢ
        rounding = torch.cat([torch.full((p.numel(),), 2.0 ** -(8 if p.dtype == torch.bfloat16
                              else 11 if p.dtype == torch.float16 else 24)) for p in params])
        assert ((g - expected).abs() <= 2 * rounding * expected.abs()).all()
