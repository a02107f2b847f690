"""The shared pieces of ``adaptor.precision``: state dtypes, one-rounding and Kahan writes,
the non-finite check and the GradScaler hand-over, each against a reference written here.
"""

from __future__ import annotations

import pytest
import torch

from adaptor.precision import (
    add_to_param_,
    check_state_dtype,
    count_skip_,
    found_nonfinite,
    kahan_add_,
    prepare_step,
    resolve_state_dtype,
    restore_where_,
    snapshot,
)
from tests.probes import host_read_probe

BF16, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64


@pytest.mark.parametrize(
    ("param", "given", "want"),
    [
        (BF16, None, F32),
        (F16, None, F32),
        (F32, None, F32),
        (F64, None, F64),
        (BF16, BF16, BF16),
        (F32, F64, F64),
        (torch.complex64, F32, torch.complex64),
    ],
)
def test_state_dtype_defaults_to_float32_for_low_precision(param, given, want):
    assert resolve_state_dtype(param, given) is want


@pytest.mark.parametrize("bad", [torch.int32, "float32", 32, torch.complex64])
def test_state_dtype_must_be_a_real_floating_dtype(bad):
    with pytest.raises(TypeError, match=r"Lamb: state_dtype must be None or a floating"):
        check_state_dtype(bad, "Lamb")


def test_add_to_param_rounds_once():
    """The sum is formed in float32 and rounded to bf16 once: equal to the float64 sum
    rounded once (two roundings, or the update cast to bf16 first, differ for these values)."""
    # 1 + (2⁻⁸ + 2⁻²⁰) lies just above the tie between 1 and 1 + 2⁻⁷: rounded once it goes
    # up; with the update first rounded to bf16 (2⁻⁸) it is an exact tie and goes to even (1).
    theta = torch.tensor([1.0, 0.5, -3.0, 100.0], dtype=BF16)
    update = torch.tensor([2**-8 + 2**-20, 0.0031, -0.02, 0.26], dtype=F32)
    want = (theta.double() + update.double()).to(BF16)
    add_to_param_(theta, update)
    assert torch.equal(theta, want)


def test_kahan_keeps_sub_ulp_updates():
    """100 steps of θ ← θ − 0.002·θ (the decay 1 − lr·wd with lr 0.02, wd 0.1) on bf16 θ₀ = 1:
    the exact value is 0.998¹⁰⁰ = 0.81857; each decrement (0.002) is below half an ulp of 1
    in bf16 (2⁻⁹ = 0.00195 … 0.0039), so plain rounding stalls near 1 and Kahan must land
    within 1 % (bf16 resolution is 0.4 %)."""
    exact = 0.998**100
    theta = torch.ones(8, dtype=BF16)
    comp = torch.zeros_like(theta)
    plain = torch.ones(8, dtype=BF16)
    for _ in range(100):
        kahan_add_(theta, -0.002 * theta.float(), comp)
        add_to_param_(plain, -0.002 * plain.float())
    assert abs(theta.float()[0].item() / exact - 1) < 0.01
    assert abs(plain.float()[0].item() / exact - 1) > 0.1  # what Kahan is for


@pytest.mark.parametrize("dtype", [F32, BF16, F16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_found_nonfinite_flags_nan_and_inf(dtype, bad):
    grads = [torch.randn(5, 4).to(dtype), torch.randn(7).to(dtype)]
    assert found_nonfinite(grads).item() == 0.0
    grads[1][3] = bad
    flag = found_nonfinite(grads)
    assert flag.dtype is F32 and flag.shape == () and flag.item() == 1.0


def test_found_nonfinite_does_not_flag_large_finite_fp16():
    """4096 fp16 entries of 60000: each finite, the 2-norm (3.8e6) beyond fp16's range."""
    grads = [torch.full((4096,), 60000.0, dtype=F16)]
    assert found_nonfinite(grads).item() == 0.0


def test_found_nonfinite_mixed_dtypes_and_no_host_read():
    grads = [torch.ones(3, dtype=BF16), torch.ones(4), torch.tensor([float("nan")], dtype=F64)]
    with host_read_probe() as reads:
        flag = found_nonfinite(grads)
    assert reads == []
    assert flag.item() == 1.0
    meta = found_nonfinite([torch.ones(3, device="meta")])
    assert meta.device.type == "meta"


class _Scaled:
    """What ``GradScaler.step`` sets on an optimizer that supports AMP scaling."""

    def __init__(self, grad_scale, found_inf):
        self.grad_scale = grad_scale
        self.found_inf = found_inf


def test_prepare_step_unscales_like_the_scaler():
    """The gradients equal the scaler's own unscale (its kernel with its reciprocal)."""
    scale = torch.tensor(65536.0 * 3)
    grads = [torch.randn(6, 5) * 1e5, torch.randn(3) * 1e5]
    want = [g.clone() for g in grads]
    found = torch.zeros(())
    torch._amp_foreach_non_finite_check_and_unscale_(
        want, found, scale.double().reciprocal().float()
    )
    flag = prepare_step(_Scaled(scale, torch.zeros(())), grads, skip_nonfinite=False)
    for g, w in zip(grads, want):
        assert torch.equal(g, w)
    assert flag is not None and flag.item() == 0.0


def test_prepare_step_flag_combines_found_inf_and_own_check():
    grads = [torch.ones(3)]
    assert prepare_step(object(), grads, skip_nonfinite=False) is None
    assert prepare_step(object(), grads, skip_nonfinite=True).item() == 0.0
    assert prepare_step(_Scaled(None, torch.ones(())), grads, skip_nonfinite=False).item() == 1.0
    grads[0][1] = float("inf")
    assert prepare_step(object(), grads, skip_nonfinite=True).item() == 1.0


def test_restore_where_and_count_skip():
    t = torch.randn(4)
    saved = snapshot([t])
    before = t.clone()
    t.add_(1.0)
    restore_where_([t], saved, torch.tensor(1.0))
    assert torch.equal(t, before)
    t.add_(1.0)
    restore_where_([t], saved, torch.tensor(0.0))
    assert torch.equal(t, before + 1.0)
    state: dict = {}
    count_skip_(state, torch.tensor(1.0), t)
    count_skip_(state, torch.tensor(0.0), t)
    assert state["nonfinite_skips"].item() == 1.0
