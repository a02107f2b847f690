"""The admissible α interval and the computable quantities of the paper's theorems.

Notation: β is the persistence factor (the paper's β₁), ``s = 1-β``;
β₂, β₃ are the moment factors of ALTO; ε₁ is added outside the square root; ``G∞`` bounds
the gradients. The paper's theorem statements were only partly legible in the copy we worked from:
quantities marked *reconstructed* follow our best reading
and are not a verified transcription. Everything else here is either the paper's explicit
condition or proven in ``theory/README.md``.
"""

from __future__ import annotations

import math

from adaptor.replacement import check_alpha_beta

__all__ = [
    "alpha_bound",
    "alpha_interval",
    "check_alpha_beta",
    "convex_schedules",
    "effective_weights",
    "is_admissible",
    "moment_ratio_ok",
    "replaced_gradient_bound",
    "theorem1_mu",
    "theorem1_step_size_bound",
    "theorem1_weight_decay",
]


def _check_beta(beta: float) -> float:
    return check_alpha_beta(0.0, beta)[1]


def alpha_bound(beta: float) -> float:
    """``1/(1-β)``: the admissible ``|α|`` is strictly below it (Remark 2.2)."""
    return 1.0 / (1.0 - _check_beta(beta))


def alpha_interval(beta: float) -> tuple[float, float]:
    """The open interval ``(-1/(1-β), 1/(1-β))`` of admissible α for ``0 <= β < 1``.

    Raises ``ValueError`` for β outside ``[0, 1)`` (the adaptor's own check). The adaptor
    refuses any α outside this interval (``adaptor.replacement.check_alpha_beta``).
    """
    bound = alpha_bound(beta)
    return -bound, bound


def is_admissible(alpha: float, beta: float) -> bool:
    """Whether the adaptor accepts ``(α, β)``: ``0 <= β < 1`` and ``|α| < 1/(1-β)``."""
    try:
        check_alpha_beta(alpha, beta)
    except (ValueError, TypeError):
        return False
    return True


def effective_weights(alpha: float, beta: float, k: int) -> list[float]:
    """Weights ``w_0..w_{k-1}`` with ``g̃_k = Σ_j w_j g_{k-j}`` (``g_0 = a_0 = 0``).

    Unrolling ``a_k = (1-β) Σ_{j<k} β^j (g_{k-j} - g_{k-j-1})`` gives (README, identity 2)::

        g̃_k = (1 + α s) g_k − α s² Σ_{j=1}^{k-1} β^{j-1} g_{k-j}

    so ``w_0 = 1 + αs`` and ``w_j = -α s² β^{j-1}``. For ``-1/s < α <= 0`` all weights are
    non-negative and sum to at most 1: α < 0 averages the current gradient with an EMA of
    past ones. For ``α > 0`` the past enters with negative weight (extrapolation).
    """
    alpha, beta = check_alpha_beta(alpha, beta)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    s = 1.0 - beta
    return [1.0 + alpha * s] + [-alpha * s * s * beta ** (j - 1) for j in range(1, k)]


def replaced_gradient_bound(alpha: float, beta: float) -> float:
    """``C(α, β) = |1 + αs| + |α| s``: ``‖g̃_k‖ <= C · max_{j<=k} ‖g_j‖`` in any norm.

    From :func:`effective_weights`: ``Σ_j |w_j| <= |1+αs| + |α| s² Σ β^{j-1} <= |1+αs| + |α|s``.
    For ``α <= 0`` (admissible) this is exactly 1 — the replacement never enlarges the
    gradient; for ``α > 0`` it is ``1 + 2αs < 3``. With ``‖g‖∞ <= G∞/16`` (Assumption 3.3)
    this gives ``‖g̃‖∞ < 3G∞/16 <= G∞``, the first bound of the paper's Lemma 3.
    """
    alpha, beta = check_alpha_beta(alpha, beta)
    s = 1.0 - beta
    return abs(1.0 + alpha * s) + abs(alpha) * s


# -- Theorem 1 (non-convex, ALTO Vanilla) ---------------------------------------------------


def theorem1_mu(beta3: float, grad_bound: float, eps1: float) -> float:
    """``μ = √(1-β₃) · G∞ / ε₁``; Theorem 1 requires ``μ <= 1`` (paper's explicit condition).

    In the appendix's swapped convention this reads ``√β₃ G∞/ε₁ < 1``.
    """
    if not 0.0 <= beta3 < 1.0 or not grad_bound >= 0 or not eps1 > 0:
        raise ValueError("theorem1_mu needs 0 <= beta3 < 1, grad_bound >= 0, eps1 > 0")
    return math.sqrt(1.0 - beta3) * grad_bound / eps1


def theorem1_weight_decay(weight_decay: float, mu: float, k: int) -> float:
    """``λ_k = λ (1-μ)^k``: the geometrically decaying weight decay Theorem 1 assumes."""
    if not 0.0 <= mu <= 1.0:
        raise ValueError(f"mu must lie in [0, 1] (Theorem 1), got {mu}")
    return weight_decay * (1.0 - mu) ** k


def theorem1_step_size_bound(
    eps1: float,
    eps2_hat: float,
    eps3: float,
    beta2: float,
    dim: int,
    smoothness: float,
    grad_bound: float,
) -> float:
    """*Reconstructed*: ``η <= √(ε₁³ ε̂₂⁴ ε₃² (1-β₂)² / (6 d L² G∞))``.

    Our reading of the garbled display of Theorem 1 (most likely
    ``η² <= ε₁³ ε̂₂⁴ ε₃² (1-β₂)² / (6 d L² G∞)``); ``ε̂₂`` is defined in preliminaries we
    could not read. Treat as indicative of the scaling only: the bound is tiny for the
    paper's ε values, which is why practice ignores it.
    """
    if min(eps1, eps2_hat, eps3, smoothness, grad_bound) <= 0 or dim < 1:
        raise ValueError("theorem1_step_size_bound needs positive eps, L, G and dim >= 1")
    if not 0.0 <= beta2 < 1.0:
        raise ValueError(f"beta2 must satisfy 0 <= beta2 < 1, got {beta2}")
    numerator = eps1**3 * eps2_hat**4 * eps3**2 * (1.0 - beta2) ** 2
    return math.sqrt(numerator / (6.0 * dim * smoothness**2 * grad_bound))


# -- Theorem 2 (convex, online regret) ------------------------------------------------------


def convex_schedules(
    lr: float, alpha: float, weight_decay: float, k: int
) -> tuple[float, float, float]:
    """``(η_k, α_k, λ_k) = (η/√k, α/√k, λ/√k)``: the schedules of Theorem 2 at step ``k >= 1``.

    The theorem needs ``α_k <= α/√k`` (a decaying α) and ``λ_k <= λ/√k``; these are the
    largest admissible choices. Practice keeps α constant, which the theorem does not cover.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    root = math.sqrt(k)
    return lr / root, alpha / root, weight_decay / root


def moment_ratio_ok(beta2: float, beta3: float) -> bool:
    """Theorem 2's condition ``β₂²/β₃ < 1`` (Lemma 10), ``β₂`` first, ``β₃`` second moment."""
    if not (0.0 <= beta2 < 1.0 and 0.0 < beta3 < 1.0):
        raise ValueError(f"need 0 <= beta2 < 1 and 0 < beta3 < 1, got {beta2}, {beta3}")
    return beta2 * beta2 / beta3 < 1.0
