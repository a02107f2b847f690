"""Data-parallel training with the explored optimizers, DDP or FSDP2, and DCP checkpoints.

One script, unchanged, on one process or under ``torchrun`` (gloo on CPU, NCCL on GPUs)::

    python examples/train_distributed.py --optimizer alto
    torchrun --standalone --nproc-per-node 2 examples/train_distributed.py --wrap fsdp2 \\
        --optimizer spsa --steps 40 --checkpoint-dir /tmp/ckpt

Each step draws a batch of ``--batch-size`` digits (scikit-learn's 8×8 digits, an MLP)
from a generator seeded by the step number, and each of the N ranks trains on its 1/N
share: with DDP the gradients are averaged (the full batch's gradient); with FSDP2
(``fully_shard``) each rank also holds only its shard of every parameter and of the
optimizer's state; SPSA all-reduces only its loss values (2 numbers per step and sample).

Checkpoints (``--checkpoint-dir``): every ``--save-every`` steps and at the end,
``torch.distributed.checkpoint`` writes ``<dir>/step-<n>``: the model's and the
optimizer's state dicts from ``get_state_dict`` (keyed by parameter name, sharded as the
training is), each rank writing its part. On start the latest ``step-<n>`` found there is
loaded (``dcp.load`` into the fresh model's and optimizer's own state dicts, then
``set_state_dict``) and training continues from step ``n``: a resumed run ends with the
same parameters, bit for bit, as an uninterrupted one with the same world size (the
batches depend only on the step; SPSA's seed and step travel in the optimizer's state
dict). The last line printed is ``final loss <l> params <sha256 of the full parameters>``.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import re
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from sklearn.datasets import load_digits
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from adaptor import E, explore, preset
from backends import ALTO, SPSA

OPTIMIZERS = ("e-adamw", "alto", "spsa", "adamw")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wrap", choices=("ddp", "fsdp2"), default="ddp")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="e-adamw")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=256, help="global, over all ranks")
    parser.add_argument("--lr", type=float, default=None, help="default: per optimizer")
    parser.add_argument("--checkpoint-dir", type=Path, default=None)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return parser.parse_args(argv)


def setup(device_kind: str) -> torch.device:
    """Join the process group: torchrun's (env://), or a one-process group of our own."""
    if device_kind == "auto":
        device_kind = "cuda" if torch.cuda.is_available() else "cpu"
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if "WORLD_SIZE" in os.environ:  # launched by torchrun
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        init_method = "env://"
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    else:  # plain `python`: a group of one, on a file store (no port to pick)
        local_rank, rank, world = 0, 0, 1
        init_method = f"file://{tempfile.mkdtemp()}/store"
    if device_kind == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        if world > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)
    return device


def build_model(wrap: str, device: torch.device, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # the same initial weights on every rank
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10)).to(device)
    if wrap == "ddp":
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def build_optimizer(name: str, model: nn.Module, batch_size: int, lr: float | None):
    params = list(model.parameters())
    if name == "e-adamw":  # the paper's guidance by batch size: α, β from preset()
        return E(torch.optim.AdamW(params, lr=lr or 1e-2), **preset(batch_size))
    if name == "alto":
        return ALTO(params, lr=lr or 1e-2)
    if name == "spsa":  # the same seed on every rank: every rank perturbs along the same Δ
        return explore(SPSA(perturbation=1e-3, seed=0),
                       torch.optim.SGD(params, lr=lr or 3e-3, momentum=0.9),
                       alpha=0.5, beta=0.01)
    return torch.optim.AdamW(params, lr=lr or 1e-2)


def latest_checkpoint(directory: Path | None) -> tuple[int, Path | None]:
    if directory is None or not directory.is_dir():
        return 0, None
    found = [(int(m.group(1)), p) for p in directory.iterdir()
             if (m := re.fullmatch(r"step-(\d+)", p.name)) and (p / ".metadata").exists()]
    return max(found) if found else (0, None)


def save(model: nn.Module, optimizer, directory: Path, step: int) -> None:
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state},
             checkpoint_id=directory / f"step-{step:06d}")


def load(model: nn.Module, optimizer, path: Path) -> None:
    # The fresh model's and optimizer's own state dicts are the targets dcp.load fills
    # (on a fresh optimizer get_state_dict first creates the state; E(SPSA) included).
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])


def fingerprint(model: nn.Module) -> str:
    """sha256 of the full (gathered) parameters, the same on every rank."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    digest = hashlib.sha256()
    for name in sorted(full):
        digest.update(name.encode())
        digest.update(full[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = setup(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of the world "
                         f"size {world}")
    digits = load_digits()
    x_all = torch.tensor(digits.data, dtype=torch.float32, device=device) / 16.0
    y_all = torch.tensor(digits.target, device=device)
    model = build_model(args.wrap, device, args.seed)
    optimizer = build_optimizer(args.optimizer, model, args.batch_size, args.lr)
    loss_fn = nn.CrossEntropyLoss()

    start, path = latest_checkpoint(args.checkpoint_dir)
    if path is not None:
        load(model, optimizer, path)
    if rank == 0:
        print(f"world {world}, {args.wrap}, {args.optimizer}, {device.type}; "
              + (f"resumed from {path}" if path else "from scratch"), flush=True)

    began, loss = time.perf_counter(), torch.zeros((), device=device)
    share = args.batch_size // world
    for step in range(start, args.steps):
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        index = torch.randperm(len(x_all), generator=generator)[: args.batch_size]
        index = index[rank * share : (rank + 1) * share].to(device)
        x, y = x_all[index], y_all[index]
        if args.optimizer == "spsa":  # the closure only evaluates the loss
            loss = optimizer.step(lambda x=x, y=y: loss_fn(model(x), y))
        else:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
        done = step + 1
        if args.checkpoint_dir is not None and (done % args.save_every == 0
                                                or done == args.steps):
            save(model, optimizer, args.checkpoint_dir, done)
        if rank == 0 and (done % 10 == 0 or done == args.steps):
            print(f"step {done:4d}  loss (rank 0's share) {float(loss.detach()):.4f}", flush=True)

    with torch.no_grad():  # the whole data set, evaluated on every rank
        final = loss_fn(model(x_all), y_all)
    digest = fingerprint(model)
    if rank == 0:
        print(f"{args.steps - start} steps in {time.perf_counter() - began:.1f} s", flush=True)
        print(f"final loss {float(final):.6f} params {digest}", flush=True)
    # Free the FSDP2 model and its optimizer (reference cycles: only the garbage collector
    # frees them) while the process group still exists: left to the interpreter's exit, they
    # were destroyed after it, and gloo aborted the process ("terminate called without an
    # active exception", SIGABRT) in about 1 run in 6.
    model = optimizer = None
    gc.collect()
    dist.barrier()  # every rank done before the group goes
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
