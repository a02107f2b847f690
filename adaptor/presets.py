"""The paper's hyperparameter guidance for the adaptor, by batch size."""

from __future__ import annotations

import numbers

# Sec. 4 "Hyperparameters": batch < 1K explores little and exploits (α > 0, short memory);
# batch >= 1K explores (α < 0) with a long memory.
LARGE_BATCH = 1024
SMALL_BATCH_PRESET = {"alpha": 0.5, "beta": 0.01}
LARGE_BATCH_PRESET = {"alpha": -5.0, "beta": 0.99}


def preset(batch_size: int) -> dict[str, float]:
    """``{"alpha", "beta"}`` for ``batch_size`` following the paper.

    ``batch_size < 1024``: ``α = 0.5, β = 0.01``; otherwise ``α = -5, β = 0.99``. The paper's
    trend is "the larger the batch, the more negative α and the larger β"; tune from here.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
        raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chosen = SMALL_BATCH_PRESET if batch_size < LARGE_BATCH else LARGE_BATCH_PRESET
    return dict(chosen)
