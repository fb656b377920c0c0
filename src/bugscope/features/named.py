"""Named features (`features.named`): mean value per format, buggy/correct ratio with a pair-bootstrap
CI (bugscope.stats.ratio_bootstrap) and firing rate per format."""

from __future__ import annotations

import numpy as np
import polars as pl

from bugscope.features.values import dense_matrix
from bugscope.stats import ratio_bootstrap

NAMED_SCHEMA = {"layer": pl.Int32, "category": pl.String, "feature_id": pl.Int32, "mean_buggy": pl.Float64,
                "mean_correct": pl.Float64, "ratio": pl.Float64, "ratio_low": pl.Float64, "ratio_high": pl.Float64,
                "firing_rate_buggy": pl.Float64, "firing_rate_correct": pl.Float64, "n_pairs": pl.Int32}


def named_feature_ids(cfg_named: dict) -> dict[int, dict[str, list[int]]]:
    """features.named with integer layer keys (YAML may give strings or ints)."""
    return {int(layer): {cat: [int(i) for i in ids] for cat, ids in cats.items()} for layer, cats in cfg_named.items()}


def named_features(values: pl.DataFrame, pairs: pl.DataFrame, *, layer: int, named: dict[str, list[int]],
                   n_resamples: int, confidence: float, seed: int) -> pl.DataFrame:
    """Mean value per format, buggy/correct ratio with a pair-bootstrap CI, firing rate per format."""
    cats = [(cat, fid) for cat, ids in named.items() for fid in ids]
    ids = np.array([fid for _, fid in cats], dtype=np.int64)
    a = dense_matrix(values, pairs["prompt_id_buggy"].to_numpy(), ids)
    b = dense_matrix(values, pairs["prompt_id_correct"].to_numpy(), ids)
    ratio, low, high = ratio_bootstrap(a, b, n_resamples=n_resamples, confidence=confidence, seed=seed)
    return pl.DataFrame({
        "layer": np.full(len(ids), layer, dtype=np.int32), "category": [c for c, _ in cats],
        "feature_id": ids.astype(np.int32), "mean_buggy": a.mean(axis=0), "mean_correct": b.mean(axis=0),
        "ratio": ratio, "ratio_low": low, "ratio_high": high,
        "firing_rate_buggy": (a > 0).mean(axis=0), "firing_rate_correct": (b > 0).mean(axis=0),
        "n_pairs": np.full(len(ids), a.shape[0], dtype=np.int32),
    }).with_columns(pl.col("ratio", "ratio_low", "ratio_high").fill_nan(None))
