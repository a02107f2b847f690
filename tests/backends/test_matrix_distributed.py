"""Muon, E(Muon) and Shampoo under torch.distributed (gloo, two CPU processes).

DDP (whole parameters on every rank, gradients averaged) and FSDP2 (``fully_shard``: each rank
holds rows of every tensor). Each rank trains on its half of a batch; the parameters must
match one process on the whole batch and agree across ranks. Under FSDP2 each matrix's
Newton–Schulz iteration (Muon) and each parameter's inverse roots (Shampoo) must run on
exactly one rank: the calls are counted per rank and their union must be the single process's
calls, with no matrix on both ranks.

The model's row counts are odd (5, 7, 3 rows: uneven shards 3+2, 4+3, 2+1) and its head has
one row (rank 1 holds an empty shard); one weight is 3-D (flattened to a matrix). The same
spawn checks FSDP2 checkpoints (sharded and full optimizer state dicts, DCP save → load →
continue) and counts the bytes of every ``all_to_all_single``.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from adaptor import E
from backends import Muon, Shampoo, _owners, matrix, second_order
from tests.distributed import full, gloo_group, move_optimizer_state, rank_share, wrap

STEPS = 4
WORLD = 2
BLOCK = 4  # Shampoo's max_preconditioner_dim: the 5×6 and 7×5 weights become 4 blocks each
FREQUENCY = 2  # Shampoo refreshes its roots at steps 1 and 3

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing"),
    # with --dist loadgroup one worker runs the multi-process tests in turn
    pytest.mark.xdist_group("torch_distributed"),
]


def _muon(ps, **kw):
    # ns_dtype=float64: the comparison with one process is then at float64 rounding
    return Muon(ps, lr=0.02, momentum=0.9, weight_decay=0.1, ns_dtype=torch.float64,
                adamw_lr=0.01, **kw)


OPTIMIZERS = {
    "muon": _muon,
    "muon-plain": lambda ps: _muon(ps, nesterov=False, adjust_lr_fn="match_rms_adamw",
                                   batched=False),
    "muon-skip-nonfinite": lambda ps: _muon(ps, skip_nonfinite=True),
    "e-muon": lambda ps: E(_muon(ps), alpha=-2.0, beta=0.9),
    "shampoo": lambda ps: Shampoo(
        ps, lr=0.05, betas=(0.9, 0.99), weight_decay=0.1, start_preconditioning_step=1,
        precondition_frequency=FREQUENCY, max_preconditioner_dim=BLOCK,
        preconditioner_dtype=torch.float64,
    ),
}
# Float64 everywhere except "muon-default": float32 parameters and Muon's defaults, so
# Newton–Schulz runs, and its input and output travel, in bfloat16.
OPTIMIZERS["muon-default"] = lambda ps: Muon(ps, lr=0.02, adamw_lr=0.01)
# bfloat16 parameters: float32 state and arithmetic, Kahan-compensated writes (the
# compensation buffers are DTensors too), one rounding per write
OPTIMIZERS["muon-bf16-kahan"] = lambda ps: Muon(ps, lr=0.02, adamw_lr=0.01, kahan=True,
                                                weight_decay=0.1)
DTYPES = {"muon-default": torch.float32, "muon-bf16-kahan": torch.bfloat16}
# Summed statistics, AdaGrad grafting, momentum after the preconditioner and kept eigenbases
# (a full eigh at the first recomputation, a QR refresh at the second): the owner's refreshed
# bases must reach every rank too.
OPTIMIZERS["shampoo-eigenbasis"] = lambda ps: Shampoo(
    ps, lr=0.05, betas=(0.5, 1.0), grafting="adagrad", momentum_position="after",
    reuse_eigenbasis=2, start_preconditioning_step=1, precondition_frequency=FREQUENCY,
    max_preconditioner_dim=BLOCK, preconditioner_dtype=torch.float64,
)


def _with_plain_matrix(params):
    """Muon over the FSDP2 parameters plus one ordinary 4×2 matrix that FSDP2 does not
    manage (its gradient, set by a step pre-hook, is the same on every rank): it is
    orthogonalised locally, beside the sharded ones."""
    extra = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 8, dtype=torch.float64).view(4, 2))
    optimizer = _muon([*params, extra])

    def set_grad(opt, args, kwargs):
        extra.grad = extra.detach().sin() + 0.5

    optimizer.register_step_pre_hook(set_grad)
    return optimizer


OPTIMIZERS["muon-plain-tensor"] = _with_plain_matrix
CASES = [(name, wrapper) for wrapper in ("ddp", "fsdp2") for name in OPTIMIZERS]
# HSDP: a 2 × 1 mesh, parameters replicated over 2 ranks and "sharded" over 1: the matrices
# are exchanged within the 1-rank shard group (each replica does the whole work).
CASES += [("muon", "hsdp"), ("shampoo", "hsdp")]
# the cases where FSDP2 gives each sharded matrix to one rank (checked by counting)
ONE_RANK = [n for n in OPTIMIZERS if n.startswith(("muon", "e-muon")) and n != "muon-plain-tensor"]
NAN_STEP = 2


class _Net(torch.nn.Module):
    """Matrices of distinct shapes (a Newton–Schulz call's shape names its matrix)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(6, 5)
        self.l2 = torch.nn.Linear(5, 7)
        self.l3 = torch.nn.Linear(7, 3)
        self.head = torch.nn.Linear(3, 1)
        self.mix = torch.nn.Parameter(torch.randn(3, 2, 3) * 0.3)  # 3-D: a 3×6 matrix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.l2(torch.tanh(self.l1(x))))
        h = torch.tanh(self.l3(h) + x @ self.mix.reshape(3, 6).T)
        return self.head(h)


def _model(dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    return _Net().to(dtype)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(8, 6, generator=generator, dtype=torch.float64)
    return x, torch.randn(8, 1, generator=generator, dtype=torch.float64)


def _train(model, optimizer, steps, rank: int | None, *, nan: str | None = None) -> None:
    dtype = next(model.parameters()).dtype
    for step in steps:
        x, y = (t.to(dtype) for t in rank_share(*_batch(step), rank, WORLD))
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if nan is not None and step == NAN_STEP and (nan == "all" or rank in (None, 1)):
            grad = getattr(model, "module", model).l2.weight.grad
            local = grad.to_local() if hasattr(grad, "to_local") else grad
            local[0, 0] = float("nan")  # rank 1's shard under FSDP2
        optimizer.step()


def _params(optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _wrap(model: torch.nn.Module, wrapper: str) -> torch.nn.Module:
    """FSDP2/HSDP shard the four layers, then the model (its loose ``mix`` parameter)."""
    return wrap(model, wrapper, (model.l1, model.l2, model.l3, model.head))


def _matrix_state(optimizer) -> list[dict[str, object]]:
    """Each matrix's Shampoo statistics and roots (plain tensors), or the type of Muon's
    momentum buffer."""
    base = getattr(optimizer, "base", optimizer)
    out = []
    for p in _params(optimizer):
        state = base.state[p]
        if "momentum_buffer" in state:
            out.append({"momentum_buffer": type(state["momentum_buffer"]).__name__})
        elif "left" in state:
            keys = (*second_order.MATRIX_KEYS, *second_order.BASIS_KEYS)
            out.append({k: state[k].clone() for k in keys if k in state})
    return out


class _Record:
    """Counts what a step computes and sends: Newton–Schulz inputs ``(m, n)`` (one per
    matrix, batches unrolled), the shapes of parameters whose roots are refreshed, and the
    bytes of every ``all_to_all_single`` that go to another rank."""

    def __init__(self) -> None:
        self.ns: list[tuple[int, int]] = []
        self.roots: list[tuple[int, ...]] = []
        self.sent: list[int] = []

    def install(self) -> None:
        ns, refresh, a2a = matrix._newton_schulz_owned_, Shampoo._refresh_roots, None

        def counting_ns(x, *args):
            shapes = [tuple(x.shape[-2:])] * (x.shape[0] if x.dim() == 3 else 1)
            self.ns.extend(shapes)
            return ns(x, *args)

        def counting_roots(opt, group, params, *args):
            self.roots.extend(tuple(p.shape) for p in params)
            return refresh(opt, group, params, *args)

        matrix._newton_schulz_owned_ = counting_ns
        Shampoo._refresh_roots = counting_roots
        if dist.is_initialized():
            a2a = dist.all_to_all_single

            def counting_a2a(output, input, output_split_sizes=None, input_split_sizes=None,
                             **kw):
                me = dist.get_rank(kw.get("group"))
                others = sum(n for r, n in enumerate(input_split_sizes) if r != me)
                self.sent.append(others * input.element_size())
                return a2a(output, input, output_split_sizes, input_split_sizes, **kw)

            dist.all_to_all_single = counting_a2a
        self._undo = (ns, refresh, a2a)

    def clear(self) -> None:
        self.ns, self.roots, self.sent = [], [], []

    def uninstall(self) -> None:
        ns, refresh, a2a = self._undo
        matrix._newton_schulz_owned_ = ns
        Shampoo._refresh_roots = refresh
        if a2a is not None:
            dist.all_to_all_single = a2a


# (optimizer, how): sharded state dicts are what DCP saves; "full" gathers to rank 0 and
# broadcasts (Shampoo's replicated statistics must be the same on every rank for both)
CHECKPOINTS = [("muon", "dcp"), ("muon", "full"), ("e-muon", "dcp"), ("shampoo", "dcp"),
               ("shampoo", "full"), ("shampoo", "sharded")]


def _checkpoints(rank: int, out_dir: str) -> dict[str, bool]:
    """FSDP2: 2 steps, save, load into a fresh model and optimizer, 2 more steps on both."""
    results = {}
    for name, how in CHECKPOINTS:
        model = _wrap(_model(), "fsdp2")
        optimizer = OPTIMIZERS[name](model.parameters())
        _train(model, optimizer, range(2), rank)
        resumed_model = _wrap(_model(), "fsdp2")
        resumed = OPTIMIZERS[name](resumed_model.parameters())
        resumed_model.load_state_dict(model.state_dict())
        move_optimizer_state(model, optimizer, resumed_model, resumed, how,
                             os.path.join(out_dir, f"ckpt-{name}-{how}"))
        _train(model, optimizer, range(2, 4), rank)
        _train(resumed_model, resumed, range(2, 4), rank)
        results[f"{name}-{how}"] = all(
            torch.equal(full(a), full(b))
            for a, b in zip(model.parameters(), resumed_model.parameters())
        )
    return results


def _unsupported_placement() -> dict[str, object]:
    """A matrix sharded by columns (``Shard(1)``, tensor-parallel style): each optimizer
    raises ``TypeError`` before anything moves."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    out: dict[str, object] = {}
    for name in ("muon", "shampoo"):
        torch.manual_seed(0)
        p = torch.nn.Parameter(distribute_tensor(torch.randn(4, 6, dtype=torch.float64),
                                                 mesh, [Shard(1)]))
        p.grad = distribute_tensor(torch.ones(4, 6, dtype=torch.float64), mesh, [Shard(1)])
        before = p.detach().to_local().clone()
        optimizer = OPTIMIZERS[name]([p])
        try:
            optimizer.step()
            out[name] = "no error"
        except TypeError as error:
            out[name] = str(error)
        out[f"{name}-unchanged"] = torch.equal(p.detach().to_local(), before) and not any(
            optimizer.state.values()
        )
    return out


def _worker(rank: int, out_dir: str) -> None:
    with gloo_group(rank, WORLD, out_dir):
        record = _Record()
        record.install()
        try:
            results: dict[str, object] = {}
            for name, wrapper in CASES:
                model = _wrap(_model(DTYPES.get(name, torch.float64)), wrapper)
                optimizer = OPTIMIZERS[name](model.parameters())
                nan = None
                if name.endswith("nonfinite"):
                    nan = "rank1" if wrapper == "fsdp2" else "all"
                record.clear()
                _train(model, optimizer, range(STEPS), rank, nan=nan)
                key = f"{name}-{wrapper}"
                results[key] = [full(p) for p in _params(optimizer)]
                # copies: the record goes on counting in the checkpoint runs below
                results[f"{key}-ns"], results[f"{key}-roots"] = [*record.ns], [*record.roots]
                results[f"{key}-sent"] = [*record.sent]
                if wrapper == "fsdp2":
                    results[f"{key}-local"] = [
                        tuple(p.to_local().shape) if hasattr(p, "to_local") else None
                        for p in _params(optimizer)
                    ]
                    results[f"{key}-state"] = _matrix_state(optimizer)
            results["checkpoints"] = _checkpoints(rank, out_dir)
            results["placements"] = _unsupported_placement()
        finally:
            record.uninstall()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    # One spawn for every case: starting two processes costs more than the training.
    out_dir = tmp_path_factory.mktemp("matrix_distributed")
    mp.spawn(_worker, args=(str(out_dir),), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


def _single(name: str):
    """One process on the whole batch: final parameters, start, and what it computed."""
    model = _model(DTYPES.get(name, torch.float64))
    optimizer = OPTIMIZERS[name](model.parameters())
    start = [p.detach().clone() for p in _params(optimizer)]
    record = _Record()
    record.install()
    try:
        _train(model, optimizer, range(STEPS), None,
               nan="all" if name.endswith("nonfinite") else None)
    finally:
        record.uninstall()
    return [p.detach() for p in _params(optimizer)], start, record


@pytest.mark.parametrize(("name", "wrapper"), CASES, ids=[f"{n}-{w}" for n, w in CASES])
def test_matches_one_process_on_the_full_batch(ranks, name, wrapper):
    """float64 (Newton–Schulz and the roots too); rtol 1e-9, atol 1e-12: the runs differ
    in the order of the gradient sums (ulps), which five Newton–Schulz steps amplify at most
    by ~a⁵ ≈ 500 and the roots by κ^{1/4} (measured: Muon 1.7e-16, Shampoo 1.4e-12 absolute,
    rel 1.4e-11); a matrix orthogonalised from its shard only, a wrong or missing row
    block, or a rank's stale root moves the parameters by ≥ 1e-4 (every parameter moves by
    ≥ 1.7e-2 in these 4 steps)."""
    want, start, _ = _single(name)
    # float32 with bfloat16 Newton–Schulz (measured 1.5e-8): an ulp of difference in a
    # float32 gradient sum may flip one bfloat16 rounding of U (2⁻⁸ relative), which moves
    # that step's update of size lr·s ≈ 0.02 by ≲ 1e-4; a shard orthogonalised alone moves
    # the parameters by ~1e-2.
    tol = dict(rtol=1e-9, atol=1e-12) if name not in DTYPES else dict(rtol=0, atol=2e-4)
    if name == "shampoo-eigenbasis":
        # The summed statistics are rank-deficient after 1–3 steps; the kept eigenvectors of
        # their (near-)degenerate eigenvalues are fixed by ulps of the gradient sums, and the
        # QR refresh, an approximation of eigh, depends on them: against one process the
        # parameters differ by up to 1.2e-3, DDP and FSDP2 alike. So FSDP2 is held to DDP
        # (both average the same two half-batch gradients) at the float64 tolerance, and the
        # ranks' agreement (statistics, roots and bases bit-identical) is checked in
        # test_fsdp2_state_placement.
        # (DDP: the ranks' agreement only)
        want = ranks[0][f"{name}-ddp"] if wrapper != "ddp" else None
    if DTYPES.get(name) == torch.bfloat16:
        # FSDP2 and DDP average the two halves' bfloat16 gradients in bfloat16 (one more
        # rounding than the single process's mean over the whole batch), which bf16
        # Newton–Schulz and bf16 writes carry on: measured 5.9e-3 after 4 steps, DDP and
        # FSDP2 alike (|θ| < 1, bfloat16 ulp ≤ 2⁻⁸ ≈ 3.9e-3), while every parameter moves
        # by ≥ 3.3e-2. This case guards the low-precision path on shards (float32 state,
        # DTensor Kahan buffers), not the last ulps.
        tol = dict(rtol=0, atol=1.5e-2)
    for rank in ranks:
        got = rank[f"{name}-{wrapper}"]
        for g, w, s in zip(got, want or got, start, strict=True):
            assert not torch.equal(w, s)  # the run moved every parameter
            torch.testing.assert_close(g, w, **tol)
    for a, b in zip(ranks[0][f"{name}-{wrapper}"], ranks[1][f"{name}-{wrapper}"]):
        assert torch.equal(a, b), "the ranks disagree"


@pytest.mark.parametrize("name", ONE_RANK)
def test_fsdp2_orthogonalises_each_matrix_on_exactly_one_rank(ranks, name):
    """The Newton–Schulz inputs of both ranks together are the single process's (every
    matrix once per step, whole), and no matrix shape appears on both ranks."""
    _, _, single = _single(name)
    calls = [rank[f"{name}-fsdp2-ns"] for rank in ranks]
    assert sorted(calls[0] + calls[1]) == sorted(single.ns)
    assert len(set(single.ns)) == 5 and len(single.ns) == 5 * STEPS
    assert not set(calls[0]) & set(calls[1]), "a matrix was orthogonalised on both ranks"
    assert calls[0] and calls[1], "one rank did all the work"


def test_fsdp2_computes_each_root_on_exactly_one_rank(ranks):
    """Shampoo: the parameters whose roots each rank refreshes partition the single
    process's (3 preconditioned matrices × 2 refreshes)."""
    _, _, single = _single("shampoo")
    calls = [rank["shampoo-fsdp2-roots"] for rank in ranks]
    assert sorted(calls[0] + calls[1]) == sorted(single.roots)
    assert len(single.roots) == 5 * 2
    assert not set(calls[0]) & set(calls[1]), "a root was computed on both ranks"
    assert calls[0] and calls[1], "one rank did all the work"


def _chunk_rows(rows: int) -> list[int]:
    """Each rank's rows under Shard(0): torch.chunk's sizes, empty chunks for the rest."""
    sizes = [len(c) for c in torch.arange(rows).chunk(WORLD)]
    return sizes + [0] * (WORLD - len(sizes))


MATRICES = {  # name -> (rows, cols) of its matrix view
    "l1": (5, 6), "l2": (7, 5), "l3": (3, 7), "head": (1, 3), "mix": (3, 6),
}


def test_uneven_and_empty_shards(ranks):
    """The FSDP2 runs really held uneven shards (and an empty one), with torch.chunk's
    layout: rank 0 the first ⌈m/2⌉ rows (their results match one process, tested above)."""
    for name in OPTIMIZERS:
        if name == "muon-plain-tensor":
            continue
        locals_ = [rank[f"{name}-fsdp2-local"] for rank in ranks]
        assert (3, 6) in locals_[0] and (2, 6) in locals_[1]  # l1.weight: 5 rows
        assert (4, 5) in locals_[0] and (3, 5) in locals_[1]  # l2.weight: 7 rows
        assert (0, 3) in locals_[1]  # head.weight: one row, none on rank 1


def _owner_of(ranks, name: str, key: str) -> dict[tuple[int, int], int]:
    owners = {}
    for r, rank in enumerate(ranks):
        for shape in rank[f"{name}-fsdp2-{key}"]:
            owners[shape] = r
    return owners


def test_muon_bytes_per_step(ranks):
    """Bytes each rank sends per step (counted at ``all_to_all_single``): its rows of the
    matrices the other rank owns, then the other rank's rows of the matrices it owns, in
    ns_dtype (float64, 8 B; "muon-default": bfloat16, 2 B): Σ over matrices of (rows the
    non-owner holds)·cols·size in all. Under DDP nothing is exchanged."""
    for name, size in (("muon", 8), ("e-muon", 8), ("muon-plain", 8), ("muon-default", 2)):
        owners = _owner_of(ranks, name, "ns")
        for r, rank in enumerate(ranks):
            want = 0
            for rows, cols in MATRICES.values():
                ns_shape = (min(rows, cols), max(rows, cols))
                sizes = _chunk_rows(rows)
                other = 1 - r
                if owners[ns_shape] == r:
                    want += sizes[other] * cols * size  # the other rank's rows of my results
                else:
                    want += sizes[r] * cols * size  # my rows, to the owner
            sent = rank[f"{name}-fsdp2-sent"]
            assert len(sent) == 2 * STEPS
            assert sum(sent) == want * STEPS, name
            assert rank[f"{name}-ddp-sent"] == []


def _blocks(rows: int, cols: int) -> tuple[int, int, int]:
    """Shampoo's blocking, written out: ``count`` blocks of ``r × c``."""
    row_parts, col_parts = -(-rows // BLOCK), -(-cols // BLOCK)
    return row_parts * col_parts, -(-rows // row_parts), -(-cols // col_parts)


def test_shampoo_bytes_per_step(ranks):
    """Per step every rank sends its rows of G, m̂ and A of every matrix (3·rows·cols·8);
    at the 2 refresh steps each owner sends its matrices' roots (count·(r² + c²)·8)."""
    shapes = MATRICES
    param_shapes = {"l1": (5, 6), "l2": (7, 5), "l3": (3, 7), "head": (1, 3),
                    "mix": (3, 2, 3)}
    owners = {}
    for r, rank in enumerate(ranks):
        for shape in rank["shampoo-fsdp2-roots"]:
            owners[shape] = r
    for r, rank in enumerate(ranks):
        gather = sum(3 * _chunk_rows(m)[r] * n * 8 for m, n in shapes.values())
        roots = 0
        for name, (m, n) in shapes.items():
            if owners[param_shapes[name]] == r:
                count, rr, cc = _blocks(m, n)
                roots += count * (rr * rr + cc * cc) * 8
        assert sum(rank["shampoo-fsdp2-sent"]) == STEPS * gather + 2 * roots


def test_fsdp2_state_placement(ranks):
    """Muon's momentum stays a DTensor (sharded: DCP saves each rank's rows). Shampoo's
    statistics and roots are replicated: bit-identical on both ranks (DCP saves one copy)
    and equal to the single process's (float64, rtol 1e-9 as above)."""
    for rank in ranks:
        assert rank["muon-fsdp2-state"] == [{"momentum_buffer": "DTensor"}] * 5
    model = _model()
    optimizer = OPTIMIZERS["shampoo"](model.parameters())
    _train(model, optimizer, range(STEPS), None)
    want = _matrix_state(optimizer)
    assert len(want) == 5
    for name in ("shampoo", "shampoo-eigenbasis"):
        states = [rank[f"{name}-fsdp2-state"] for rank in ranks]
        for a, b in zip(*states):
            assert set(a) == set(b)
            for key in a:
                assert torch.equal(a[key], b[key]), (name, key)
        if name == "shampoo-eigenbasis":  # the owners' refreshed bases reached every rank
            assert all(set(second_order.BASIS_KEYS) <= set(a) for a in states[0])
    for got, expected in zip(ranks[0]["shampoo-fsdp2-state"], want):
        for key in second_order.MATRIX_KEYS:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-9, atol=1e-12)


def test_fsdp2_checkpoints_resume_bit_exactly(ranks):
    """Sharded and full optimizer state dicts and DCP save/load, each followed by 2 steps:
    the resumed FSDP2 run equals the uninterrupted one bit for bit on every rank (the same
    collectives on the same inputs; Shampoo's replicated statistics load into every rank)."""
    for rank in ranks:
        failed = sorted(k for k, ok in rank["checkpoints"].items() if not ok)
        assert not failed, failed
        assert len(rank["checkpoints"]) == len(CHECKPOINTS)


# -- the owners module, in process ---------------------------------------------------------


def test_row_slices_follow_torch_chunk():
    for rows in range(0, 20):
        for world in range(1, 6):
            want = [len(c) for c in torch.arange(rows).chunk(world)] if rows else []
            want += [0] * (world - len(want))
            got = _owners.row_slices(rows, world)
            assert [size for _, size in got] == want, (rows, world)
            starts = [sum(want[:r]) for r in range(world)]
            assert [start for start, _ in got] == starts, (rows, world)


def test_assign_is_a_balanced_partition():
    costs = [_owners.muon_cost(m, n) for m, n in [(64, 64), (64, 64), (32, 128), (8, 8),
                                                   (128, 16), (5, 6)]]
    for world in (1, 2, 3, 4, 8):
        owners = _owners.assign(costs, world)
        assert owners == _owners.assign(list(costs), world)  # deterministic
        assert all(0 <= o < world for o in owners)
        loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(world)]
        # LPT's bound: the makespan is within 4/3 of the best (≥ max(mean, largest job))
        best = max(sum(costs) / world, max(costs))
        assert max(loads) <= 4 / 3 * best + 1e-9
    # two equal jobs on two ranks go to different ranks
    assert sorted(_owners.assign([5.0, 5.0], 2)) == [0, 1]
    with pytest.raises(ValueError, match="world"):
        _owners.assign([1.0], 0)


def test_muon_cost():
    assert _owners.muon_cost(4, 6) == 4 * 6 * 4
    assert _owners.muon_cost(6, 4) == 6 * 4 * 4


def test_unsupported_placements_raise_before_anything_moves(ranks):
    for rank in ranks:
        for name in ("muon", "shampoo"):
            assert "Shard(0) over one mesh dimension" in rank["placements"][name]
            assert "Shard(dim=1)" in rank["placements"][name]
            assert rank["placements"][f"{name}-unchanged"] is True
