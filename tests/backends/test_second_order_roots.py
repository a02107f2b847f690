"""Shampoo's inverse roots (issue 13): accuracy on rank-deficient statistics at the smallest
documented ridge per dtype, the float64 retry of eigh, the Newton guard, keeping the previous
root, eigenbasis reuse, and old state dicts."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import backends.second_order as second_order
from backends import Shampoo
from backends.second_order import compute_block_roots, matrix_inverse_root

# The documented limits (Shampoo's docstring, matrix_inverse_root): roots within 1e-3 of
# the exact root for eps >= 3e-5 in float32 and >= 1e-10 in float64.
SMALLEST_EPS = {torch.float32: 3e-5, torch.float64: 1e-10}


def _exact_root(a: np.ndarray, eps: float) -> np.ndarray:
    """(A + ρI)^{-1/4}, ρ = eps·‖A‖_F, in float64 from the definition (A is PSD). torch's
    float64 eigh on one thread (numpy's multi-threaded LAPACK took 0.9 s CPU per 256 × 256
    on the shared test machine)."""
    a64 = torch.from_numpy(np.asarray(a, dtype=np.float64))
    rho = eps * torch.linalg.matrix_norm(a64)
    w, q = torch.linalg.eigh(a64)
    return ((q * (w.clamp_min(0.0) + rho) ** -0.25) @ q.T).numpy()


def _rank_deficient(n: int, rank: int, seed: int) -> np.ndarray:
    """G Gᵀ of an n × rank Gaussian G: what a few early gradients give (rank ≤ steps)."""
    g = np.random.default_rng(seed).standard_normal((n, rank))
    return g @ g.T


CASES = [(16, (1, 2)), (64, (1, 4, 8)), (256, (1, 16, 32))]  # ranks 1 … n/8


@pytest.mark.parametrize("method", ["eigh", "newton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_roots_of_rank_deficient_statistics_at_the_smallest_documented_eps(method, dtype):
    eps = SMALLEST_EPS[dtype]
    for n, ranks in CASES:
        stats = [_rank_deficient(n, rank, seed=n + rank) for rank in ranks]
        batch = torch.tensor(np.stack(stats), dtype=dtype)
        roots = matrix_inverse_root(batch, 4, eps=eps, method=method).double().numpy()
        for rank, a, root in zip(ranks, batch.double().numpy(), roots):
            assert np.isfinite(root).all(), (n, rank)
            exact = _exact_root(a, eps)
            error = np.linalg.norm(root - exact) / np.linalg.norm(exact)
            assert error < 1e-3, (n, rank, error)


def test_newton_guard_keeps_the_previous_root_where_the_iteration_fails():
    """float32 at eps = 1e-8 (condition numbers 1e8): the unguarded iteration returned
    non-finite or wrong roots in most trials. The guard (‖M − I‖ and finiteness, on the
    device) selects the previous root for those matrices and only those."""
    eps = 1e-8
    good = torch.tensor(_rank_deficient(16, 16, 0) + np.eye(16), dtype=torch.float32)
    bad = torch.tensor(_rank_deficient(16, 1, 1), dtype=torch.float32)
    previous = torch.stack([torch.eye(16), 2 * torch.eye(16)])
    roots = matrix_inverse_root(
        torch.stack([good, bad]), 4, eps=eps, method="newton", previous=previous
    )
    assert torch.equal(roots[1], previous[1])
    exact = _exact_root(good.double().numpy(), eps)
    assert np.linalg.norm(roots[0].double().numpy() - exact) / np.linalg.norm(exact) < 1e-3
    # without a previous root: the last finite iterate, finite
    alone = matrix_inverse_root(bad[None], 4, eps=eps, method="newton")
    assert torch.isfinite(alone).all()


def test_eigh_retries_in_float64_when_float32_fails(monkeypatch):
    """torch raises when eigh does not converge: the batch is redone in float64."""
    a = torch.tensor(_rank_deficient(16, 2, 3), dtype=torch.float32)
    eigh = torch.linalg.eigh
    calls = []

    def failing_in_float32(matrix):
        calls.append(matrix.dtype)
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.eigh: the algorithm failed to converge")
        return eigh(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", failing_in_float32)
    root = matrix_inverse_root(a[None], 4, eps=1e-6)
    assert calls == [torch.float32, torch.float64]
    exact = _exact_root(a.double().numpy(), 1e-6)
    assert np.linalg.norm(root[0].double().numpy() - exact) / np.linalg.norm(exact) < 1e-5


def test_eigh_retries_in_float64_on_negative_eigenvalues_where_eigh_synchronises(monkeypatch):
    """An eigenvalue below −eps·‖A‖ (a float32 decomposition that lost the small eigenvalues):
    on CUDA (where eigh already synchronised) that matrix is redone in float64. Simulated on
    CPU: the device list includes "cpu", and float32 eigh returns a spoiled spectrum for the
    second matrix only."""
    eps = 1e-6
    stats = torch.tensor(np.stack([_rank_deficient(8, 8, 4), _rank_deficient(8, 2, 5)]),
                         dtype=torch.float32)
    eigh = torch.linalg.eigh

    def spoiled(matrix):
        w, q = eigh(matrix)
        if matrix.dtype == torch.float32:
            w = w.clone()
            w[1, 0] = -1e-3 * torch.linalg.matrix_norm(matrix[1])  # well below −eps·‖A‖
        return w, q

    monkeypatch.setattr(torch.linalg, "eigh", spoiled)
    monkeypatch.setattr(second_order, "_EIGH_SYNC_DEVICES", ("cuda", "cpu"))
    roots = matrix_inverse_root(stats, 4, eps=eps)
    for a, root in zip(stats.double().numpy(), roots.double().numpy()):
        exact = _exact_root(a, eps)
        assert np.linalg.norm(root - exact) / np.linalg.norm(exact) < 1e-5
    # on a device whose eigh does not synchronise nothing is read: the spoiled value is
    # clamped to 0, and the result differs (this is what the retry repairs)
    monkeypatch.setattr(second_order, "_EIGH_SYNC_DEVICES", ("cuda",))
    clamped = matrix_inverse_root(stats, 4, eps=eps)
    assert torch.equal(clamped[0], roots[0]) and not torch.allclose(clamped[1], roots[1])


@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_rank_deficient_early_gradients_never_make_a_parameter_nonfinite(method):
    """Rank-1 gradients for the first steps (the usual start of training), roots every step
    from step 1 at matrix_eps = 1e-8, below the documented float32 limit: before the guard,
    ``Shampoo(root_method="newton", matrix_eps=1e-8)`` had NaN parameters within 12 steps."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=generator).requires_grad_() for s in [(64, 32), (16, 16)]]
    optimizer = Shampoo(params, lr=1e-2, matrix_eps=1e-8, precondition_frequency=1,
                        start_preconditioning_step=1, root_method=method, grafting="none")
    for step in range(16):
        for p in params:
            if step < 8:  # rank one: u vᵀ
                u = torch.randn(p.shape[0], 1, generator=generator)
                v = torch.randn(1, p.shape[1], generator=generator)
                p.grad = u @ v
            else:
                p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
        for p in params:
            assert torch.isfinite(p).all(), (method, step)
        for p in params:
            for key in ("left_root", "right_root"):
                assert torch.isfinite(optimizer.state[p][key]).all(), (method, step, key)


def test_a_failed_recomputation_keeps_the_previous_root_unless_told_otherwise():
    """Newton at matrix_eps = 1e-8 on a rank-1 float32 statistic fails (the guard's
    ‖M − I‖ test): with keep_root_on_failure (default) the roots stay the previous ones (the
    identity they start as) bit for bit; without it they are the last finite iterate."""
    roots = {}
    for keep in (True, False):
        p = torch.zeros(16, 16, requires_grad=True)
        optimizer = Shampoo([p], matrix_eps=1e-8, precondition_frequency=1,
                            start_preconditioning_step=1, root_method="newton",
                            keep_root_on_failure=keep)
        u = torch.randn(16, 1, generator=torch.Generator().manual_seed(0))
        p.grad = u @ u.T
        optimizer.step()
        roots[keep] = optimizer.state[p]["left_root"]
    assert torch.equal(roots[True], torch.eye(16)[None])
    assert torch.isfinite(roots[False]).all() and not torch.equal(roots[False], roots[True])


# -- eigenbasis reuse ---------------------------------------------------------------------


def _drifting(n: int, steps: int, seed: int, drift: float = 1e-2) -> list[np.ndarray]:
    """S_k = Q_k diag(λ) Q_kᵀ with Q_k = Q₀·exp(k·drift·K) (K skew): a slowly rotating
    eigenbasis, eigenvalues log-spaced over 4 decades."""
    rng = np.random.default_rng(seed)
    q0, _ = np.linalg.qr(rng.standard_normal((n, n)))
    k = rng.standard_normal((n, n))
    k = (k - k.T) / np.sqrt(n)
    w = np.logspace(0, -4, n)
    import scipy.linalg

    out = []
    for step in range(steps):
        q = q0 @ scipy.linalg.expm(step * drift * k)
        out.append((q * w) @ q.T)
    return out


def test_eigenbasis_reuse_tracks_the_full_root_on_slowly_drifting_statistics():
    """One full eigh at step 0, then one QR power iteration per step for 10 steps: the root
    stays within 1e-2 (relative, Frobenius) of the full-eigh root of each step's statistic
    (measured: 0.08-0.1 %). Without the refresh (the step-0 basis kept, Rayleigh quotients
    in it) the error grows to 4.5 % after one step and 32 % after ten: the test can tell."""
    eps = 1e-4
    stats = _drifting(32, 11, seed=0)
    first = torch.tensor(stats[0])[None]
    previous = torch.eye(32, dtype=torch.float64)[None]
    root, basis = compute_block_roots(
        first, previous, eps=eps, method="eigh", newton_iterations=40, keep_on_failure=True,
        basis=torch.eye(32, dtype=torch.float64)[None], full=True,
    )
    frozen = basis.clone()
    errors, frozen_errors = [], []
    for s in stats[1:]:
        a = torch.tensor(s)[None]
        root, basis = compute_block_roots(
            a, root, eps=eps, method="eigh", newton_iterations=40, keep_on_failure=True,
            basis=basis, full=False,
        )
        exact = _exact_root(s, eps)
        errors.append(np.linalg.norm(root[0].numpy() - exact) / np.linalg.norm(exact))
        # a stale basis without its power iteration: Rayleigh quotients in the old basis
        w = (frozen[0] * (a[0] @ frozen[0])).sum(0)
        stale = (frozen[0] * (w.clamp_min(0) + eps * np.linalg.norm(s)) ** -0.25) @ frozen[0].T
        frozen_errors.append(np.linalg.norm(stale.numpy() - exact) / np.linalg.norm(exact))
    assert max(errors) < 1e-2, errors
    assert max(frozen_errors) > 1e-2, frozen_errors


def test_shampoo_with_eigenbasis_reuse_stays_close_to_full_eigh():
    """Two runs on the same noisy gradients, roots every step from step 8 (summed
    statistics drift by about 1/t per step): full eigh every step, and one full eigh (step 8)
    then QR refreshes only (steps 9-19). Their roots agree to 1e-2 relative at step 19."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(12, 8, generator=generator, dtype=torch.float64)
    runs = {}
    for reuse in (0, 100):
        p = torch.zeros(12, 8, dtype=torch.float64, requires_grad=True)
        optimizer = Shampoo([p], lr=1e-3, precondition_frequency=1, start_preconditioning_step=8,
                            reuse_eigenbasis=reuse, matrix_eps=1e-4)
        noise = torch.Generator().manual_seed(1)
        for _ in range(19):
            p.grad = base + 0.1 * torch.randn(12, 8, generator=noise, dtype=torch.float64)
            optimizer.step()
        runs[reuse] = optimizer.state[p]
    for key in ("left_root", "right_root"):
        full, reused = runs[0][key], runs[100][key]
        error = (torch.linalg.matrix_norm(reused - full) / torch.linalg.matrix_norm(full)).max()
        assert error < 1e-2, (key, error.item())
    assert "left_basis" in runs[100] and "left_basis" not in runs[0]


# -- old state dicts ----------------------------------------------------------------------

NEW_SETTINGS = ("grafting_beta2", "reuse_eigenbasis", "keep_root_on_failure",
                "momentum_position")


def _steps(optimizer, params, steps):
    for step in steps:
        for p in params:
            generator = torch.Generator().manual_seed(step)
            p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        optimizer.step()


def test_a_state_dict_from_before_these_settings_loads_with_its_old_behaviour():
    """A group saved without grafting_beta2 (the statistics' β₂ graded Adam then), nor the
    other new settings, continues exactly as the old optimizer would: bit-equal to a run
    with those settings spelled out."""
    old_settings = dict(betas=(0.9, 0.999), grafting_beta2=0.999, keep_root_on_failure=False,
                        precondition_frequency=2, start_preconditioning_step=2)
    params = [torch.randn(6, 5, generator=torch.Generator().manual_seed(0)).requires_grad_()]
    reference = Shampoo(params, lr=1e-2, **old_settings)
    _steps(reference, params, range(3))
    saved = copy.deepcopy(reference.state_dict())
    for group in saved["param_groups"]:
        for key in NEW_SETTINGS:
            del group[key]
    twins = [p.detach().clone().requires_grad_() for p in params]
    resumed = Shampoo(twins, lr=1e-2)  # today's defaults; the saved groups win
    resumed.load_state_dict(saved)
    group = resumed.param_groups[0]
    assert group["grafting_beta2"] == 0.999 and group["keep_root_on_failure"] is False
    assert group["reuse_eigenbasis"] == 0 and group["momentum_position"] == "before"
    _steps(reference, params, range(3, 7))
    _steps(resumed, twins, range(3, 7))
    assert all(torch.equal(p, q) for p, q in zip(params, twins))
    # switching eigenbasis reuse on mid-run creates the bases at the next recomputation
    group["reuse_eigenbasis"] = 2
    _steps(resumed, twins, range(7, 10))
    assert resumed.state[twins[0]]["left_basis"].shape == (1, 6, 6)
    resumed.load_state_dict(resumed.state_dict())
