"""The optimizers of the library for the convergence property tests, with tuned settings.

Each :class:`Entry` builds an optimizer over one parameter tensor, with the adaptor
(``alpha``/``beta`` given) or without it (``alpha=None``), and runs ``steps`` steps of a
loss with a learning rate that decays linearly to 10 % of its start (the theorems' decaying
step sizes, and what lets adaptive methods settle instead of hovering at lr scale).
``matrix``: the parameter is a matrix (Muon orthogonalises matrices only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from adaptor import E, explore
from backends.first_order import ALTO, AdaBelief, Lamb
from backends.matrix import Muon
from backends.second_order import Shampoo
from backends.zeroth_order import SPSA


@dataclass(frozen=True)
class Entry:
    """``build(params, lr, alpha, beta)``: ``alpha=None`` builds the optimizer without E."""

    name: str
    build: Callable[..., object]
    lr: float  # for the convex quadratics; test_convergence.NONCONVEX_LR for the others
    zeroth_order: bool = False
    matrix: bool = False


def _explorable(base: Callable[[list[Tensor], float], torch.optim.Optimizer]):
    def build(params, lr, alpha=None, beta=None):
        optimizer = base(params, lr)
        return optimizer if alpha is None else E(optimizer, alpha=alpha, beta=beta)

    return build


def _alto(params, lr, alpha=None, beta=None):
    # ALTO is the adapted Lamb: without the adaptor it is ALTO with α = 0.
    if alpha is None:
        alpha, beta = 0.0, 0.9
    return ALTO(params, lr=lr, betas=(0.9, 0.99), alpha=alpha, beta=beta, weight_decay=0.0)


class _SPSAThenSGD:
    """SPSA estimate then a plain SGD step: the zeroth-order optimizer without E."""

    def __init__(self, params, lr, seed=0):
        self.estimator = SPSA(perturbation=1e-4, samples=4, seed=seed)
        self.base = torch.optim.SGD(params, lr=lr, momentum=0.5)
        self.param_groups = self.base.param_groups

    def step(self, closure):
        loss = self.estimator.estimate(closure, self.base.param_groups)
        self.base.step()
        return loss


def _spsa(params, lr, alpha=None, beta=None):
    if alpha is None:
        return _SPSAThenSGD(params, lr)
    base = torch.optim.SGD(params, lr=lr, momentum=0.5)
    return explore(SPSA(perturbation=1e-4, samples=4, seed=0), base, alpha=alpha, beta=beta)


ENTRIES = [
    Entry("SGD", _explorable(lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9)), 0.05),
    Entry("Adam", _explorable(lambda p, lr: torch.optim.Adam(p, lr=lr)), 0.1),
    Entry("AdamW", _explorable(lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=0.0)), 0.1),
    Entry("Lamb", _explorable(lambda p, lr: Lamb(p, lr=lr)), 0.05),
    Entry("AdaBelief", _explorable(lambda p, lr: AdaBelief(p, lr=lr)), 0.1),
    Entry("ALTO", _alto, 0.05),
    Entry(
        "Muon",
        _explorable(lambda p, lr: Muon(p, lr=lr, momentum=0.9, ns_dtype=torch.float32)),
        0.05,
        matrix=True,
    ),
    Entry("Shampoo", _explorable(lambda p, lr: Shampoo(p, lr=lr)), 0.1),
    Entry("SPSA", _spsa, 0.1, zeroth_order=True),
]


def run(
    entry: Entry,
    loss_fn: Callable[[Tensor], Tensor],
    start: Tensor,
    steps: int,
    lr: float | None = None,
    alpha: float | None = None,
    beta: float | None = None,
    final_fraction: float = 0.1,
) -> tuple[Tensor, float]:
    """Run ``steps`` steps from ``start`` (lr decaying linearly to ``final_fraction·lr``).

    ``loss_fn`` takes the flat parameter vector. Returns the final parameter (flat,
    detached) and ``min_k ‖∇f(θ_k)‖`` over the iterates ``θ_0..θ_T`` (the quantity the
    non-convex theorem bounds, through the mean of ``‖∇f(θ_k)‖²``).
    """
    lr = entry.lr if lr is None else lr
    shape = (start.numel() // 2, 2) if entry.matrix else start.shape
    theta = start.detach().clone().reshape(shape).requires_grad_(True)
    optimizer = entry.build([theta], lr, alpha, beta)
    groups = optimizer.param_groups
    norms: list[Tensor] = []

    def true_grad_norm() -> Tensor:
        with torch.enable_grad():
            (g,) = torch.autograd.grad(loss_fn(theta.reshape(-1)), theta)
        return g.norm()

    for k in range(steps):
        for group in groups:
            group["lr"] = lr * (1.0 - (1.0 - final_fraction) * k / steps)
        if entry.zeroth_order:
            norms.append(true_grad_norm())

            def closure():
                return loss_fn(theta.reshape(-1))

        else:

            def closure():
                optimizer.zero_grad()
                loss = loss_fn(theta.reshape(-1))
                loss.backward()
                norms.append(theta.grad.norm())  # g_k, before the adaptor replaces it
                return loss

        optimizer.step(closure)
    norms.append(true_grad_norm())
    return theta.detach().reshape(-1), float(torch.stack(norms).nan_to_num(float("inf")).min())
