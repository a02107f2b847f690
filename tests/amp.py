"""A small model trained under CPU autocast and ``torch.amp.GradScaler``, shared by the
backends' GradScaler tests."""

from __future__ import annotations

import torch

from tests.probes import host_read_probe


def amp_run(make, dtype, inject_at, steps=5, generic=False):
    """Five steps of a small model under CPU autocast and GradScaler, an Inf injected into one
    gradient at step ``inject_at``; ``generic=True`` forces the scaler's generic path (it
    unscales, reads ``found_inf`` on the host and does not call ``step()``).

    Returns ``(parameters, optimizer, host reads inside scaler.step, final scale)``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    optimizer = make(model.parameters())
    if generic:  # torch's generic path: unscale_, host read of found_inf, step() not called
        optimizer._step_supports_amp_scaling = False
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    generator = torch.Generator().manual_seed(3)
    reads = []
    for step in range(steps):
        x = torch.randn(32, 8, generator=generator)
        y = torch.randn(32, 4, generator=generator)
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        if step == inject_at:
            model[0].weight.grad[0, 0] = float("inf")
        with host_read_probe() as step_reads:
            scaler.step(optimizer)
        reads += step_reads
        scaler.update()
    return [p.detach().clone() for p in model.parameters()], optimizer, reads, scaler.get_scale()
