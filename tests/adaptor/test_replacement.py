"""The one-buffer in-place replacement against the paper's two-buffer form (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import adaptor.replacement as replacement
from adaptor import E, check_alpha_beta
from adaptor.replacement import FUSED_MIN_NUMEL, chunks, replace_foreach_, replace_fused_
from tests.adaptor.reference import TwoBufferReference, relative_error

SHAPES = [(5, 3), (7,), (2, 3, 2), ()]
STEPS = 100
TOLERANCE = 1e-10


@st.composite
def admissible(draw) -> tuple[float, float]:
    """(α, β) with 0 <= β < 1 and |α| < 1/(1-β), anywhere in that range (edges included)."""
    beta = draw(st.floats(0.0, 1.0, exclude_max=True))
    bound = 1.0 / (1.0 - beta)
    alpha = draw(st.floats(-bound, bound, exclude_min=True, exclude_max=True))
    return check_alpha_beta(alpha, beta)


def _gradients(seed: int, shapes, steps: int, device, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        # A drifting mean plus noise: consecutive gradients are correlated, as in training.
        yield [
            (torch.randn(shape, generator=generator, dtype=dtype) * 0.5 + 1.0).to(device)
            for shape in shapes
        ]


def _near_bound(beta: float, gap: float) -> tuple[float, float]:
    """α at relative distance ``gap`` inside the negative bound -1/(1-β) (1 + α(1-β) = gap)."""
    return -(1.0 - gap) / (1.0 - beta), beta


@given(hp=admissible(), seed=st.integers(0, 2**16))
@example(hp=(-5.0, 0.99), seed=0)  # the paper's large-batch defaults
@example(hp=(0.5, 0.01), seed=1)  # the paper's small-batch defaults
@example(hp=(0.0, 0.5), seed=2)
@example(hp=(-0.999, 0.0), seed=3)  # β = 0: a_k = g_k - g_{k-1}
@example(hp=_near_bound(0.99, 1e-12), seed=4)  # 1 + α(1-β) = 1e-12
@example(hp=_near_bound(0.0, 1e-9), seed=5)
@example(hp=_near_bound(1e-12, 1e-12), seed=6)
@example(hp=(99.99, 0.99), seed=7)  # near the positive bound
@example(hp=(-0.5e15, 1.0 - 2.0**-52), seed=8)  # β as close to 1 as float64 allows
def test_replace_foreach_equals_the_two_buffer_form(hp, seed):
    alpha, beta = hp
    buffers = [torch.zeros(shape, dtype=torch.float64) for shape in SHAPES]
    references = [TwoBufferReference() for _ in SHAPES]
    for step, grads in enumerate(_gradients(seed, SHAPES, STEPS, "cpu")):
        originals = [g.clone() for g in grads]
        replace_foreach_(grads, buffers, alpha, beta)
        for i, (g_tilde, g, reference) in enumerate(zip(grads, originals, references)):
            expected = reference(g, alpha, beta)
            error = relative_error(g_tilde, expected, reference.scale(g, alpha))
            assert error <= TOLERANCE, f"step {step}, tensor {i}: relative error {error:.3g}"
        assert all(c.dtype == torch.float64 and c.shape == g.shape for c, g in zip(buffers, grads))


@given(
    schedule=st.lists(admissible(), min_size=2, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_replace_foreach_with_scheduled_alpha_and_beta(schedule, seed):
    """α and β changing every 20 steps: β's change acts on the buffer formed under the old β."""
    buffers = [torch.zeros(shape, dtype=torch.float64) for shape in SHAPES]
    references = [TwoBufferReference() for _ in SHAPES]
    for step, grads in enumerate(_gradients(seed, SHAPES, 20 * len(schedule), "cpu")):
        alpha, beta = schedule[step // 20]
        originals = [g.clone() for g in grads]
        replace_foreach_(grads, buffers, alpha, beta)
        for i, (g_tilde, g, reference) in enumerate(zip(grads, originals, references)):
            expected = reference(g, alpha, beta)
            error = relative_error(g_tilde, expected, reference.scale(g, alpha))
            assert error <= TOLERANCE, f"step {step}, tensor {i}: relative error {error:.3g}"


def test_reference_detects_a_wrong_replacement():
    """The comparison can fail: the paper's form with a_1 = 0 (the reference code's toy hack)."""
    alpha, beta = -5.0, 0.9
    reference = TwoBufferReference()
    g1 = torch.ones(3, dtype=torch.float64)
    expected = reference(g1, alpha, beta)  # a_1 = (1-β)·g_1, so g̃_1 = (1 + α(1-β))·g_1
    torch.testing.assert_close(expected, 0.5 * g1, rtol=0, atol=1e-15)
    assert relative_error(g1, expected, reference.scale(g1, alpha)) > TOLERANCE


@settings(max_examples=10)
@given(hp=admissible(), seed=st.integers(0, 2**16))
def test_explored_sgd_feeds_the_two_buffer_form_to_the_base(hp, seed):
    """E over SGD(lr=1): θ_{k+1} = θ_k - g̃_k, and p.grad holds g̃_k after the step."""
    alpha, beta = hp
    other_alpha, other_beta = 0.25, 0.3  # a second group with its own α, β
    thetas = [torch.zeros(shape, dtype=torch.float64, requires_grad=True) for shape in SHAPES]
    groups = [
        {"params": thetas[:2], "explore_alpha": alpha, "explore_beta": beta},
        {"params": thetas[2:], "explore_alpha": other_alpha, "explore_beta": other_beta},
    ]
    optimizer = E(torch.optim.SGD(groups, lr=1.0), alpha=0.0, beta=0.0)
    references = [TwoBufferReference() for _ in SHAPES]
    expected_theta = [torch.zeros(shape, dtype=torch.float64) for shape in SHAPES]
    for step, grads in enumerate(_gradients(seed, SHAPES, STEPS, "cpu")):
        for p, g in zip(thetas, grads):
            p.grad = g.clone()
        optimizer.step()
        for i, (p, g, reference) in enumerate(zip(thetas, grads, references)):
            a, b = (alpha, beta) if i < 2 else (other_alpha, other_beta)
            expected = reference(g, a, b)
            scale = reference.scale(g, a)
            error = relative_error(p.grad, expected, scale)
            assert error <= TOLERANCE, f"step {step}, grad {i}: relative error {error:.3g}"
            expected_theta[i] -= expected
        for i, (p, t) in enumerate(zip(thetas, expected_theta)):
            # Sums of STEPS terms: compare against the accumulated size of the terms.
            error = relative_error(p, t, 1.0 + float(t.norm()))
            assert error <= 1e-8, f"step {step}, θ {i}: relative error {error:.3g}"


# -- the compiled kernel -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_replace_fused_equals_the_foreach_path(dtype, monkeypatch):
    """Every tensor through the compiled kernel (threshold 0) equals the foreach path.

    α changes mid-run (the kernel takes it as an argument, not a compile-time constant),
    and the tensors have different shapes and ranks (one kernel, dynamic shapes).
    """
    monkeypatch.setattr(replacement, "FUSED_MIN_NUMEL", 0)
    shapes = [(33, 7), (5,), (4, 3, 2), (6, 6), (9,)]  # a group of four, then one
    fused_buffers = [torch.zeros(shape, dtype=dtype) for shape in shapes]
    foreach_buffers = [torch.zeros(shape, dtype=dtype) for shape in shapes]
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-13}
    schedule = [(-5.0, 0.99)] * 4 + [(0.7, 0.99)] * 3 + [(-1.5, 0.5)] * 3
    for step, grads in enumerate(_gradients(7, shapes, len(schedule), "cpu", dtype)):
        alpha, beta = schedule[step]
        fused_grads = [g.clone() for g in grads]
        replace_fused_(fused_grads, fused_buffers, alpha, beta)
        replace_foreach_(grads, foreach_buffers, alpha, beta)
        for i in range(len(shapes)):
            torch.testing.assert_close(fused_grads[i], grads[i], **tol, msg=f"step {step} g {i}")
            torch.testing.assert_close(
                fused_buffers[i], foreach_buffers[i], **tol, msg=f"step {step} c {i}"
            )
        assert not torch.equal(fused_grads[0], grads[0] * 0), "the kernel must write g̃"


def test_replace_fused_keeps_small_tensors_on_the_foreach_path(monkeypatch):
    """Below FUSED_MIN_NUMEL no kernel is built or called, and the result is still right."""
    calls = []
    monkeypatch.setattr(replacement, "_kernel", lambda *args: calls.append(1) or _no_kernel)
    grads = [torch.randn(4, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)]
    buffers = [torch.zeros_like(g) for g in grads]
    expected = [TwoBufferReference()(g, -5.0, 0.99) for g in grads]
    replace_fused_(grads, buffers, -5.0, 0.99)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-14, atol=0)


def _no_kernel(*args):
    raise AssertionError("the compiled kernel must not run for small tensors")


def test_replace_fused_calls_the_kernel_on_flat_views_only(monkeypatch):
    """One compiled kernel per dtype: tensors of every rank reach it as flat views, four
    per call (FUSED_GROUP), the remainder one by one.

    A kernel compiled per rank recompiles for every new rank and, being ``fullgraph``,
    raises once torch's recompile limit (8) is passed (ranks 0-5 in two dtypes would).
    Non-contiguous tensors take the foreach path. Near the bound (1 + α(1-β) small) the
    kernel is not used at all (see the near-bound examples above).
    """
    seen, groups = [], []

    def recording_kernel(gs, cs, *coefficients):
        seen.extend((g.dim(), c.dim()) for g, c in zip(gs, cs))
        groups.append(len(gs))
        replacement._replace_pointwise_(gs, cs, *coefficients)

    monkeypatch.setattr(replacement, "_kernel", lambda masked, count: recording_kernel)
    monkeypatch.setattr(replacement, "FUSED_MIN_NUMEL", 0)
    shapes = [(), (3,), (3, 2), (2, 3, 2), (2, 1, 2, 3), (1, 2, 1, 2, 2, 1)]
    grads = [torch.randn(shape, dtype=torch.float64) for shape in shapes]
    grads.append(torch.randn(4, 5, dtype=torch.float64).t())  # not contiguous
    buffers = [torch.zeros_like(g) for g in grads]
    expected = [TwoBufferReference()(g, -5.0, 0.99) for g in grads]
    replace_fused_(grads, buffers, -5.0, 0.99)
    # The one-element tensor (shape ()) takes the foreach path: a size-1 view would make
    # the kernel specialise (and recompile) on size 1.
    assert seen == [(1, 1)] * (len(shapes) - 1)
    assert groups == [4, 1]
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-14, atol=1e-15)
    seen.clear()
    replace_fused_(grads, buffers, *_near_bound(0.9, 1e-3))
    assert seen == []


def test_replace_fused_compiles_once_for_every_rank():
    """The compiled kernel itself (not a recording stand-in): tensors of ranks 1 to 4 add one
    graph per dtype pair, not one per rank. Views would not do: dynamo guards a view's base
    (its rank and strides), so the kernel gets flat tensors that are not views."""
    from torch._dynamo.utils import counters

    shapes = [(FUSED_MIN_NUMEL + 1,), (257, 256), (3, 86, 256), (2, 2, 129, 128)]
    generator = torch.Generator().manual_seed(4)
    graphs = []
    for shape in shapes:
        g = torch.randn(shape, generator=generator)
        c = torch.randn(shape, generator=generator)
        expected_g = (1 + 0.5 * 0.1) * g + 0.5 * c  # g̃ = k₁·g + α·c, α = 0.5, β = 0.9
        replace_fused_([g], [c], 0.5, 0.9)
        torch.testing.assert_close(g, expected_g, rtol=1e-6, atol=1e-6)
        graphs.append(counters["stats"]["unique_graphs"])
    assert len(set(graphs)) == 1, graphs


def test_explored_optimizer_fused_equals_foreach(monkeypatch):
    """E(SGD-momentum, fused=True) with the kernel forced on equals fused=False (float64)."""
    monkeypatch.setattr(replacement, "FUSED_MIN_NUMEL", 0)
    runs = {}
    for fused in (True, False):
        params = [torch.ones(shape, dtype=torch.float64, requires_grad=True) for shape in SHAPES]
        optimizer = E(torch.optim.SGD(params, lr=0.1, momentum=0.9), -5.0, 0.99, fused=fused)
        for grads in _gradients(3, SHAPES, 6, "cpu"):
            for p, g in zip(params, grads):
                p.grad = g
            optimizer.step()
        runs[fused] = [p.detach() for p in params]
    for a, b in zip(runs[True], runs[False]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


# -- the bound ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alpha", "beta", "exc", "match"),
    [
        (100.0, 0.99, ValueError, r"\|alpha\| < 1/\(1-beta\) = 100 for beta=0\.99"),
        (-100.0, 0.99, ValueError, r"\|alpha\| < 1/\(1-beta\)"),
        (1.0, 0.0, ValueError, r"\|alpha\| < 1/\(1-beta\) = 1 "),
        (math.nan, 0.5, ValueError, r"\|alpha\| < 1/\(1-beta\)"),
        (math.inf, 0.5, ValueError, r"\|alpha\| < 1/\(1-beta\)"),
        (0.0, 1.0, ValueError, r"0 <= beta < 1"),
        (0.0, -0.1, ValueError, r"0 <= beta < 1"),
        (0.0, math.nan, ValueError, r"0 <= beta < 1"),
        (True, 0.5, TypeError, r"alpha must be a real number"),
        (0.5, torch.tensor(0.5), TypeError, r"beta must be a real number"),
        ("-5", 0.99, TypeError, r"alpha must be a real number"),
    ],
)
def test_check_alpha_beta_names_the_bound(alpha, beta, exc, match):
    with pytest.raises(exc, match=match):
        check_alpha_beta(alpha, beta)


def test_check_alpha_beta_accepts_the_open_range():
    bound = 1.0 / (1.0 - 0.99)
    inside = math.nextafter(bound, 0.0)
    assert check_alpha_beta(-inside, 0.99) == (-inside, 0.99)
    assert check_alpha_beta(math.nextafter(1.0, 0.0), 0) == (math.nextafter(1.0, 0.0), 0.0)
    with pytest.raises(ValueError, match=r"\(param group 3\)"):
        check_alpha_beta(1, 0, where="param group 3")  # |1| < 1/(1-0) fails, and says where
    assert check_alpha_beta(-5, 0.99) == (-5.0, 0.99)
    assert all(type(x) is float for x in check_alpha_beta(-5, 0.99))


def test_chunks_take_each_size_while_it_lasts_then_single_ones():
    """The default is groups of FUSED_GROUP (4) then single ones; Lamb/ALTO's (8, 4) take
    eights, then fours, then single ones (at most three tensor counts per variant)."""
    assert chunks(list(range(6))) == [[0, 1, 2, 3], [4], [5]]
    assert chunks(list(range(11)), (8, 4)) == [list(range(8)), [8], [9], [10]]
    assert chunks(list(range(21)), (8, 4)) == [
        list(range(8)), list(range(8, 16)), [16, 17, 18, 19], [20]
    ]
    assert chunks(list(range(8)), (8, 4)) == [list(range(8))]  # exactly full
    assert chunks(list(range(4))) == [[0, 1, 2, 3]]
    assert chunks([], (8, 4)) == []
