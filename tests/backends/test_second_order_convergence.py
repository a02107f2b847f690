"""Shampoo's convergence against tuned Adam and pytorch-optimizer's Shampoo (issue 13).

The problem: f(W) = ½‖A W B − C‖²_F with 8×8 ``A``, ``B`` rotated on both sides and singular
values log-spaced in [1, 10], so that the Hessian (BBᵀ)⊗(AᵀA) has condition number 1e4 and
is not axis-aligned (a diagonal method cannot undo it). Count: steps until f ≤ 1e-3·f(W₀),
at the best learning rate of the grid {1e-3, 3e-3, …, 10}; Shampoo preconditions from step 1
with roots every step. The comparison values (Adam, the summed-statistics Shampoo of
pytorch-optimizer) are computed here, by torch.optim.Adam and by an independent float64
transcription of pytorch-optimizer's algorithm.
"""

from __future__ import annotations

import math

import pytest
import torch

from adaptor import E
from backends import Shampoo

LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0)
MAX_STEPS = 200
TOLERANCE = 1e-3


def _problem(seed: int):
    generator = torch.Generator().manual_seed(seed)
    singular = torch.logspace(0, 1, 8, dtype=torch.float64)  # [1, 10]

    def rotation():
        q, _ = torch.linalg.qr(torch.randn(8, 8, generator=generator, dtype=torch.float64))
        return q

    a = rotation() * singular @ rotation().T
    b = rotation() * singular @ rotation().T
    c = a @ torch.randn(8, 8, generator=generator, dtype=torch.float64) @ b
    return a, b, c


def _steps(make, seed: int, limit: float = MAX_STEPS) -> float:
    """Steps to f ≤ 1e-3·f(0), or inf (not within ``limit`` steps, or diverged)."""
    a, b, c = _problem(seed)
    w = torch.zeros(8, 8, dtype=torch.float64, requires_grad=True)
    optimizer = make([w])

    def loss():
        return 0.5 * ((a @ w @ b - c) ** 2).sum()

    start = loss().item()
    for step in range(1, int(min(limit, MAX_STEPS)) + 1):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
        with torch.no_grad():
            value = loss().item()
        if not value < 1e6 * start:  # diverged (or NaN)
            return math.inf
        if value <= TOLERANCE * start:
            return step
    return math.inf


def _best(factory, seed: int) -> float:
    """The fewest steps over the grid (a run stops once it cannot beat the best so far)."""
    best = math.inf
    for lr in LRS:
        best = min(best, _steps(factory(lr), seed, limit=best))
    return best


class SummedShampoo(torch.optim.Optimizer):
    """pytorch-optimizer's ``Shampoo`` (no momentum, no weight decay), written out: for a
    matrix gradient G, ``L ← L + GGᵀ``, ``R ← R + GᵀG`` from ``L₀ = R₀ = 1e-6·I``, roots by
    an SVD every step, ``W ← W − lr·L^{-1/4} G R^{-1/4}``."""

    def __init__(self, params, lr):
        super().__init__(params, dict(lr=lr))

    @staticmethod
    def _root(matrix):
        u, s, vh = torch.linalg.svd(matrix)
        return (u * s.pow(-0.25)) @ vh

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["L"] = 1e-6 * torch.eye(p.shape[0], dtype=p.dtype)
                    state["R"] = 1e-6 * torch.eye(p.shape[1], dtype=p.dtype)
                g = p.grad
                state["L"] += g @ g.T
                state["R"] += g.T @ g
                p -= group["lr"] * self._root(state["L"]) @ g @ self._root(state["R"])


def _adam(lr):
    return lambda params: torch.optim.Adam(params, lr=lr)


def _shampoo(lr, **options):
    # default settings, except preconditioning from step 1 with roots every step
    return lambda params: Shampoo(
        params, lr=lr, precondition_frequency=1, start_preconditioning_step=1, **options
    )


def _explored(lr):
    return lambda params: E(_shampoo(lr)(params), alpha=0.5, beta=0.01)


def test_the_transcription_takes_pytorch_optimizers_steps():
    peer = pytest.importorskip("pytorch_optimizer")
    for lr in (1.0, 3.0):
        assert _steps(lambda p, lr=lr: SummedShampoo(p, lr), 0) == _steps(
            lambda p, lr=lr: peer.Shampoo(p, lr=lr), 0
        )


@pytest.mark.parametrize("seed", [0, 1])
def test_shampoo_halves_tuned_adams_steps_on_a_rotated_ill_conditioned_quadratic(seed):
    """Measured (seed 0 / 1): Adam 87 / 71 steps; pytorch-optimizer's Shampoo 24 / 17;
    ours with the defaults 22 / 17, under the adaptor 14 / 21. Before (β₂ = 0.999 and β₁ =
    0.9 by default): 55 / 53, no better than Adam."""
    adam = _best(_adam, seed)
    peer = _best(lambda lr: lambda params: SummedShampoo(params, lr), seed)
    ours = _best(_shampoo, seed)
    explored = _best(_explored, seed)
    assert adam < MAX_STEPS
    assert ours <= adam / 2, (ours, adam)
    assert explored <= adam / 2, (explored, adam)
    assert ours <= peer, (ours, peer)  # the defaults have β₂ = 1
    assert Shampoo([torch.zeros(2, 2)]).defaults["betas"][1] == 1.0
