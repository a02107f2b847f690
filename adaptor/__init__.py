"""The exploration adaptor E (Zhao et al., NeurIPS 2025) for any PyTorch optimizer.

    opt = E(torch.optim.AdamW(model.parameters(), lr=1e-3), alpha=-5, beta=0.99)
    opt = explore(Autograd(), torch.optim.AdamW(model.parameters()), **preset(batch_size=4096))

The base optimizer is fed ``g̃_k = g_k + α·a_k`` with ``a_k = β·a_{k-1} + (1-β)·(g_k - g_{k-1})``.
"""

from adaptor.estimators import Autograd, GradEstimator
from adaptor.explore import E, ExploredOptimizer, explore
from adaptor.presets import preset
from adaptor.replacement import check_alpha_beta

__all__ = [
    "Autograd",
    "E",
    "ExploredOptimizer",
    "GradEstimator",
    "check_alpha_beta",
    "explore",
    "preset",
]
