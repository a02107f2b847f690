"""Flatness of a minimum: the top of the Hessian spectrum and its trace, from Hessian-vector
products only (the dense Hessian is never formed).

For a loss ``f`` over parameters ``θ`` (a list of tensors) with Hessian ``H = ∇²f(θ)``:

- :func:`hvp`: ``H v`` by double backpropagation, ``H v = ∇_θ ⟨∇_θ f(θ), v⟩``;
- :func:`top_hessian_eigenvalue`: ``λ_max(H)`` by the Lanczos method (with full
  reorthogonalisation) or by power iteration;
- :func:`hessian_eigenvalues`: the ``k`` largest eigenvalues by Lanczos;
- :func:`hutchinson_trace`: ``tr H ≈ (1/m) Σ_i z_iᵀ H z_i`` with Rademacher (or Gaussian)
  probes ``z_i`` (``E[z zᵀ] = I``, so the estimate is unbiased);
- :func:`model_loss` / :func:`model_top_eigenvalue` / :func:`model_hessian_trace`: the same
  for ``criterion(model(inputs), targets)`` over a model's parameters.

These are analysis tools run outside the training loop: they read results on the host.
The paper plots ``‖H‖₂`` (Figure 3) but does not say how it computed it;
Lanczos on HVPs is the standard method (as in PyHessian).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "HessianOperator",
    "hessian_eigenvalues",
    "hutchinson_trace",
    "hvp",
    "model_hessian_trace",
    "model_loss",
    "model_top_eigenvalue",
    "top_hessian_eigenvalue",
]

LossFn = Callable[[], Tensor]


def _as_params(params: Tensor | Sequence[Tensor]) -> list[Tensor]:
    params = [params] if isinstance(params, Tensor) else list(params)
    if not params:
        raise ValueError("params is empty")
    for i, p in enumerate(params):
        if not p.requires_grad:
            raise ValueError(f"params[{i}] does not require grad; the Hessian needs autograd")
    return params


class HessianOperator:
    """``v ↦ H v`` for ``H = ∇²loss_fn()`` over ``params``, on flat float64 vectors.

    The gradient graph is built once (``create_graph=True``); every product is one more
    backward pass through it. Vectors are flat (``n = Σ numel``) in float64 whatever the
    parameters' dtype, so Lanczos coefficients accumulate in double precision.
    """

    def __init__(self, loss_fn: LossFn, params: Tensor | Sequence[Tensor]) -> None:
        self.params = _as_params(params)
        with torch.enable_grad():
            loss = loss_fn()
            if loss.dim() != 0:
                raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
            self._grads = torch.autograd.grad(loss, self.params, create_graph=True)
        self.numel = sum(p.numel() for p in self.params)
        self.device = self.params[0].device

    def split(self, v: Tensor) -> list[Tensor]:
        """A flat vector as tensors shaped (and typed) like the parameters."""
        out, offset = [], 0
        for p in self.params:
            out.append(v[offset : offset + p.numel()].view_as(p).to(p.dtype))
            offset += p.numel()
        return out

    def __call__(self, v: Tensor) -> Tensor:
        with torch.enable_grad():
            products = torch.autograd.grad(
                self._grads,
                self.params,
                grad_outputs=self.split(v),
                retain_graph=True,
                allow_unused=True,
            )
        return torch.cat(
            [
                (torch.zeros_like(p) if h is None else h).reshape(-1).to(torch.float64)
                for p, h in zip(self.params, products)
            ]
        )


def hvp(
    loss_fn: LossFn, params: Tensor | Sequence[Tensor], vectors: Sequence[Tensor]
) -> list[Tensor]:
    """``H v`` with ``v`` given as tensors shaped like ``params`` (double backpropagation)."""
    operator = HessianOperator(loss_fn, params)
    flat = torch.cat([v.reshape(-1).to(torch.float64) for v in vectors]).to(operator.device)
    return operator.split(operator(flat))


def _start_vector(n: int, seed: int, device: torch.device) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=generator, dtype=torch.float64).to(device)
    return v / v.norm()


def _lanczos(
    operator: HessianOperator, iters: int, tol: float, seed: int, k: int, both_ends: bool = False
) -> Tensor:
    """Ritz values (ascending) after Lanczos with full reorthogonalisation.

    Stops when the residual bound ``|β_j s_j|`` of each of the ``k`` largest Ritz pairs (and
    of the smallest one with ``both_ends``) is below ``tol·max(|θ|, 1e-12)``, at an invariant
    subspace, or after ``iters`` steps.
    """
    n = operator.numel
    steps = min(iters, n)
    basis = torch.empty(steps, n, dtype=torch.float64, device=operator.device)
    alphas: list[float] = []
    betas: list[float] = []
    q = _start_vector(n, seed, operator.device)
    beta = 0.0
    ritz = torch.zeros(0, dtype=torch.float64)
    for j in range(steps):
        basis[j] = q
        w = operator(q)
        alpha = float(w @ q)
        # Full reorthogonalisation (twice is enough) against the whole basis.
        for _ in range(2):
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        alphas.append(alpha)
        beta = float(w.norm())
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        ritz, vectors = torch.linalg.eigh(T)
        top = min(k, j + 1)
        index = list(range(j + 1 - top, j + 1)) + ([0] if both_ends else [])
        residuals = (beta * vectors[-1, index]).abs()
        scale = ritz[index].abs().clamp_min(1e-12)
        converged = j + 1 >= k and bool((residuals <= tol * scale).all())
        if converged or beta <= 1e-12 * max(1.0, float(ritz.abs().max())):
            break
        betas.append(beta)
        q = w / beta
    return ritz


def _power(operator: HessianOperator, iters: int, tol: float, seed: int) -> float:
    """Power iteration: the eigenvalue of largest magnitude (Rayleigh quotient)."""
    v = _start_vector(operator.numel, seed, operator.device)
    estimate = 0.0
    for _ in range(iters):
        w = operator(v)
        new = float(w @ v)
        norm = float(w.norm())
        if norm == 0.0:
            return 0.0
        v = w / norm
        if abs(new - estimate) <= tol * max(abs(new), 1e-12):
            return new
        estimate = new
    return estimate


def top_hessian_eigenvalue(
    loss_fn: LossFn,
    params: Tensor | Sequence[Tensor],
    iters: int = 100,
    tol: float = 1e-6,
    seed: int = 0,
    method: str = "lanczos",
    which: str = "largest",
) -> float:
    """The top eigenvalue of ``H = ∇²loss_fn()`` over ``params``, from HVPs only.

    Args:
        loss_fn: ``() -> scalar loss`` computed from ``params``.
        params: a tensor or list of tensors that require grad.
        iters: at most this many HVPs (Lanczos steps or power iterations).
        tol: relative tolerance (Lanczos: residual bound ``|β_j s_j| ≤ tol·|θ|`` of the top
            Ritz pair; power: relative change of the Rayleigh quotient).
        seed: seed of the random start vector.
        method: ``"lanczos"`` (default; converges in far fewer HVPs) or ``"power"``.
        which: ``"largest"`` — the largest algebraic eigenvalue ``λ_max``; or
            ``"magnitude"`` — the one of largest magnitude (``‖H‖₂`` up to sign). Power
            iteration always finds the one of largest magnitude.
    """
    if which not in ("largest", "magnitude"):
        raise ValueError(f"which must be 'largest' or 'magnitude', got {which!r}")
    if iters < 1 or not tol > 0:
        raise ValueError(f"iters must be >= 1 and tol > 0, got iters={iters}, tol={tol}")
    operator = HessianOperator(loss_fn, params)
    if method == "power":
        return _power(operator, iters, tol, seed)
    if method != "lanczos":
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    if which == "largest":
        return float(_lanczos(operator, iters, tol, seed, k=1)[-1])
    # Largest magnitude: run to convergence of both ends of the spectrum.
    ritz = _lanczos(operator, iters, tol, seed, k=1, both_ends=True)
    return float(ritz[-1] if abs(float(ritz[-1])) >= abs(float(ritz[0])) else ritz[0])


def hessian_eigenvalues(
    loss_fn: LossFn,
    params: Tensor | Sequence[Tensor],
    k: int = 5,
    iters: int = 200,
    tol: float = 1e-6,
    seed: int = 0,
) -> Tensor:
    """The ``k`` largest eigenvalues of the Hessian (descending, float64) by Lanczos."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    operator = HessianOperator(loss_fn, params)
    ritz = _lanczos(operator, max(iters, k), tol, seed, k=k)
    return ritz.flip(0)[:k]


def hutchinson_trace(
    loss_fn: LossFn,
    params: Tensor | Sequence[Tensor],
    samples: int = 100,
    seed: int = 0,
    distribution: str = "rademacher",
    return_stderr: bool = False,
) -> float | tuple[float, float]:
    """Hutchinson's estimate ``tr H ≈ (1/m) Σ_i z_iᵀ H z_i`` from ``m = samples`` HVPs.

    Rademacher probes (``±1`` entries) give the least variance,
    ``Var(zᵀHz) = 2 Σ_{i≠j} H_ij²`` (exact for a diagonal ``H``); ``"gaussian"`` probes give
    ``2 ‖H‖_F²``. With ``return_stderr`` also returns the standard error of the mean.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if distribution not in ("rademacher", "gaussian"):
        raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")
    operator = HessianOperator(loss_fn, params)
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(samples):
        if distribution == "rademacher":
            z = torch.randint(0, 2, (operator.numel,), generator=generator).to(torch.float64)
            z = 2 * z - 1
        else:
            z = torch.randn(operator.numel, generator=generator, dtype=torch.float64)
        z = z.to(operator.device)
        values.append(float(z @ operator(z)))
    mean = math.fsum(values) / samples
    if not return_stderr:
        return mean
    if samples == 1:
        return mean, math.inf
    variance = math.fsum((v - mean) ** 2 for v in values) / (samples - 1)
    return mean, math.sqrt(variance / samples)


# -- models ---------------------------------------------------------------------------------


def model_loss(
    model: torch.nn.Module,
    criterion: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
) -> LossFn:
    """``() -> criterion(model(inputs), targets)``: the full-batch loss as a closure."""

    def loss_fn() -> Tensor:
        return criterion(model(inputs), targets)

    return loss_fn


def _trainable(model: torch.nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def model_top_eigenvalue(
    model: torch.nn.Module,
    criterion: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    **kwargs,
) -> float:
    """:func:`top_hessian_eigenvalue` of the full-batch loss over the model's parameters."""
    return top_hessian_eigenvalue(
        model_loss(model, criterion, inputs, targets), _trainable(model), **kwargs
    )


def model_hessian_trace(
    model: torch.nn.Module,
    criterion: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    **kwargs,
) -> float | tuple[float, float]:
    """:func:`hutchinson_trace` of the full-batch loss over the model's parameters."""
    return hutchinson_trace(
        model_loss(model, criterion, inputs, targets), _trainable(model), **kwargs
    )
