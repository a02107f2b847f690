"""``torch.compile`` of a function that calls ``opt.step()`` on E, with default arguments.

Under tracing torch's ``Optimizer._group_tensors_by_device_and_dtype`` returns the key
``(None, None)``; the adaptor once read ``device.type`` from it and crashed (issue 10). Kept
to three small cases: compiling is slow.
"""

from __future__ import annotations

import pytest
import torch

from adaptor import E

# Compiled vs eager: inductor may fuse and reorder float arithmetic, so the two agree to a
# few ulps of the dtype per step, not bit for bit. float32: ulp 2⁻²³ ≈ 1.2e-7 relative, 3
# steps of lr 1e-2 → rtol 1e-5/atol 1e-6 (observed 2.4e-7). bfloat16: one ulp is 2⁻⁷
# relative; parameters may round to neighbouring values → rtol 1.6e-2, atol 1e-2.
TOLERANCE = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2},
}

CASES = {
    "E(AdamW)-float32": (lambda p: torch.optim.AdamW(p, lr=1e-2), torch.float32),
    "E(SGD)-float32": (lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9), torch.float32),
    "E(SGD)-bfloat16": (lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9), torch.bfloat16),
}


def _run(make, dtype, compiled, steps=3):
    generator = torch.Generator().manual_seed(0)
    params = [
        torch.randn(shape, generator=generator).to(dtype).requires_grad_()
        for shape in ((5, 4), (7,))
    ]
    optimizer = E(make(params))  # default α, β, fused, state_dtype

    def train_step():
        optimizer.step()

    step = torch.compile(train_step) if compiled else train_step
    for k in range(steps):
        grads = torch.Generator().manual_seed(10 + k)
        for p in params:
            p.grad = torch.randn(p.shape, generator=grads).to(dtype)
        step()
    buffers = [optimizer.state[p]["explore_buffer"].clone() for p in params if steps]
    return [p.detach().clone() for p in params], buffers


@pytest.mark.parametrize("case", CASES)
def test_compiled_step_agrees_with_eager(case):
    make, dtype = CASES[case]
    torch._dynamo.reset()
    compiled_params, compiled_buffers = _run(make, dtype, compiled=True)
    eager_params, eager_buffers = _run(make, dtype, compiled=False)
    start, _ = _run(make, dtype, compiled=False, steps=0)
    for got, want, initial in zip(compiled_params, eager_params, start):
        torch.testing.assert_close(got, want, **TOLERANCE[dtype])
        assert not torch.equal(want, initial)
    for got, want in zip(compiled_buffers, eager_buffers):
        assert got.dtype == torch.float32  # float32 state for bf16 params under compile too
        torch.testing.assert_close(got, want, **TOLERANCE[torch.float32])


def test_the_replacement_is_traced_not_skipped():
    """Dynamo falls back to eager (silently, for the whole frame) when traced code raises,
    so agreement alone would not notice a crash under tracing (e.g. reading ``device.type``
    from torch's ``(None, None)`` grouping key). The replacement's foreach ops must be in
    the captured graphs (SGD on CPU uses none of its own)."""
    params = [torch.randn(5, 4, requires_grad=True), torch.randn(7, requires_grad=True)]
    optimizer = E(torch.optim.SGD(params, lr=1e-2, momentum=0.9))
    for p in params:
        p.grad = torch.randn_like(p)
    targets = []

    def recording_backend(graph_module, example_inputs):
        targets.extend(str(node.target) for node in graph_module.graph.nodes)
        return graph_module.forward

    torch._dynamo.reset()
    torch.compile(lambda: optimizer.step(), backend=recording_backend)()
    assert any("_foreach_mul_" in target for target in targets), targets
