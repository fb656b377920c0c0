"""Named features (`features.named`): mean value per format, buggy/correct ratio and firing rate per
format, each with its interval over number pairs (the two orders of a pair move together)."""

from __future__ import annotations

import numpy as np
import polars as pl

from bugscope.features.discriminative import interval_columns
from bugscope.features.values import dense_matrix
from bugscope.stats import cluster_bootstrap_mean_ci_columns

NAMED_SCHEMA = {"layer": pl.Int32, "category": pl.String, "feature_id": pl.Int32, "mean_buggy": pl.Float64,
                "mean_correct": pl.Float64, "ratio": pl.Float64, "ratio_low": pl.Float64, "ratio_high": pl.Float64,
                "firing_rate_buggy": pl.Float64, "firing_rate_correct": pl.Float64, "n_pairs": pl.Int32,
                "mean_buggy_low": pl.Float64, "mean_buggy_high": pl.Float64, "mean_correct_low": pl.Float64,
                "mean_correct_high": pl.Float64, "firing_rate_buggy_low": pl.Float64,
                "firing_rate_buggy_high": pl.Float64, "firing_rate_correct_low": pl.Float64,
                "firing_rate_correct_high": pl.Float64}


def named_feature_ids(cfg_named: dict) -> dict[int, dict[str, list[int]]]:
    """features.named with integer layer keys (YAML may give strings or ints)."""
    return {int(layer): {cat: [int(i) for i in ids] for cat, ids in cats.items()} for layer, cats in cfg_named.items()}


def named_features(values: pl.DataFrame, pairs: pl.DataFrame, *, layer: int, named: dict[str, list[int]],
                   n_resamples: int, confidence: float, seed: int) -> pl.DataFrame:
    """Mean value per format, buggy/correct ratio (of means) and firing rate per format, with
    intervals over number pairs: cluster bootstraps for the means and the ratio, exact intervals for
    the firing rates. `n_pairs` is the number of number pairs."""
    cats = [(cat, fid) for cat, ids in named.items() for fid in ids]
    ids = np.array([fid for _, fid in cats], dtype=np.int64)
    a = dense_matrix(values, pairs["prompt_id_buggy"].to_numpy(), ids)
    b = dense_matrix(values, pairs["prompt_id_correct"].to_numpy(), ids)
    number_pair = pairs["pair_id"].to_numpy()
    boot = {"n_resamples": n_resamples, "confidence": confidence, "seed": seed}
    cols = interval_columns(a, b, number_pair, number_pair, boot=boot)
    mean_a = cluster_bootstrap_mean_ci_columns(a, number_pair, **boot)
    mean_b = cluster_bootstrap_mean_ci_columns(b, number_pair, **boot)
    return pl.DataFrame({
        "layer": np.full(len(ids), layer, dtype=np.int32), "category": [c for c, _ in cats],
        "feature_id": ids.astype(np.int32), "mean_buggy": a.mean(axis=0), "mean_correct": b.mean(axis=0),
        "ratio": cols["ratio"], "ratio_low": cols["ratio_low"], "ratio_high": cols["ratio_high"],
        "firing_rate_buggy": (a > 0).mean(axis=0), "firing_rate_correct": (b > 0).mean(axis=0),
        "n_pairs": np.full(len(ids), len(np.unique(number_pair)), dtype=np.int32),
        "mean_buggy_low": mean_a[1], "mean_buggy_high": mean_a[2],
        "mean_correct_low": mean_b[1], "mean_correct_high": mean_b[2],
        "firing_rate_buggy_low": cols["firing_rate_a_low"], "firing_rate_buggy_high": cols["firing_rate_a_high"],
        "firing_rate_correct_low": cols["firing_rate_b_low"], "firing_rate_correct_high": cols["firing_rate_b_high"],
    }, schema=NAMED_SCHEMA).with_columns(pl.col("ratio", "ratio_low", "ratio_high").fill_nan(None))
