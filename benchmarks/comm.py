r"""Bytes each rank sends per training step, per optimizer, under DDP and FSDP2.

``python -m benchmarks.comm [--json FILE]`` measures on 2 gloo ranks (CPU) and prints the
measured table and its projection to 8, 64 and 1024 ranks for the parameter counts of the
paper's models (ResNet-50 25.6M, BERT-base 110M, GPT-2 345M; float32 parameters).

**Measuring.** A ``TorchDispatchMode`` sees every collective that reaches torch's
dispatcher (``c10d.*`` ops, which ``torch.distributed``'s Python functions and FSDP2's
all-gathers/reduce-scatters call, and DTensor's functional collectives) and records its
kind and payload ``S``: the input of an all-reduce, broadcast, reduce-scatter or
all-to-all, the output (the whole gathered tensor) of an all-gather. It is active around
the whole step under FSDP2 (forward, backward, ``optimizer.step``) and around
``optimizer.step`` (with SPSA: the closure's forward passes) under DDP. DDP's gradient
all-reduce is issued by its C++ reducer from autograd's hooks and is not counted by the
mode: it is added from the parameter sizes, one all-reduce of ``S = Σ 4·numel`` bytes
(the float32 gradients, in buckets) per step with a backward pass (not for SPSA, which
never calls backward). The step measured is the third (state exists, caches are warm).

**Projecting.** Each kind's payload is fitted exactly, from three tiny MLPs (two widths,
two depths), as ``S = a·(4P) + c·T + d``: ``a`` bytes per parameter byte (``P``
parameters), ``c`` per parameter tensor (``T`` tensors: e.g. Lamb's partial norms under
FSDP2), ``d`` per step (e.g. SPSA's loss values); then evaluated at the model's ``P`` and
``T`` (ResNet-50 161 tensors, BERT-base 199, GPT-2 345M 292). Bytes sent per rank use the
bandwidth-optimal ring algorithms (Patarasuk & Yuan 2009; NCCL's ring), for ``N`` ranks:

* all-reduce: ``2·(N−1)/N·S`` (reduce-scatter then all-gather)
* all-gather (``S`` = gathered output), reduce-scatter (``S`` = input), all-to-all:
  ``(N−1)/N·S``
* broadcast, reduce, gather, scatter (pipelined ring, averaged over ranks): ``(N−1)/N·S``

so a first-order DDP step sends ``2·(N−1)/N·4P`` bytes per rank and FSDP2 (parameters
gathered in the forward and again in the backward, gradients reduce-scattered)
``3·(N−1)/N·4P``. Latency terms (``α·log N`` or ``α·(N−1)`` per collective) are not
modelled: these are volumes.

**Payloads that shrink with N.** One collective's payload does not depend on ``N`` for every
optimizer here but one: Muon under FSDP2 sends each rank's rows of every matrix to the matrix's
owner and the owner's results back in rows (two ``all_to_all_single``), so its input holds
``1/N`` of the matrices' elements, twice: ``S(N) = (2/N)·S(2)`` and ``2·S(2)·(N−1)/N²`` bytes
per rank (:data:`SHRINKS_WITH_RANKS`; the formula is checked on 2 ranks by
``tests/backends/test_matrix_distributed.py``). Shampoo's exchange under FSDP2 sends a rank's
rows of ``G``, ``m̂`` and ``A`` to every rank (constant in ``N``); its roots, sent by the owner
at refresh steps (every step here, ``precondition_frequency=1``), scale with
``Σ r² + c²`` over the blocks, not with ``P``, so its projection is an approximation.

Optimizers that fail under a wrapper print ``n/a (not yet)``. Adding an optimizer is one line
in :data:`OPTIMIZERS`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from fractions import Fraction
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from adaptor import E, explore
from backends import ALTO, SPSA, AdaBelief, Lamb, Muon, Shampoo

WORLD = 2
# name -> (build(params), the closure only evaluates the loss)
OPTIMIZERS: dict[str, tuple[Any, bool]] = {
    "E(AdamW)": (lambda ps: E(torch.optim.AdamW(ps, lr=1e-3)), False),
    "ALTO": (lambda ps: ALTO(ps, lr=1e-3), False),
    "Lamb": (lambda ps: Lamb(ps, lr=1e-3), False),
    "AdaBelief": (lambda ps: AdaBelief(ps, lr=1e-3), False),
    "Muon": (lambda ps: Muon(ps, lr=0.02), False),
    "Shampoo": (lambda ps: Shampoo(ps, lr=1e-3, precondition_frequency=1,
                                   start_preconditioning_step=1), False),
    "SPSA+E": (lambda ps: explore(SPSA(perturbation=1e-3, seed=0),
                                  torch.optim.SGD(ps, lr=1e-3), alpha=0.5, beta=0.01), True),
}
WRAPS = ("ddp", "fsdp2")
# (name, parameters, parameter tensors)
MODELS = (("ResNet-50", 25_600_000, 161), ("BERT-base", 110_000_000, 199),
          ("GPT-2 345M", 345_000_000, 292))
RANKS = (8, 64, 1024)
# the three tiny MLPs the payloads are fitted on: (width, hidden layers)
FIT_SHAPES = ((16, 1), (32, 1), (16, 2))
NOT_YET = "n/a (not yet)"
# (optimizer, wrap) -> collective kinds whose payload is measured at WORLD ranks and scales
# as WORLD/N (see the module docstring)
SHRINKS_WITH_RANKS: dict[tuple[str, str], frozenset[str]] = {
    ("Muon", "fsdp2"): frozenset({"all_to_all"}),
}

_c10d = torch.ops.c10d
_funcol = torch.ops._c10d_functional


def _bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_bytes(v) for v in value)
    return 0


# dispatcher op -> (kind, which argument holds the payload S)
_C10D_PAYLOAD = {
    _c10d.allreduce_: ("all_reduce", 0),
    _c10d.allreduce_coalesced_: ("all_reduce", 0),
    _c10d.broadcast_: ("broadcast", 0),
    _c10d.reduce_: ("reduce", 0),
    _c10d._allgather_base_: ("all_gather", 0),
    _c10d.allgather_: ("all_gather", 0),
    _c10d.allgather_coalesced_: ("all_gather", 0),
    _c10d.allgather_into_tensor_coalesced_: ("all_gather", 0),
    _c10d._reduce_scatter_base_: ("reduce_scatter", 1),
    _c10d.reduce_scatter_: ("reduce_scatter", 1),
    _c10d.reduce_scatter_tensor_coalesced_: ("reduce_scatter", 1),
    _c10d.alltoall_base_: ("all_to_all", 1),
    _c10d.alltoall_: ("all_to_all", 1),
    _c10d.gather_: ("gather", 1),
    _c10d.scatter_: ("scatter", 0),
}
_FUNCOL_PAYLOAD = {  # functional collectives (DTensor): payload from the input
    _funcol.all_reduce: ("all_reduce", 1),
    _funcol.all_reduce_coalesced: ("all_reduce", 1),
    _funcol.all_gather_into_tensor: ("all_gather", None),  # input × group size
    _funcol.all_gather_into_tensor_coalesced: ("all_gather", None),
    _funcol.reduce_scatter_tensor: ("reduce_scatter", 1),
    _funcol.reduce_scatter_tensor_coalesced: ("reduce_scatter", 1),
    _funcol.broadcast: ("broadcast", 1),
    _funcol.all_to_all_single: ("all_to_all", 1),
}
RING_FACTOR = {  # bytes sent per rank = factor(N) · S
    "all_reduce": lambda n: Fraction(2 * (n - 1), n),
    **{kind: (lambda n: Fraction(n - 1, n)) for kind in (
        "all_gather", "reduce_scatter", "all_to_all", "broadcast", "reduce", "gather",
        "scatter")},
}


class CollectiveCounter(TorchDispatchMode):
    """Records ``(kind, payload bytes)`` of every collective dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.payload: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket
        if packet in _C10D_PAYLOAD:
            kind, index = _C10D_PAYLOAD[packet]
            self.payload[kind] += _bytes(args[index])
        elif packet in _FUNCOL_PAYLOAD:
            kind, _ = _FUNCOL_PAYLOAD[packet]
            size = _bytes(args[0])
            if packet in (_funcol.all_gather_into_tensor,
                          _funcol.all_gather_into_tensor_coalesced):
                size *= args[1]  # group size
            self.payload[kind] += size
        return func(*args, **(kwargs or {}))


def _model(width: int, hidden: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(8, width), nn.Tanh()]
    for _ in range(hidden):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, 4))
    return nn.Sequential(*layers)


def _wrap(model: nn.Module, wrap: str) -> nn.Module:
    if wrap == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def _measure_one(name: str, wrap: str, width: int, hidden: int, rank: int) -> dict[str, int]:
    """Payload bytes per kind of one step on this rank (raises if the optimizer fails)."""
    build, loss_only = OPTIMIZERS[name]
    bare = _model(width, hidden)
    param_bytes = sum(p.numel() * p.element_size() for p in bare.parameters())
    model = _wrap(bare, wrap)
    optimizer = build(list(model.parameters()))
    generator = torch.Generator().manual_seed(rank)
    x, y = torch.randn(4, 8, generator=generator), torch.randn(4, 4, generator=generator)

    def loss() -> torch.Tensor:
        return nn.functional.mse_loss(model(x), y)

    counter = CollectiveCounter()
    for step in range(3):
        measured = step == 2
        # FSDP2: the whole step; DDP: optimizer.step (SPSA: its closure's forwards too)
        around_step = measured and (wrap == "ddp" or loss_only)
        with counter if measured and not around_step else _nothing():
            if not loss_only:
                optimizer.zero_grad()
                loss().backward()
            with counter if around_step else _nothing():
                optimizer.step(loss) if loss_only else optimizer.step()
    payload = dict(counter.payload)
    if wrap == "ddp" and not loss_only:  # the C++ reducer's bucketed gradient all-reduce
        payload["all_reduce"] = payload.get("all_reduce", 0) + param_bytes
    return payload


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _worker(rank: int, out_dir: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank,
                            world_size=WORLD)
    results: dict[str, Any] = {}
    try:
        for name in names:
            for wrap in WRAPS:
                fits = []
                try:
                    for width, hidden in FIT_SHAPES:
                        fits.append(_measure_one(name, wrap, width, hidden, rank))
                    results[f"{name}|{wrap}"] = fits
                except Exception as error:  # reported as "not yet"
                    message = (str(error).strip().splitlines() or [""])[0]
                    results[f"{name}|{wrap}"] = f"{type(error).__name__}: {message}"[:200]
                dist.barrier()
        if rank == 0:
            with open(os.path.join(out_dir, "result.json"), "w") as handle:
                json.dump(results, handle)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def measure(names: list[str] | None = None) -> dict[str, Any]:
    """Spawn 2 gloo ranks; per ``"optimizer|wrap"`` the payloads of the fit shapes, or the
    error message of an optimizer that fails there."""
    names = list(names or OPTIMIZERS)
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(out_dir, names), nprocs=WORLD, join=True)
        with open(os.path.join(out_dir, "result.json")) as handle:
            return json.load(handle)


def _shape(width: int, hidden: int) -> tuple[int, int]:
    model = _model(width, hidden)
    return sum(p.numel() for p in model.parameters()), len(list(model.parameters()))


def fit(fits: list[dict[str, int]]) -> dict[str, tuple[Fraction, Fraction, Fraction]]:
    """Per kind, ``(a, c, d)`` with ``S = a·(4P) + c·T + d`` exact on the three shapes."""
    shapes = [_shape(w, h) for w, h in FIT_SHAPES]
    kinds = sorted({kind for payload in fits for kind in payload})
    rows = [[Fraction(4 * p), Fraction(t), Fraction(1)] for p, t in shapes]
    out = {}
    for kind in kinds:
        values = [Fraction(payload.get(kind, 0)) for payload in fits]
        out[kind] = tuple(_solve3(rows, values))
    return out


def _solve3(rows: list[list[Fraction]], values: list[Fraction]) -> list[Fraction]:
    """Gaussian elimination, exact (3 × 3)."""
    m = [[*row, v] for row, v in zip(rows, values)]
    for col in range(3):
        pivot = next(r for r in range(col, 3) if m[r][col] != 0)
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(3):
            if r != col and m[r][col] != 0:
                factor = m[r][col] / m[col][col]
                m[r] = [a - factor * b for a, b in zip(m[r], m[col])]
    return [m[i][3] / m[i][i] for i in range(3)]


def sent_per_rank(coefficients: dict[str, tuple[Fraction, ...]], params: int, tensors: int,
                  ranks: int, shrinking: frozenset[str] = frozenset()) -> float:
    """Bytes one rank sends per step at ``ranks`` ranks (ring formulas above); the payloads
    of the ``shrinking`` kinds, fitted at ``WORLD`` ranks, scale as ``WORLD/ranks``."""
    total = Fraction(0)
    for kind, (a, c, d) in coefficients.items():
        payload = a * 4 * params + c * tensors + d
        if kind in shrinking:
            payload = payload * Fraction(WORLD, ranks)
        total += RING_FACTOR[kind](ranks) * max(payload, Fraction(0))
    return float(total)


def _human(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def report(results: dict[str, Any]) -> str:
    lines = []
    width, hidden = FIT_SHAPES[0]
    params, tensors = _shape(width, hidden)
    lines.append(f"Measured on {WORLD} gloo ranks, MLP of {params} float32 parameters "
                 f"({tensors} tensors): payload S per step by collective, and bytes sent "
                 f"per rank (ring). DDP's gradient all-reduce added from the parameter sizes.")
    lines.append("")
    lines.append("| optimizer | wrap | payload per step | sent per rank |")
    lines.append("|---|---|---|---|")
    projected: dict[tuple[str, str], dict[str, Any]] = {}
    for key, value in results.items():
        name, wrap = key.split("|")
        if isinstance(value, str):
            lines.append(f"| {name} | {wrap} | {NOT_YET} | {NOT_YET} |")
            continue
        payload = value[0]
        text = ", ".join(f"{k} {v} B" for k, v in sorted(payload.items())) or "none"
        sent = sum(float(RING_FACTOR[k](WORLD)) * v for k, v in payload.items())
        lines.append(f"| {name} | {wrap} | {text} | {sent:.0f} B |")
        projected[name, wrap] = fit(value)
    for wrap in WRAPS:
        lines.append("")
        lines.append(f"Projected bytes sent per rank per step, {wrap.upper()} "
                     "(× = against a first-order DDP step, 2·(N−1)/N·4P):")
        lines.append("")
        header = "| optimizer | " + " | ".join(
            f"{model} N={n}" for model, _, _ in MODELS for n in RANKS) + " |"
        lines.append(header)
        lines.append("|---" * (1 + len(MODELS) * len(RANKS)) + "|")
        for key in results:
            name, key_wrap = key.split("|")
            if key_wrap != wrap:
                continue
            cells = []
            for _, p, t in MODELS:
                for n in RANKS:
                    if (name, wrap) not in projected:
                        cells.append(NOT_YET)
                        continue
                    sent = sent_per_rank(projected[name, wrap], p, t, n,
                                         SHRINKS_WITH_RANKS.get((name, wrap), frozenset()))
                    ddp = 2 * (n - 1) / n * 4 * p
                    cells.append(f"{_human(sent)} (×{sent / ddp:.2g})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    failures = {k: v for k, v in results.items() if isinstance(v, str)}
    if failures:
        lines.append("")
        lines.append(f"{NOT_YET}: " + "; ".join(f"{k}: {v}" for k, v in failures.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.comm",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--optimizer", action="append", choices=list(OPTIMIZERS),
                        help="repeatable; default: all")
    parser.add_argument("--json", help="also write the measured payloads to this file")
    args = parser.parse_args(argv)
    results = measure(args.optimizer)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
