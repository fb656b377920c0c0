"""Bootstrap confidence intervals, seeded so that a rerun gives the same interval."""

from __future__ import annotations

import numpy as np


def bootstrap_mean_ci(values, *, n_resamples: int, confidence: float, seed: int) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap of the mean of `values` (1-D). NaN for empty input."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_resamples, x.size))
    means = x[idx].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(x.mean()), float(low), float(high)


def bootstrap_mean_ci_columns(matrix, *, n_resamples: int, confidence: float, seed: int):
    """Column-wise version for an [n, m] array: the same resampled rows for every column.

    Returns three arrays of shape [m]: mean, low, high.
    """
    x = np.asarray(matrix, dtype=np.float64)
    if x.shape[0] == 0:
        nan = np.full(x.shape[1], np.nan)
        return nan, nan.copy(), nan.copy()
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.shape[0], size=(n_resamples, x.shape[0]))
    means = x[idx].mean(axis=1)  # [n_resamples, m]
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha], axis=0)
    return x.mean(axis=0), low, high
