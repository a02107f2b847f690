"""Toy problems with known minima, as torch functions any optimizer here can train on.

Every problem is a :class:`Landscape`: a loss over a parameter tensor of shape ``(..., dim)``
(leading dimensions are a batch, so one call evaluates a whole contour grid), a start point,
its known minima with their values, plotting bounds and a description::

    from theory import landscapes
    land = landscapes.get("ring_valley")
    theta = land.start_param()                       # a fresh leaf tensor, requires_grad
    loss = land.loss(theta)                          # 0-d tensor
    Z = land.loss_grid(X, Y)                         # 2-D landscapes: contours
    path = landscapes.trajectory(land, lambda p: torch.optim.SGD(p, lr=0.05), steps=500)

The registry :data:`LANDSCAPES` maps names to factories; :func:`get` builds one with keyword
overrides (``get("quadratic", dim=20, condition=1e3, seed=3)``).

Problems:

- ``quadratic``: ``f(θ) = ½ (θ-θ*)ᵀ A (θ-θ*)``, ``A`` random SPD with eigenvalues log-spaced
  in ``[1/κ, 1]`` (condition number ``κ``); minimum ``θ*``, value 0.
- ``logistic``: L2-regularised logistic regression on a seeded synthetic data set; strongly
  convex, its minimiser found by Newton's method in float64 at construction.
- ``rosenbrock``: ``(a-x)² + b(y-x²)²``; minimum ``(a, a²)``, value 0; a curved valley.
- ``beale``: ``Σᵢ (cᵢ - x + x yⁱ)²``, ``c = (1.5, 2.25, 2.625)``; minimum ``(3, 0.5)``, value 0.
- ``rastrigin``: ``10 n + Σ (θᵢ² - 10 cos 2πθᵢ)``; minimum 0 at the origin, a local minimum
  near every integer point.
- ``ring_valley``: the demo of the paper's Figure 1 (its exact test function is not published):
  a circular valley ``r = 1`` whose floor carries several local minima of different depth;
  plain SGD/Adam stop in the first one they reach, the explored versions (α < 0) go on
  along the valley and end lower. :attr:`Landscape.demo` has the settings that show it.
- ``cardioid``: the square of a cardioid's implicit polynomial, zero on the whole curve: the
  shape of Figure 1 (left); every point of the curve is a global minimum.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = [
    "LANDSCAPES",
    "DemoSettings",
    "Landscape",
    "Minimum",
    "beale",
    "cardioid",
    "get",
    "logistic",
    "names",
    "quadratic",
    "rastrigin",
    "ring_valley",
    "rosenbrock",
    "trajectory",
]


@dataclass(frozen=True)
class Minimum:
    """A known minimiser ``point`` with its loss ``value``; ``kind`` is "global" or "local"."""

    point: tuple[float, ...]
    value: float
    kind: str = "global"


@dataclass(frozen=True)
class DemoSettings:
    """Settings under which the explored optimizers (α < 0) end lower than their bases.

    ``lr`` maps a base name (``"SGD"``: plain ``torch.optim.SGD``, ``"Adam"``) to its learning
    rate; the explored optimizer ``E-<name>`` uses the same learning rate with
    ``E(base, alpha, beta)``. All four start at ``start`` and run ``steps`` full-batch steps.
    """

    start: tuple[float, ...]
    steps: int
    lr: dict[str, float]
    alpha: float
    beta: float

    def optimizers(self) -> dict[str, Callable[[Sequence[Tensor]], Optimizer]]:
        """``{"SGD", "E-SGD", "Adam", "E-Adam"}`` → ``factory(params) -> Optimizer``."""
        from adaptor import E

        bases: dict[str, Callable[[Sequence[Tensor], float], Optimizer]] = {
            "SGD": lambda p, lr: torch.optim.SGD(p, lr=lr),
            "Adam": lambda p, lr: torch.optim.Adam(p, lr=lr),
        }
        factories: dict[str, Callable[[Sequence[Tensor]], Optimizer]] = {}
        for name, lr in self.lr.items():
            base = bases[name]
            factories[name] = lambda p, base=base, lr=lr: base(p, lr)
            factories[f"E-{name}"] = lambda p, base=base, lr=lr: E(
                base(p, lr), alpha=self.alpha, beta=self.beta
            )
        return factories


@dataclass(frozen=True)
class Landscape:
    """A toy problem: ``loss(θ)`` over ``θ`` of shape ``(..., dim)``, with known minima.

    Attributes:
        name: registry name.
        fn: the loss; maps ``(..., dim)`` to ``(...)``, in the dtype and device of ``θ``.
        dim: the number of parameters.
        start: the default starting point.
        minima: the known minima (the global one first).
        bounds: ``((lo, hi), ...)`` per coordinate, for plots of 2-D landscapes.
        description: what the problem is and where its minima are.
        convex: the loss is convex.
        demo: for valley landscapes, the settings of the exploration demo.
        extras: problem data (e.g. ``"hessian"`` of a quadratic, ``"X"``/``"y"`` of logistic).
    """

    name: str
    fn: Callable[[Tensor], Tensor] = field(repr=False)
    dim: int
    start: tuple[float, ...]
    minima: tuple[Minimum, ...]
    bounds: tuple[tuple[float, float], ...]
    description: str = ""
    convex: bool = False
    demo: DemoSettings | None = None
    extras: dict[str, Any] = field(default_factory=dict, repr=False)

    def loss(self, theta: Tensor) -> Tensor:
        """The loss at ``θ`` (shape ``(..., dim)`` → ``(...)``)."""
        if theta.shape[-1] != self.dim:
            raise ValueError(
                f"landscape {self.name!r} takes parameters of shape (..., {self.dim}), "
                f"got {tuple(theta.shape)}"
            )
        return self.fn(theta)

    __call__ = loss

    def loss_grid(self, X: Tensor | np.ndarray, Y: Tensor | np.ndarray) -> Tensor:
        """The loss on a grid of a 2-D landscape: ``Z[i, j] = loss((X[i, j], Y[i, j]))``."""
        if self.dim != 2:
            raise ValueError(f"loss_grid needs a 2-D landscape, {self.name!r} has dim {self.dim}")
        X = torch.as_tensor(X)
        Y = torch.as_tensor(Y, dtype=X.dtype)
        with torch.no_grad():
            return self.fn(torch.stack([X, Y], dim=-1))

    def grad(self, theta: Tensor) -> Tensor:
        """``∇f(θ)`` for one point ``θ`` of shape ``(dim,)`` (autograd)."""
        theta = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.fn(theta), theta)
        return g

    def start_param(
        self, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
    ) -> Tensor:
        """A fresh leaf tensor at :attr:`start` that requires grad."""
        return torch.tensor(self.start, dtype=dtype, device=device, requires_grad=True)

    @property
    def global_minimum(self) -> Minimum:
        """The known minimum of least value."""
        return min(self.minima, key=lambda m: m.value)


def trajectory(
    landscape: Landscape,
    make_optimizer: Callable[[Sequence[Tensor]], Optimizer],
    steps: int,
    start: Sequence[float] | Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Run ``steps`` full-batch steps from ``start``; return the ``(steps + 1, dim)`` path.

    ``make_optimizer(params)`` builds the optimizer on the single parameter tensor; each step
    computes the loss, backpropagates and calls ``optimizer.step()``.
    """
    if start is None:
        start = landscape.start
    theta = torch.as_tensor(start, dtype=dtype).detach().clone().requires_grad_(True)
    optimizer = make_optimizer([theta])
    path = torch.empty(steps + 1, landscape.dim, dtype=dtype)
    path[0] = theta.detach()
    for k in range(steps):
        optimizer.zero_grad()
        landscape.loss(theta).backward()
        optimizer.step()
        path[k + 1] = theta.detach()
    return path


# -- helpers ------------------------------------------------------------------------------


def _const(array: Any, like: Tensor) -> Tensor:
    return torch.as_tensor(array, dtype=like.dtype, device=like.device)


def _roots_1d(fn: Callable[[np.ndarray], np.ndarray], lo: float, hi: float, n: int) -> list[float]:
    """All roots of a smooth scalar ``fn`` on ``[lo, hi)``: sign changes on a grid of ``n``
    points, each bisected to float64 precision (vectorised over the brackets)."""
    grid = np.linspace(lo, hi, n)
    values = fn(grid)
    exact = grid[:-1][values[:-1] == 0.0]
    change = values[:-1] * values[1:] < 0
    left, right = grid[:-1][change], grid[1:][change]
    f_left = values[:-1][change]
    for _ in range(80):
        mid = 0.5 * (left + right)
        f_mid = fn(mid)
        same = np.sign(f_mid) == np.sign(f_left)
        left, f_left = np.where(same, mid, left), np.where(same, f_mid, f_left)
        right = np.where(same, right, mid)
    return sorted([*exact.tolist(), *(0.5 * (left + right)).tolist()])


def _grad_hessian(fn: Callable[[Tensor], Tensor], theta: Tensor) -> tuple[Tensor, Tensor]:
    """Gradient and dense Hessian of a scalar ``fn`` at a small ``θ`` (double backward)."""
    theta = theta.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(fn(theta), theta, create_graph=True)
        rows = [torch.autograd.grad(g[i], theta, retain_graph=True)[0] for i in range(len(g))]
    return g.detach(), torch.stack(rows)


def _newton_minimum(fn: Callable[[Tensor], Tensor], point: Sequence[float]) -> Tensor:
    """Refine a minimiser of a smooth low-dimensional function by Newton steps in float64."""
    theta = torch.tensor(point, dtype=torch.float64)
    for _ in range(60):
        g, H = _grad_hessian(fn, theta)
        step = torch.linalg.solve(H, g)
        theta = theta - step
        if float(step.abs().max()) < 1e-13:
            break
    return theta


# -- convex problems ------------------------------------------------------------------------


def quadratic(dim: int = 10, condition: float = 100.0, seed: int = 0) -> Landscape:
    """Random SPD quadratic ``½ (θ-θ*)ᵀ A (θ-θ*)`` with ``cond(A) = condition``.

    ``A = Q diag(λ) Qᵀ``, ``Q`` a seeded random orthogonal matrix, ``λ`` log-spaced in
    ``[1/condition, 1]``; ``θ*`` and the start are seeded standard normal vectors. Extras:
    ``"hessian"`` (``A``, float64), ``"eigenvalues"`` (ascending), ``"minimizer"``.
    """
    if dim < 1 or not condition >= 1.0:
        raise ValueError(f"quadratic needs dim >= 1 and condition >= 1, got {dim}, {condition}")
    generator = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    Q = Q * torch.sign(torch.diagonal(R))
    eigenvalues = torch.logspace(-math.log10(condition), 0.0, dim, dtype=torch.float64)
    A = (Q * eigenvalues) @ Q.T
    A = (A + A.T) / 2
    minimizer = torch.randn(dim, generator=generator, dtype=torch.float64)
    start = minimizer + torch.randn(dim, generator=generator, dtype=torch.float64)

    def fn(theta: Tensor) -> Tensor:
        d = theta - _const(minimizer, theta)
        return 0.5 * torch.einsum("...i,ij,...j->...", d, _const(A, theta), d)

    return Landscape(
        name="quadratic",
        fn=fn,
        dim=dim,
        start=tuple(start.tolist()),
        minima=(Minimum(tuple(minimizer.tolist()), 0.0),),
        bounds=tuple((float(m) - 3.0, float(m) + 3.0) for m in minimizer),
        description=(
            f"½(θ-θ*)ᵀA(θ-θ*), A SPD, eigenvalues log-spaced in [{1 / condition:g}, 1] "
            f"(condition {condition:g}), seed {seed}; minimum θ*, value 0"
        ),
        convex=True,
        extras={"hessian": A, "eigenvalues": eigenvalues, "minimizer": minimizer},
    )


def logistic(
    n_samples: int = 200, dim: int = 5, weight_decay: float = 1e-2, seed: int = 0
) -> Landscape:
    """L2-regularised logistic regression ``mean log(1 + exp(-y xᵀθ)) + (λ/2)‖θ‖²``.

    Data: ``x ~ N(0, I)`` with a bias feature of ones, labels ``y = ±1`` drawn from the
    logistic model of a seeded ``w``; ``dim`` counts the bias. The minimiser (unique: the
    loss is ``λ``-strongly convex) is computed by Newton's method in float64.
    """
    if dim < 2 or n_samples < 1 or not weight_decay > 0:
        raise ValueError("logistic needs dim >= 2, n_samples >= 1 and weight_decay > 0")
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n_samples, dim - 1, generator=generator, dtype=torch.float64)
    X = torch.cat([features, torch.ones(n_samples, 1, dtype=torch.float64)], dim=1)
    w_true = torch.randn(dim, generator=generator, dtype=torch.float64)
    p = torch.sigmoid(X @ w_true)
    y = torch.where(torch.rand(n_samples, generator=generator, dtype=torch.float64) < p, 1.0, -1.0)

    def fn(theta: Tensor) -> Tensor:
        margins = (theta @ _const(X, theta).T) * _const(y, theta)
        data = torch.nn.functional.softplus(-margins).mean(dim=-1)
        return data + 0.5 * weight_decay * (theta * theta).sum(dim=-1)

    minimizer = torch.zeros(dim, dtype=torch.float64)
    minimizer = _newton_minimum(fn, minimizer.tolist())
    value = float(fn(minimizer))
    return Landscape(
        name="logistic",
        fn=fn,
        dim=dim,
        start=(0.0,) * dim,
        minima=(Minimum(tuple(minimizer.tolist()), value),),
        bounds=tuple((float(m) - 3.0, float(m) + 3.0) for m in minimizer),
        description=(
            f"logistic regression, {n_samples} samples, {dim} weights (with bias), "
            f"L2 {weight_decay:g}, seed {seed}; minimum by Newton's method, value {value:.6g}"
        ),
        convex=True,
        extras={"X": X, "y": y, "weight_decay": weight_decay, "minimizer": minimizer},
    )


# -- non-convex classics --------------------------------------------------------------------


def rosenbrock(a: float = 1.0, b: float = 100.0) -> Landscape:
    """``(a - x)² + b (y - x²)²``: a curved parabolic valley; minimum ``(a, a²)``, value 0."""

    def fn(theta: Tensor) -> Tensor:
        x, y = theta[..., 0], theta[..., 1]
        return (a - x) ** 2 + b * (y - x * x) ** 2

    return Landscape(
        name="rosenbrock",
        fn=fn,
        dim=2,
        start=(-1.5, 2.0),
        minima=(Minimum((a, a * a), 0.0),),
        bounds=((-2.0, 2.0), (-1.0, 3.0)),
        description=f"(a-x)² + b(y-x²)², a={a:g}, b={b:g}; minimum ({a:g}, {a * a:g}), value 0",
    )


def beale() -> Landscape:
    """``(1.5 - x + xy)² + (2.25 - x + xy²)² + (2.625 - x + xy³)²``; minimum ``(3, 0.5)``, 0."""

    def fn(theta: Tensor) -> Tensor:
        x, y = theta[..., 0], theta[..., 1]
        return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2

    return Landscape(
        name="beale",
        fn=fn,
        dim=2,
        start=(1.0, 1.0),
        minima=(Minimum((3.0, 0.5), 0.0),),
        bounds=((-4.5, 4.5), (-4.5, 4.5)),
        description="Beale's function; minimum (3, 0.5), value 0",
    )


def rastrigin(dim: int = 2, amplitude: float = 10.0) -> Landscape:
    """``A·n + Σ (θᵢ² - A cos 2πθᵢ)``: minimum 0 at the origin, local minima near integers."""

    def fn(theta: Tensor) -> Tensor:
        return amplitude * dim + (theta * theta - amplitude * torch.cos(2 * math.pi * theta)).sum(
            dim=-1
        )

    return Landscape(
        name="rastrigin",
        fn=fn,
        dim=dim,
        start=(2.3,) * dim,
        minima=(Minimum((0.0,) * dim, 0.0),),
        bounds=((-5.12, 5.12),) * dim,
        description=f"Rastrigin, n={dim}, A={amplitude:g}; global minimum 0 at the origin",
    )


# -- valley landscapes (the paper's Figure 1) -----------------------------------------------


def ring_valley(
    wall: float = 5.0, tilt: float = 0.5, ripple: float = 0.1, wells: int = 6
) -> Landscape:
    """A circular valley with a washboard floor: ``w (r-1)² + h(φ)`` in polar coordinates,
    ``h(φ) = t (1 + cos φ) + ρ (1 - cos nφ)``.

    The valley ``r = 1`` is exact (``∂f/∂r = 2w(r-1)``); along it the floor ``h`` falls from
    ``2t`` at ``φ = 0`` to ``0`` at ``φ = ±π`` through local minima at the roots of
    ``h'(φ) = -t sin φ + nρ sin nφ`` where ``h'' > 0``. With the defaults the minima, as
    ``(φ, loss)``: ``(0, 1.0)``, ``(±1.195, 0.720)``, ``(±2.216, 0.225)``, ``(π, 0)`` — the
    global minimum is ``(-1, 0)``. The loss is undefined only at the origin (far from the
    valley). ``demo``: from ``(1.3 cos 0.75, 1.3 sin 0.75)``, 1000 steps, plain SGD and Adam
    stop in the well at ``φ ≈ 1.2`` while E-SGD/E-Adam with ``α = -90, β = 0.99`` go on.
    """
    t, rho, n = tilt, ripple, wells

    def fn(theta: Tensor) -> Tensor:
        x, y = theta[..., 0], theta[..., 1]
        r = torch.sqrt(x * x + y * y)
        phi = torch.atan2(y, x)
        return wall * (r - 1) ** 2 + t * (1 + torch.cos(phi)) + rho * (1 - torch.cos(n * phi))

    def dh(phi: np.ndarray) -> np.ndarray:
        return -t * np.sin(phi) + n * rho * np.sin(n * phi)

    def d2h(phi: float) -> float:
        return -t * math.cos(phi) + n * n * rho * math.cos(n * phi)

    minima = []
    # One period, starting off the critical points φ = 0 and φ = ±π (h' vanishes there for
    # every parameter choice), so that each root shows as a sign change and is found once.
    offset = 0.5 * math.pi / n
    for phi in _roots_1d(dh, -math.pi + offset, math.pi + offset, 20001):
        if d2h(phi) > 0:
            value = t * (1 + math.cos(phi)) + rho * (1 - math.cos(n * phi))
            minima.append((value, (math.cos(phi), math.sin(phi))))
    minima.sort()
    best = minima[0][0]
    start_phi, start_r = 0.75, 1.3
    return Landscape(
        name="ring_valley",
        fn=fn,
        dim=2,
        start=(start_r * math.cos(start_phi), start_r * math.sin(start_phi)),
        minima=tuple(
            Minimum(point, value, "global" if value == best else "local") for value, point in minima
        ),
        bounds=((-1.8, 1.8), (-1.8, 1.8)),
        description=(
            f"circular valley r=1 (walls {wall:g}(r-1)²) whose floor "
            f"{t:g}(1+cos φ) + {rho:g}(1-cos {n}φ) has {len(minima)} minima of "
            f"{len({round(v, 9) for v, _ in minima})} depths; global minimum (-1, 0), value 0"
        ),
        demo=DemoSettings(
            start=(start_r * math.cos(start_phi), start_r * math.sin(start_phi)),
            steps=1000,
            lr={"SGD": 0.05, "Adam": 0.02},
            alpha=-90.0,
            beta=0.99,
        ),
    )


def cardioid(scale: float = 1.0) -> Landscape:
    """The square of a cardioid: ``f = C(x, y)²``, ``C = (x²+y²-ax)² - a²(x²+y²)``.

    ``C = 0`` exactly on the cardioid ``r = a(1 + cos φ)`` (cusp at the origin), so ``f`` has
    a curved valley of zero loss: every point of the curve is a (non-strict, flat along the
    curve) global minimum of value 0. This is our reading of the paper's Figure 1 (left),
    "the square of the cardioid" (its formula is not published). :attr:`minima` lists sample
    points of the curve at ``φ = 0, ±π/3, ±2π/3`` and the cusp; the whole curve is minimal.
    There is no ``demo``: with no floor to descend along, every optimizer stops where it
    reaches the curve; ``ring_valley`` is the exploration demo.
    """
    a = scale

    def fn(theta: Tensor) -> Tensor:
        x, y = theta[..., 0], theta[..., 1]
        r2 = x * x + y * y
        c = (r2 - a * x) ** 2 - a * a * r2
        return c * c

    samples = [0.0, math.pi / 3, -math.pi / 3, 2 * math.pi / 3, -2 * math.pi / 3, math.pi]
    minima = tuple(
        Minimum(
            (a * (1 + math.cos(phi)) * math.cos(phi), a * (1 + math.cos(phi)) * math.sin(phi)),
            0.0,
        )
        for phi in samples
    )
    return Landscape(
        name="cardioid",
        fn=fn,
        dim=2,
        start=(1.5 * a, 1.5 * a),
        minima=minima,
        bounds=((-1.0 * a, 2.5 * a), (-1.75 * a, 1.75 * a)),
        description=(
            f"squared cardioid C², C=(x²+y²-{a:g}x)²-{a:g}²(x²+y²); zero loss on the whole "
            f"curve r={a:g}(1+cos φ) (global minima, value 0)"
        ),
    )


LANDSCAPES: dict[str, Callable[..., Landscape]] = {
    "quadratic": quadratic,
    "logistic": logistic,
    "rosenbrock": rosenbrock,
    "beale": beale,
    "rastrigin": rastrigin,
    "ring_valley": ring_valley,
    "cardioid": cardioid,
}


def names() -> list[str]:
    """The registered landscape names."""
    return list(LANDSCAPES)


def get(name: str, **kwargs: Any) -> Landscape:
    """Build the landscape ``name`` with its factory's keyword arguments."""
    try:
        factory = LANDSCAPES[name]
    except KeyError:
        raise ValueError(f"unknown landscape {name!r}; known: {', '.join(LANDSCAPES)}") from None
    return factory(**kwargs)
