"""A probe that counts host reads of tensor values made by the library's own code.

Inside ``step()`` no optimizer of the library may call ``.item()``, ``.tolist()``,
``bool(tensor)``, ``float(tensor)`` or ``int(tensor)``: on a GPU each is a device→host
synchronisation. The probe patches those methods and counts calls whose immediate caller
is a file of ``adaptor/`` or ``backends/`` (torch's own CPU-hosted step counter, read inside
torch, is not ours and is not counted).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
LIBRARY_DIRS = tuple(str(ROOT / name) for name in ("adaptor", "backends"))
PATCHED = ("item", "tolist", "__bool__", "__float__", "__int__")


@contextlib.contextmanager
def host_read_probe() -> Iterator[list[str]]:
    """Yields a list that collects ``"file:line method"`` for every host read by the library."""
    reads: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in PATCHED}

    def wrap(name: str, original):
        def probe(self, *args, **kwargs):
            caller = sys._getframe(1)
            filename = caller.f_code.co_filename
            if filename.startswith(LIBRARY_DIRS):
                reads.append(f"{filename}:{caller.f_lineno} {name}")
            return original(self, *args, **kwargs)

        return probe

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, wrap(name, original))
        yield reads
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
