"""Self-tests of the host-read probe (``tests/probes.py``).

This file plays "the library": each test passes ``library_dirs=[__file__]``, so the small
functions below stand for library code. Each one reads a device value in a way that
a mutation of the real library could (``float(norm)``, an f-string, ``str``, a read inside a
torch helper called on the library's behalf); the probe must count it exactly once. The
functions that must *not* count (torch's own optimizer, the test's own reads) are checked too.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from tests.probes import GRAD_SCALER_FILE, host_read_probe

HERE = [__file__]


def _norm(tensors):
    return torch.linalg.vector_norm(torch.stack([t.norm() for t in tensors]))


def library_float_norm(tensors):
    """The mutation ``scale = float(norm)`` inserted in a step."""
    return float(_norm(tensors))


def library_fstring(tensors):
    """The mutation ``message = f"norm {norm}"`` (e.g. a debug log left in a step)."""
    return f"norm {_norm(tensors)}"


def library_fstring_format_spec(tensors):
    return f"{_norm(tensors):.3f}"


def library_str_of_vector(tensors):
    return str(tensors[0])


def library_repr(tensors):
    return repr(tensors[0])


def library_item_and_tolist(tensors):
    return _norm(tensors).item(), tensors[0].tolist()


def library_bool(tensors):
    return bool(_norm(tensors) > 0)


def library_cpu(tensors):
    return tensors[0].cpu()


def library_clip_with_nonfinite_check(tensors):
    """A read made inside torch on the library's behalf (``clip_grad_norm_`` checks on host)."""
    for t in tensors:
        t.grad = torch.ones_like(t)
    torch.nn.utils.clip_grad_norm_(tensors, 1.0, error_if_nonfinite=True)


def library_torch_functional_adam(tensors):
    """torch's functional Adam called directly: its CPU step counter read is on our behalf."""
    params = [tensors[0].detach().clone()]  # one tensor: one step-counter read
    grads = [torch.ones_like(p) for p in params]
    steps = [torch.tensor(0.0) for _ in params]
    importlib.import_module("torch.optim.adam").adam(
        params, grads, [torch.zeros_like(p) for p in params],
        [torch.zeros_like(p) for p in params], [], steps, foreach=False, amsgrad=False,
        beta1=0.9, beta2=0.999, lr=1e-3, weight_decay=0.0, eps=1e-8, maximize=False,
    )


def library_steps_torch_adam(optimizer):
    """A library calling a torch optimizer's own ``step`` (as ``E`` calls its base)."""
    optimizer.step()


def library_clean(tensors):
    """What a step must look like: device ops only."""
    torch._foreach_mul_(tensors, 0.5)
    return _norm(tensors)


def _tensors():
    return [torch.randn(3, 2), torch.randn(4)]


@pytest.mark.parametrize(
    "read",
    [
        library_float_norm,
        library_fstring,
        library_fstring_format_spec,
        library_str_of_vector,
        library_repr,
        library_bool,
        library_cpu,
        library_clip_with_nonfinite_check,
        library_torch_functional_adam,
    ],
    ids=lambda f: f.__name__,
)
def test_probe_counts_a_library_read_once(read):
    tensors = _tensors()
    with host_read_probe(HERE) as reads:
        read(tensors)
    assert len(reads) == 1, reads
    assert reads[0].startswith(__file__)


def test_probe_counts_each_read():
    with host_read_probe(HERE) as reads:
        library_item_and_tolist(_tensors())
    assert [r.rsplit(" ", 1)[1] for r in reads] == ["item", "tolist"]


def test_probe_ignores_device_work_and_reads_outside_the_library():
    tensors = _tensors()
    with host_read_probe(HERE) as reads:
        norm = library_clean(tensors)
    assert reads == []
    # The same reads made by code outside library_dirs are not the library's.
    with host_read_probe() as reads:
        float(norm), f"{norm}", str(tensors[0]), norm.item()
    assert reads == []


def test_probe_excuses_torch_optimizers_own_step():
    """torch's Adam reads its CPU step counter inside its own ``step``: not the library's."""
    p = torch.randn(4, requires_grad=True)
    p.grad = torch.ones_like(p)
    adam = torch.optim.Adam([p], lr=1e-3, foreach=False)
    with host_read_probe(HERE) as reads:
        library_steps_torch_adam(adam)
        library_steps_torch_adam(adam)
    assert reads == []
    assert float(adam.state[p]["step"]) == 2.0


def test_probe_restores_the_tensor_class():
    before = {name: torch.Tensor.__dict__.get(name) for name in ("__str__", "item", "__repr__")}
    with host_read_probe(HERE):
        pass
    after = {name: torch.Tensor.__dict__.get(name) for name in before}
    assert after == before
    assert str(torch.tensor(1.5)) == "tensor(1.5000)"


def test_grad_scaler_file_exists():
    assert GRAD_SCALER_FILE.endswith("grad_scaler.py")


def test_direct_mode_counts_only_reads_written_in_the_library():
    tensors = _tensors()
    with host_read_probe(HERE, direct=True) as reads:
        library_fstring(tensors)
        library_clip_with_nonfinite_check(tensors)  # the read is inside torch
    assert len(reads) == 1 and reads[0].endswith("__format__"), reads
