"""Traffic twins: what moving a step's arrays alone costs on this machine.

A twin is a set of inductor copy kernels that read and write exactly the parameter-sized
arrays an optimizer step reads and writes, four large tensors per compiled call as ours, and
compute nothing but a mean. Timed beside the optimizer it mirrors, its ratio is a measured
floor for that optimizer's ratio (the counted floor assumes every pass runs at one speed).
"""

from __future__ import annotations

import itertools

import torch

from adaptor.replacement import FUSED_MIN_NUMEL, chunks, compile_variant, flat


def _copy_pass(reads: list[torch.Tensor], writes: list[torch.Tensor], *, per_read: int,
               per_write: int) -> None:
    """Per tensor (``per_read`` arrays of ``reads`` and ``per_write`` of ``writes`` each):
    one loop that reads its arrays and writes their mean into its written arrays, negated
    when it reads one array (``θ ← θ·1`` is folded by inductor into no pass at all). No
    reduction: inductor would split such a loop in two and read the arrays twice (ALTO's
    pass 1 keeps one loop with ``realize_reads_threshold=1``), and a floor must not cost
    more than the optimizer it bounds."""
    scale = -1.0 if per_read == 1 else 1.0 / per_read
    for i in range(len(reads) // per_read):
        mine = reads[i * per_read : (i + 1) * per_read]
        value = mine[0]
        for array in mine[1:]:
            value = value + array
        for array in writes[i * per_write : (i + 1) * per_write]:
            array.copy_(value * scale)


_TWINS = itertools.count()


class TrafficTwin:
    """The array traffic of a step, as inductor copy kernels: a floor as measured here.

    ``passes``: per pass, the arrays it reads and those it writes, by name (``p`` the
    parameter, ``g`` its gradient, any other name a state array of the twin's own). torch
    AdamW's fused step is ``(("p g m v", "p m v"),)``; ALTO's two passes are
    ``(("p g c m v", "c m v"), ("p m v", "p"))``. Each pass is one compiled call per four
    large tensors, as ours, writing the mean of the arrays it reads (no other arithmetic, no
    reduction). The values are meaningless; only the time counts: a twin's ratio to torch's
    fused AdamW (or to a forward pass, for SPSA's) is what moving those arrays alone costs on
    this machine, to set beside an optimizer's ratio and its counted floor.
    """

    def __init__(self, params, passes: tuple[tuple[str, str], ...]) -> None:
        self.params = [p for p in params if p.numel() >= FUSED_MIN_NUMEL]
        self.passes = [(reads.split(), writes.split()) for reads, writes in passes]
        names = {name for reads, writes in self.passes for name in reads + writes} - {"p", "g"}
        self.state = {name: [torch.zeros_like(p) for p in self.params] for name in names}
        # a code object per twin: each compiles its own few graphs (dynamo's limit is 8 each)
        self.kernel = compile_variant(_copy_pass, f"_twin{next(_TWINS)}")

    @torch.no_grad()
    def step(self) -> None:
        arrays = {"p": [flat(p) for p in self.params], "g": [flat(p.grad) for p in self.params]}
        arrays.update({name: [flat(t) for t in ts] for name, ts in self.state.items()})
        for chunk in chunks(list(range(len(self.params)))):
            for reads, writes in self.passes:
                self.kernel([arrays[name][i] for i in chunk for name in reads],
                            [arrays[name][i] for i in chunk for name in writes],
                            per_read=len(reads), per_write=len(writes))
