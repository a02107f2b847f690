"""A probe that counts host reads of tensor values made by, or on behalf of, library code.

Inside ``step()`` no optimizer of the library may read a tensor's value on the host: on a GPU
each read is a device→host synchronisation. The probe patches the methods through which a
value reaches Python — ``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``, ``bool(t)``,
``float(t)``, ``int(t)``, ``complex(t)``, ``operator.index(t)``, and the text conversions
``str(t)``, ``repr(t)`` and ``format(t, spec)`` (an f-string of a tensor prints its values) —
and records each call that the rule below attributes to the library.

**The rule.** Walk the Python stack outward from the frame that called the patched method:

1. a frame in one of ``library_dirs`` (``adaptor/`` and ``backends/`` by default) ends the
   walk: the read is *counted*. This covers a read written in library code (the frame is the
   immediate caller) and a read made inside torch on the library's behalf (e.g. a library
   function that calls ``clip_grad_norm_(..., error_if_nonfinite=True)``, or one of torch's
   helpers that calls ``.item()`` — the torch frames lie between the read and the library);
2. before that, a frame that is the ``step`` method of one of torch's own optimizer
   implementations (a file of ``torch/optim/`` other than ``optimizer.py`` and
   ``lr_scheduler.py``, which are the base class and scheduler wrappers every step passes
   through) *excuses* the read: it belongs to that torch optimizer's own algorithm, which the
   library runs unchanged as the base of ``E`` — e.g. ``torch.optim.Adam``'s CPU-hosted step
   counter read by ``_get_value`` (in ``optimizer.py``) from ``adam.py`` during
   ``E(Adam).step()``. Torch's functional API called directly by library code
   (``torch.optim.adamw.adamw(...)``) has no such ``step`` frame, so its reads still count;
3. a stack with no library frame (the test's own prints and reads) is not counted.

Only the outermost patched call is counted: ``f"{t}"`` runs ``Tensor.__format__``, which
calls ``item()`` or ``repr``, which calls ``tolist()``; that is one read, not three.

``library_dirs`` is a parameter: the probe's self-test passes the test file itself to play
the library, and the GradScaler test adds ``torch/amp/grad_scaler.py`` so that the scaler's
own generic-path read of ``found_inf`` is counted too.

``direct=True`` counts only reads whose immediate caller is library code. The meta-device
tests use it: torch's meta kernels may format meta tensors (which hold no data) while
checking their arguments, e.g. ``torch._foreach_lerp_`` with a list of tensor weights, and
that is no host read; a library ``f"{t}"`` still counts.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
LIBRARY_DIRS = tuple(str(ROOT / name) + "/" for name in ("adaptor", "backends"))
PATCHED = (
    "item",
    "tolist",
    "cpu",
    "numpy",
    "__bool__",
    "__float__",
    "__int__",
    "__complex__",
    "__index__",
    "__str__",
    "__repr__",
    "__format__",
)

_TORCH_OPTIM = str(Path(torch.optim.__file__).resolve().parent) + "/"
# Files of torch/optim/ that every step passes through (the base class's hook and grad
# wrappers, the scheduler's step wrapper): transparent, they excuse nothing.
_TORCH_OPTIM_TRANSPARENT = tuple(
    _TORCH_OPTIM + name for name in ("optimizer.py", "lr_scheduler.py", "__init__.py")
)
GRAD_SCALER_FILE = str(Path(torch.amp.grad_scaler.__file__).resolve())

_active = threading.local()


def _is_torch_optimizer_step(code) -> bool:
    filename = code.co_filename
    return (
        code.co_name == "step"
        and filename.startswith(_TORCH_OPTIM)
        and not filename.startswith(_TORCH_OPTIM_TRANSPARENT)
    )


def _attribute(frame, library: tuple[str, ...], direct: bool = False) -> str | None:
    """``"file:line"`` of the library frame a read is made for, or ``None`` (not counted)."""
    if direct:
        code = frame.f_code
        if not code.co_filename.startswith(library):
            return None
        return f"{code.co_filename}:{frame.f_lineno}"
    while frame is not None:
        code = frame.f_code
        if code.co_filename.startswith(library):
            return f"{code.co_filename}:{frame.f_lineno}"
        if _is_torch_optimizer_step(code):
            return None
        frame = frame.f_back
    return None


def _resolve(paths: Sequence[str | Path]) -> tuple[str, ...]:
    out = []
    for path in paths:
        resolved = Path(path).resolve()
        out.append(str(resolved) + ("/" if resolved.is_dir() else ""))
    return tuple(out)


@contextlib.contextmanager
def host_read_probe(
    library_dirs: Sequence[str | Path] = LIBRARY_DIRS,
    *,
    direct: bool = False,
) -> Iterator[list[str]]:
    """Yields a list that collects ``"file:line method"`` for every host read the rule counts.

    ``library_dirs``: directories (or single files) whose code is "the library".
    ``direct``: count only reads written in library code itself (see the module docstring).
    """
    library = _resolve(library_dirs)
    reads: list[str] = []
    owned = {name: name in torch.Tensor.__dict__ for name in PATCHED}
    originals = {name: getattr(torch.Tensor, name) for name in PATCHED}

    def wrap(name: str, original):
        def probe(self, *args, **kwargs):
            if getattr(_active, "depth", 0):  # a read inside a read: already counted
                return original(self, *args, **kwargs)
            where = _attribute(sys._getframe(1), library, direct)
            if where is not None:
                reads.append(f"{where} {name}")
            _active.depth = 1
            try:
                return original(self, *args, **kwargs)
            finally:
                _active.depth = 0

        probe.__name__ = name
        return probe

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, wrap(name, original))
        yield reads
    finally:
        for name, original in originals.items():
            if owned[name]:
                setattr(torch.Tensor, name, original)
            else:
                delattr(torch.Tensor, name)


# -- inside compiled kernels ------------------------------------------------------------------

# What a traced ``t.item()``, ``float(t)``, ``int(t)`` or ``t.tolist()`` leaves in a graph:
# a method or function of one of these names (an aten overload's name ends in ``.default``).
_GRAPH_READS = ("item", "tolist", "_local_scalar_dense")


def _reads_value(node: torch.fx.Node) -> bool:
    if node.op not in ("call_method", "call_function"):
        return False
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return name.split(".")[0] in _GRAPH_READS


@contextlib.contextmanager
def compiled_graph_reads() -> Iterator[tuple[list[str], list[str]]]:
    """Yields ``(graphs, reads)``: the names of the graphs the library compiles while the
    context is open, and ``"graph: node"`` for each node of them that reads a value on the
    host.

    The probe above sees Python calls only. Inside a kernel compiled by
    ``adaptor.replacement.compile_variant`` dynamo traces ``float(t)`` (or ``t.item()``,
    ``int(t)``) into the graph as an ``item`` node, with ``fullgraph=True`` and no error: on
    CPU the C++ kernel then reads the value without a Python call, on CUDA it synchronises.
    Here every kernel is compiled anew (the library's kernel caches are replaced by empty
    ones, and put back on exit) with a backend that keeps the graph and runs it as it is.
    """
    import adaptor.fastpath as fastpath
    import adaptor.replacement as replacement
    import backends.first_order as first_order
    import backends.zeroth_order as zeroth_order

    caches = [(replacement, "_compiled_kernels"), (fastpath, "_compiled"),
              (first_order, "_compiled"), (zeroth_order, "_compiled")]  # fmt: skip
    saved = [getattr(module, name) for module, name in caches]
    real_compile = torch.compile
    graphs: list[str] = []
    reads: list[str] = []

    def keep(gm: torch.fx.GraphModule, example_inputs):
        name = f"graph {len(graphs)}"
        graphs.append(name)
        reads.extend(f"{name}: {node.format_node()}" for node in gm.graph.nodes
                     if _reads_value(node))  # fmt: skip
        return gm.forward

    def compile_keeping(function, **kwargs):
        kwargs.pop("options", None)  # inductor's, and the graph is not handed to inductor
        return real_compile(function, backend=keep, **kwargs)

    try:
        for module, name in caches:
            setattr(module, name, {})
        torch.compile = compile_keeping
        yield graphs, reads
    finally:
        torch.compile = real_compile
        for (module, name), cache in zip(caches, saved):
            setattr(module, name, cache)
