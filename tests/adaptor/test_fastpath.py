"""The fast path (adaptor.fastpath) against the generic path, over the same torch bases.

Fast path: ``E(base, fused=True)``: one compiled kernel per group of large tensors
(FUSED_GROUP = 4 at a time, the rest one by one) does the replacement and torch's
SGD/Adam/AdamW update. Generic path: ``E(base, fused=False)``: the foreach
replacement, then the base's own ``step()``. Both run on identical parameters and gradients
with an LR schedule; parameters and every state tensor must agree to float rounding on
every step. ``p.grad``: g̃ on the generic path (the base reads it from there), the untouched
raw gradient on the fast path (g̃ stays in registers), bit for bit.

Tolerance: inductor fuses and reorders the float arithmetic (FMA contraction, ``lerp``,
bias corrections formed in float64 then rounded), so the paths differ by a few ulps per
step, not bit for bit. float32: rtol 1e-5, atol 1e-6 (observed ≤ 4.8e-7 on parameters of
magnitude up to ~4, i.e. ≤ 2 ulps, over 50 steps); float64: rtol 1e-12, atol 1e-13
(observed ≤ 8.9e-16). The mutations listed in the report (a bias correction dropped, weight
decay applied after the update, the nesterov term dropped, dampening ignored, the sign of
maximize flipped, the step counter not advanced) each move parameters by ≥ 1e-4 relative
within 12 of the 50 steps.

Compiling costs seconds per kernel on CPU: each combination of structural settings
(maximize, weight decay on or off, nesterov, amsgrad, a skip flag) is its own compiled
variant (see adaptor.fastpath._kernel), so the cases below compile about ten, and a
variant compiles again for another dtype.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from adaptor import E, fastpath
from adaptor.precision import SKIPS_KEY
from adaptor.replacement import FUSED_GROUP, FUSED_MIN_NUMEL, kernel_scalars, pack_scalars
from tests.probes import host_read_probe

TOLERANCE = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.float64: {"rtol": 1e-12, "atol": 1e-13},
}
# Four tensors that take the fast path (≥ FUSED_MIN_NUMEL = 65536 elements; two of equal
# size, two of others), updated by one kernel call (FUSED_GROUP = 4), and one small tensor
# that takes the generic path in the same group.
SHAPES = ((256, 260), (260, 256), (129, 520), (300, 257), (7,))
LARGE = 4
STEPS = 50

CASES = {
    # AdamW, base on its default (for-loop) implementation: `step` is a CPU float32 tensor.
    "AdamW-wd-f32": (lambda p: torch.optim.AdamW(p, lr=3e-2, weight_decay=0.1), torch.float32),
    # Adam with coupled weight decay and maximize, fused base: `step` on the parameter's device.
    "Adam-fused-wd-max-f32": (
        lambda p: torch.optim.Adam(
            p, lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, maximize=True, fused=True
        ),
        torch.float32,
    ),
    "AdamW-foreach-f64": (
        lambda p: torch.optim.AdamW(p, lr=3e-2, weight_decay=0.05, foreach=True), torch.float64
    ),
    "AdamW-amsgrad-f32": (
        lambda p: torch.optim.AdamW(p, lr=3e-2, weight_decay=0.1, amsgrad=True), torch.float32
    ),
    "SGD-wd-max-f64": (
        lambda p: torch.optim.SGD(p, lr=3e-2, weight_decay=0.1, maximize=True), torch.float64
    ),
    "SGD-momentum-damp-wd-f32": (
        lambda p: torch.optim.SGD(p, lr=3e-2, momentum=0.9, dampening=0.3, weight_decay=0.1),
        torch.float32,
    ),
    "SGD-nesterov-fused-f64": (
        lambda p: torch.optim.SGD(
            p, lr=3e-2, momentum=0.8, nesterov=True, weight_decay=0.01, fused=True
        ),
        torch.float64,
    ),
}


def _params(dtype, device="cpu"):
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randn(shape, generator=generator, dtype=dtype).to(device).requires_grad_()
        for shape in SHAPES
    ]


def _grads(params, k):
    generator = torch.Generator().manual_seed(100 + k)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)


def _build(make, dtype, fused, device="cpu"):
    params = _params(dtype, device)
    optimizer = E(make(params), alpha=-3.0, beta=0.9, fused=fused)
    # A schedule that changes lr at every step: the fast path must read it from the groups.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer.base, lambda k: 0.9**k)
    return params, optimizer, schedule


def _state_tensors(optimizer):
    return {
        (index, key): value
        for index, entry in optimizer.state_dict()["state"].items()
        for key, value in entry.items()
        if isinstance(value, torch.Tensor)
    }


def _assert_state_close(fast, generic, dtype):
    fast_state, generic_state = _state_tensors(fast), _state_tensors(generic)
    assert fast_state.keys() == generic_state.keys()
    for key, value in fast_state.items():
        other = generic_state[key]
        assert (value.dtype, value.shape, value.device) == (other.dtype, other.shape, other.device)
        torch.testing.assert_close(
            value, other, **TOLERANCE[dtype], msg=lambda m, key=key: f"{key}: {m}"
        )


@pytest.mark.parametrize("case", CASES)
def test_fast_path_equals_generic_path(case, device):
    make, dtype = CASES[case]
    fast_params, fast, fast_schedule = _build(make, dtype, True, device)
    slow_params, slow, slow_schedule = _build(make, dtype, False, device)
    before = fastpath.counters["fast"]
    for k in range(STEPS):
        _grads(fast_params, k)
        _grads(slow_params, k)
        raw = [p.grad.clone() for p in fast_params[:LARGE]]
        fast.step()
        slow.step()
        fast_schedule.step()
        slow_schedule.step()
        for i, (a, b) in enumerate(zip(fast_params, slow_params)):
            torch.testing.assert_close(a, b, **TOLERANCE[dtype])
            if i < LARGE and k > 0:  # the fast path: p.grad untouched
                assert torch.equal(a.grad, raw[i])
            else:  # the generic path: g̃
                torch.testing.assert_close(a.grad, b.grad, **TOLERANCE[dtype])
        _assert_state_close(fast, slow, dtype)
    # The large tensors took the fast path from their second step on (their state exists by
    # then); the small one never did.
    assert fastpath.counters["fast"] - before == LARGE * (STEPS - 1)
    # Not a vacuous comparison: the parameters moved well beyond the tolerance.
    start = _params(dtype, device)
    assert (fast_params[0] - start[0]).abs().max() > 1e-2


def _run_switching(make, dtype, paths):
    """Steps on a path per segment; between segments the state dict moves to a fresh
    optimizer (over copies of the parameters) on the next path."""
    params = _params(dtype)
    step = 0
    state = None
    for fused, count in paths:
        params = [p.detach().clone().requires_grad_() for p in params]
        optimizer = E(make(params), alpha=-3.0, beta=0.9, fused=fused)
        if state is not None:
            optimizer.load_state_dict(state)
        for _ in range(count):
            _grads(params, step)
            optimizer.step()
            step += 1
        state = copy.deepcopy(optimizer.state_dict())
    return params, optimizer


@pytest.mark.parametrize("case", ["AdamW-wd-f32", "SGD-momentum-damp-wd-f32"])
def test_checkpoints_move_between_paths(case):
    make, dtype = CASES[case]
    generic_params, generic = _run_switching(make, dtype, [(False, 8)])
    _, fast = _run_switching(make, dtype, [(True, 8)])
    # Identical layout: keys, dtypes, shapes and devices (`step` stays a CPU tensor).
    fast_state, generic_state = _state_tensors(fast), _state_tensors(generic)
    assert fast_state.keys() == generic_state.keys()
    for key, value in fast_state.items():
        other = generic_state[key]
        assert (value.dtype, value.shape, value.device) == (other.dtype, other.shape, other.device)
    for paths in ([(True, 4), (False, 4)], [(False, 4), (True, 4)], [(True, 3), (True, 5)]):
        params, optimizer = _run_switching(make, dtype, paths)
        for a, b in zip(params, generic_params):
            torch.testing.assert_close(a, b, **TOLERANCE[dtype])
        _assert_state_close(optimizer, generic, dtype)


class _MyAdamW(torch.optim.AdamW):
    pass


FALLBACKS = {
    "tensor-lr": (lambda p: torch.optim.Adam(p, lr=torch.tensor(1e-3), foreach=False), {}),
    "subclass": (lambda p: _MyAdamW(p), {}),
    "other-base": (lambda p: torch.optim.RMSprop(p), {}),
    "E-fused-False": (lambda p: torch.optim.AdamW(p), {"fused": False}),
    "E-fused-default-cpu": (lambda p: torch.optim.AdamW(p), {"fused": None}),
    "telemetry": (lambda p: torch.optim.SGD(p, lr=1e-2), {"telemetry": True}),
    "state_dtype": (lambda p: torch.optim.SGD(p, lr=1e-2), {"state_dtype": torch.float64}),
    "near-bound-alpha": (lambda p: torch.optim.SGD(p, lr=1e-2), {"alpha": -9.5}),
}


@pytest.mark.parametrize("case", FALLBACKS)
def test_documented_fallbacks_take_the_generic_path(case):
    make, options = FALLBACKS[case]
    options = {"fused": True, "alpha": -3.0, "beta": 0.9, **options}
    params = _params(torch.float32)
    optimizer = E(make(params), **options)
    before = fastpath.counters["fast"]
    for k in range(3):
        _grads(params, k)
        optimizer.step()
    assert fastpath.counters["fast"] == before


def test_low_precision_and_small_tensors_fall_back():
    params = [
        torch.zeros(FUSED_MIN_NUMEL, dtype=torch.bfloat16, requires_grad=True),
        torch.zeros(FUSED_MIN_NUMEL - 1, requires_grad=True),
        torch.zeros(2 * FUSED_MIN_NUMEL, requires_grad=True)[::2],  # not contiguous
    ]
    params[2] = params[2].detach().requires_grad_()
    optimizer = E(torch.optim.SGD(params, lr=1e-2), fused=True)
    before = fastpath.counters["fast"]
    for k in range(3):
        _grads(params, k)
        optimizer.step()
    assert fastpath.counters["fast"] == before


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
        lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True),
    ],
    ids=["AdamW", "SGD-nesterov"],
)
def test_meta_device_step_takes_the_fast_path(make):
    params = [torch.empty(FUSED_MIN_NUMEL, device="meta", requires_grad=True)]
    optimizer = E(make(params), fused=True)
    before = fastpath.counters["fast"]
    for _ in range(3):
        params[0].grad = torch.empty_like(params[0])
        optimizer.step()
    assert fastpath.counters["fast"] - before == 2
    assert optimizer.state_dict()["state"][0].keys() == optimizer.base.state[params[0]].keys() | {
        "explore_buffer"
    }


@pytest.mark.parametrize("case", ["AdamW-wd-f32", "SGD-momentum-damp-wd-f32"])
def test_fast_step_reads_nothing_on_the_host(case):
    make, dtype = CASES[case]
    params, optimizer, _ = _build(make, dtype, True)
    _grads(params, 0)
    optimizer.step()  # the first step is generic (it creates the state)
    before = fastpath.counters["fast"]
    # The first fast step may compile the kernel, and compiling reads values once (whether
    # it happens here depends on which test of this worker ran the kernel first): the probe
    # counts steady-state steps.
    _grads(params, 1)
    optimizer.step()
    for k in (2, 3):
        _grads(params, k)
        with host_read_probe() as reads:
            optimizer.step()
        assert reads == []
    assert fastpath.counters["fast"] - before == 3 * LARGE


def _snapshot(params, optimizer):
    state = {k: v.clone() for k, v in _state_tensors(optimizer).items() if k[1] != SKIPS_KEY}
    return [p.detach().clone() for p in params], state


@pytest.mark.parametrize("case", ["AdamW-wd-f32", "SGD-momentum-damp-wd-f32"])
def test_skipped_steps_are_masked_in_the_kernel(case):
    """skip_nonfinite: a step with a NaN gradient (in the large tensor, then in the small
    one) leaves parameters and every state tensor bit-identical, on the fast path too; the
    other steps agree with the generic path."""
    make, dtype = CASES[case]
    runs = {}
    for fused in (True, False):
        params = _params(dtype)
        optimizer = E(make(params), alpha=-3.0, beta=0.9, fused=fused, skip_nonfinite=True)
        before = fastpath.counters["fast"]
        history = []
        for k in range(7):
            _grads(params, k)
            if k in (3, 5):
                params[k % 2].grad.view(-1)[k] = float("nan")
            snapshot = _snapshot(params, optimizer)
            optimizer.step()
            if k in (3, 5):
                after = _snapshot(params, optimizer)
                for a, b in zip(after[0], snapshot[0]):
                    assert torch.equal(a, b)
                assert after[1].keys() == snapshot[1].keys()
                for key, value in after[1].items():
                    assert torch.equal(value, snapshot[1][key]), key
            history.append(_snapshot(params, optimizer))
        assert optimizer.skipped_steps == 2
        runs[fused] = (history, fastpath.counters["fast"] - before)
    assert runs[True][1] == 6 * LARGE and runs[False][1] == 0
    for (fast_params, fast_state), (slow_params, slow_state) in zip(runs[True][0], runs[False][0]):
        for a, b in zip(fast_params, slow_params):
            torch.testing.assert_close(a, b, **TOLERANCE[dtype])
        assert fast_state.keys() == slow_state.keys()
        for key, value in fast_state.items():
            torch.testing.assert_close(value, slow_state[key], **TOLERANCE[dtype])


def test_kernel_scalars_are_rounded_tensors_on_cpu_and_floats_elsewhere():
    """On CPU the compiled kernels take 0-d tensors of the compute dtype, holding exactly the
    float32 (float64) rounding of each coefficient; elsewhere the Python floats."""
    values = (0.1, 1.0 - 0.999, -5.0)
    for dtype in (torch.float32, torch.float64):
        made = kernel_scalars(torch.device("cpu"), dtype, *values)
        assert all(t.dim() == 0 and t.dtype == dtype for t in made)
        # numpy's rounding, not torch's: the reference is independent of the helper
        expected = np.array(values, dtype=np.float32 if dtype == torch.float32 else np.float64)
        assert [t.item() for t in made] == expected.tolist()
    assert kernel_scalars(torch.device("meta"), torch.float32, *values) == values


def _record_kernel_calls(monkeypatch) -> list:
    """Every fast-path kernel call from now on, as ``(positional, keyword)`` arguments."""
    seen = []
    original = fastpath._kernel

    def recording(*args, **kwargs):
        kernel = original(*args, **kwargs)

        def call(*positional, **flags):
            seen.append((positional, dict(flags)))
            return kernel(*positional, **flags)

        return call

    monkeypatch.setattr(fastpath, "_kernel", recording)
    return seen


@pytest.mark.parametrize("case", ["AdamW-wd-f32", "SGD-momentum-damp-wd-f32"])
def test_cpu_kernels_receive_no_python_float(case, monkeypatch):
    """A Python float reaching an inductor C++ kernel is converted from float64 once per
    element: the fast path must hand over tensors (or None for an absent term) only."""
    make, dtype = CASES[case]
    params, optimizer, _ = _build(make, dtype, True)
    seen = _record_kernel_calls(monkeypatch)
    for k in range(3):
        _grads(params, k)
        optimizer.step()
    assert len(seen) == 2  # the large tensors' second and third steps, one call each
    for positional, flags in seen:
        flat = [x for a in positional for x in (a if isinstance(a, list) else [a])]
        assert all(a is None or isinstance(a, torch.Tensor) for a in flat)
        layout = flags.pop("layout")
        assert all(isinstance(name, str) for name in layout)
        assert all(isinstance(f, bool) for f in flags.values())


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.AdamW(p, lr=1e-2),  # weight_decay=0.01 by default: use 0
        lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
    ],
    ids=["AdamW", "SGD-momentum"],
)
def test_absent_weight_decay_is_no_term_not_zero_times_theta(make):
    """torch adds λ·θ only when λ ≠ 0: an infinite weight with λ = 0 leaves the moments
    finite. 0·θ in the kernel would make them NaN."""
    runs = []
    for fused in (True, False):
        params = _params(torch.float32)
        with torch.no_grad():
            params[0].view(-1)[5] = float("inf")
        base = make(params)
        for group in base.param_groups:
            group["weight_decay"] = 0.0
        optimizer = E(base, alpha=-3.0, beta=0.9, fused=fused)
        before = fastpath.counters["fast"]
        for k in range(4):
            _grads(params, k)
            optimizer.step()
        assert fastpath.counters["fast"] - before == (3 * LARGE if fused else 0)
        runs.append(optimizer)
    fast_state, slow_state = _state_tensors(runs[0]), _state_tensors(runs[1])
    for key, value in fast_state.items():
        assert not value.isnan().any(), key
        torch.testing.assert_close(value, slow_state[key], **TOLERANCE[torch.float32])


def test_each_flag_variant_compiles_from_its_own_code_object():
    """dynamo keeps a recompile budget of 8 per code object (fullgraph=True raises past it):
    variants that share one would exhaust it across flags, dtypes and devices."""
    cpu = torch.device("cpu")
    first = fastpath._kernel("adam", cpu, ("variant-a",))
    second = fastpath._kernel("adam", cpu, ("variant-b",))
    assert fastpath._kernel("adam", cpu, ("variant-a",)) is first
    codes = {k.compiled._torchdynamo_orig_callable.__code__ for k in (first, second)}
    assert len(codes) == 2 and fastpath._adam_.__code__ not in codes


def test_pack_scalars_rounds_once_and_lays_out_the_present_terms():
    """One 1-d tensor of the compute dtype on CPU (each value numpy's rounding of the Python
    double), the floats elsewhere; absent (None) terms are left out of both and of the
    layout, in order."""
    named = {"a": 0.1, "b": None, "c": 1.0 - 0.999, "d": -5.0}
    for dtype in (torch.float32, torch.float64):
        values, layout = pack_scalars(torch.device("cpu"), dtype, named)
        assert layout == ("a", "c", "d")
        assert values.dtype == dtype and values.shape == (3,)
        expected = np.array([0.1, 1.0 - 0.999, -5.0],
                            dtype=np.float32 if dtype == torch.float32 else np.float64)
        assert values.tolist() == expected.tolist()
    values, layout = pack_scalars(torch.device("meta"), torch.float32, named)
    assert values == (0.1, 1.0 - 0.999, -5.0) and layout == ("a", "c", "d")


def _many(shapes, dtype=torch.float32):
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(s, generator=generator, dtype=dtype).requires_grad_() for s in shapes]


@pytest.mark.parametrize("case", ["AdamW-wd-f32", "SGD-momentum-damp-wd-f32"])
def test_large_tensors_go_in_groups_then_one_by_one(case, monkeypatch):
    """Six large tensors: one call for the first FUSED_GROUP (4), then one call each for the
    other two; every tensor agrees with the generic path over 10 steps."""
    make, dtype = CASES[case]
    shapes = [(256, 257 + i) for i in range(6)] + [(5,)]
    seen = _record_kernel_calls(monkeypatch)
    runs = []
    for fused in (True, False):
        params = _many(shapes, dtype)
        optimizer = E(make(params), alpha=-3.0, beta=0.9, fused=fused)
        for k in range(10):
            _grads(params, k)
            optimizer.step()
        runs.append((params, optimizer))
    calls = [len(positional[0]) for positional, _ in seen]  # tensors per call
    assert FUSED_GROUP == 4 and calls == [4, 1, 1] * 9
    for a, b in zip(runs[0][0], runs[1][0]):
        torch.testing.assert_close(a, b, **TOLERANCE[dtype])
    _assert_state_close(runs[0][1], runs[1][1], dtype)


def test_a_group_compiles_once_for_any_sizes():
    """A group's graph has a symbolic size per tensor and no relation between them (duck
    sizing is off while it traces; the kernels get flat tensors that are not views, whose
    base's rank dynamo would guard): other sizes, equal or not, and other ranks reuse it."""
    from torch._dynamo.utils import counters

    make, _ = CASES["AdamW-wd-f32"]
    patterns = [
        [(256, 300), (256, 301), (256, 302), (256, 303)],  # all different
        [(256, 310)] * 4,  # all equal
        [(256, 320), (320, 256), (256, 330), (330, 256)],  # two pairs
        [(66000,), (8, 8, 32, 33), (256, 300), (2, 128, 260)],  # ranks 1, 4, 2, 3
        [(4, 4, 64, 65), (66100,), (66200,), (256, 270)],
    ]
    graphs = []
    for shapes in patterns:
        params = _many(shapes)
        optimizer = E(make(params), alpha=-3.0, beta=0.9, fused=True)
        for k in range(3):
            _grads(params, k)
            optimizer.step()
        graphs.append(counters["stats"]["unique_graphs"])
    assert len(set(graphs)) == 1, graphs


@pytest.mark.parametrize("case", ["AdamW-wd-f32", "AdamW-foreach-f64"])
def test_tensors_of_one_group_keep_their_own_step_counts(case):
    """A gradient missing at some steps leaves that tensor's ``step`` behind: the four
    tensors of one kernel call then have different bias corrections, each its own."""
    make, dtype = CASES[case]
    missing = {(1, 1), (2, 1), (4, 3)}  # (step, tensor): no gradient
    runs = []
    for fused in (True, False):
        params = _many([(256, 257 + i) for i in range(4)], dtype)
        optimizer = E(make(params), alpha=-3.0, beta=0.9, fused=fused)
        for k in range(8):
            _grads(params, k)
            for step, i in missing:
                if step == k:
                    params[i].grad = None
            optimizer.step()
        runs.append((params, optimizer))
    steps = [runs[0][1].base.state[p]["step"].item() for p in runs[0][0]]
    assert steps == [8.0, 6.0, 8.0, 7.0]
    for a, b in zip(runs[0][0], runs[1][0]):
        torch.testing.assert_close(a, b, **TOLERANCE[dtype])
    _assert_state_close(runs[0][1], runs[1][1], dtype)


def test_float_tuple_form_agrees_and_compiles_once():
    """Off CPU (CUDA) ``pack_scalars`` hands the kernels a tuple of Python floats. The same
    compiled kernel, given that form here on CPU tensors, agrees with the packed form to
    float32 rounding and with a float64 reference, and a new lr at every call (a schedule)
    does not recompile it: the floats are inputs, not constants of the graph."""
    from torch._dynamo.utils import counters

    cpu = torch.device("cpu")
    variant = ("float-tuple-test",)
    kernel = fastpath._kernel("sgd", cpu, variant)
    generator = torch.Generator().manual_seed(5)
    shapes = [(FUSED_MIN_NUMEL,), (FUSED_MIN_NUMEL + 3,)]
    start = [[torch.randn(s, generator=generator) for s in shapes] for _ in range(3)]
    tuple_form = [[t.clone() for t in ts] for ts in start]
    packed_form = [[t.clone() for t in ts] for ts in start]
    reference = [[t.double() for t in ts] for ts in start]
    graphs = []
    for k in range(10):
        lr = 0.1 * 0.8**k
        named = {"k1": 1.45, "alpha": -0.5, "pc": 0.9, "qc": 0.05, "neg_lr": -lr, "wd": None,
                 "momentum": None, "damp1": None}
        floats, layout = pack_scalars(torch.device("meta"), torch.float32, named)
        assert isinstance(floats, tuple)
        kernel(*tuple_form, None, None, floats, layout=layout, maximize=False, nesterov=False)
        packed, _ = pack_scalars(cpu, torch.float32, named)
        kernel(*packed_form, None, None, packed, layout=layout, maximize=False,
               nesterov=False)
        graphs.append(counters["stats"]["unique_graphs"])
        for p, g, c in zip(*reference):  # SGD without momentum on g̃, in float64
            g_tilde = 1.45 * g - 0.5 * c
            c.copy_(0.9 * c + 0.05 * g_tilde)
            p.add_(g_tilde, alpha=-lr)
    assert graphs[1] == graphs[-1], f"recompiled as lr changed: {graphs}"
    for ours, theirs, exact in zip(tuple_form, packed_form, reference):
        for a, b, x in zip(ours, theirs, exact):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(a.double(), x, rtol=1e-5, atol=1e-6)
