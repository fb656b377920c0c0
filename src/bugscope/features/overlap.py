"""Overlap of the top-k feature sets of the two formats, per prompt pair and pooled, summarised per layer.

Definitions (also in config/README.md):
- shared / buggy_only / correct_only: sizes of the intersection and of the two differences of the
  two top-k sets of a pair; overlap_pct = 100 * shared / k; jaccard = shared / |union| (null when
  both sets are empty).
- amplification: mean over the shared features of value_buggy / value_correct. Shared features
  have value > 0 in both formats, so no ratio divides by zero; a pair without shared features has
  no amplification (null) and is left out of that column's mean.
- pooled variant (the seed's): top-k of the format-mean value vectors (mean over every prompt of
  the format, absent = 0), then the same statistics; one number per layer, no CI.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import polars as pl

from bugscope.config import ConfigError
from bugscope.features.values import top_k
from bugscope.stats import _interval, _nanmean_axis1, bootstrap_indices


def _set_statistics(joined: pl.DataFrame, by: str, k: int) -> pl.DataFrame:
    """Overlap statistics per `by` group of a full join of two top-k sets (value_buggy, value_correct)."""
    both = pl.col("value_buggy").is_not_null() & pl.col("value_correct").is_not_null()
    return (joined.group_by(by).agg(
        both.sum().cast(pl.Int32).alias("shared"),
        (pl.col("value_buggy").is_not_null() & pl.col("value_correct").is_null()).sum().cast(pl.Int32).alias("buggy_only"),
        (pl.col("value_correct").is_not_null() & pl.col("value_buggy").is_null()).sum().cast(pl.Int32).alias("correct_only"),
        pl.col("value_buggy").is_not_null().sum().cast(pl.Int32).alias("n_top_buggy"),
        pl.col("value_correct").is_not_null().sum().cast(pl.Int32).alias("n_top_correct"),
        (pl.col("value_buggy") / pl.col("value_correct")).filter(both).mean().alias("amplification"),
    ))


def _finish_overlap(stats: pl.DataFrame, k: int) -> pl.DataFrame:
    union = pl.col("shared") + pl.col("buggy_only") + pl.col("correct_only")
    return stats.with_columns(
        (100.0 * pl.col("shared") / k).alias("overlap_pct"),
        pl.when(union > 0).then(pl.col("shared") / union).otherwise(None).alias("jaccard"),
    )


def pair_overlap(values: pl.DataFrame, pairs: pl.DataFrame, k: int) -> pl.DataFrame:
    """Per prompt pair: shared, buggy_only, correct_only, n_top_*, overlap_pct, jaccard, amplification.

    `values` holds prompt_id, feature_id, value; every pair of `pairs` gets a row, also when one or
    both of its prompts have no active feature.
    """
    top = top_k(values, k).select("prompt_id", "feature_id", "value")
    buggy = pairs.select("question_id", "prompt_id_buggy").join(
        top, left_on="prompt_id_buggy", right_on="prompt_id").select(
        "question_id", "feature_id", pl.col("value").alias("value_buggy"))
    correct = pairs.select("question_id", "prompt_id_correct").join(
        top, left_on="prompt_id_correct", right_on="prompt_id").select(
        "question_id", "feature_id", pl.col("value").alias("value_correct"))
    joined = buggy.join(correct, on=["question_id", "feature_id"], how="full", coalesce=True)
    stats = _set_statistics(joined, "question_id", k)
    out = pairs.select("question_id", "pair_id").join(stats, on="question_id", how="left").with_columns(
        pl.col("shared", "buggy_only", "correct_only", "n_top_buggy", "n_top_correct").fill_null(0))
    return _finish_overlap(out, k).sort("question_id")


def pooled_overlap(values: pl.DataFrame, pairs: pl.DataFrame, k: int) -> dict:
    """The seed's variant: top-k of the format-mean value vectors (absent = 0), one row of statistics."""
    n = pairs.height

    def mean_vector(col: str) -> pl.DataFrame:
        return (pairs.select(pl.col(col).alias("prompt_id")).join(values, on="prompt_id")
                .group_by("feature_id").agg((pl.col("value").sum() / n).alias("value"))
                .with_columns(pl.lit(0).alias("group")))

    top_b = top_k(mean_vector("prompt_id_buggy"), k, by="group").select("group", "feature_id", pl.col("value").alias("value_buggy"))
    top_c = top_k(mean_vector("prompt_id_correct"), k, by="group").select("group", "feature_id", pl.col("value").alias("value_correct"))
    joined = top_b.join(top_c, on=["group", "feature_id"], how="full", coalesce=True)
    stats = _set_statistics(joined, "group", k)
    if stats.height == 0:
        stats = pl.DataFrame({"group": [0], "shared": [0], "buggy_only": [0], "correct_only": [0],
                              "n_top_buggy": [0], "n_top_correct": [0], "amplification": [None]},
                             schema_overrides={"amplification": pl.Float64})
    return _finish_overlap(stats, k).drop("group").row(0, named=True)


OVERLAP_STATS = ("overlap_pct", "jaccard", "amplification", "shared", "buggy_only", "correct_only")


def middle_layers(layers: Sequence[int], num_layers: int, fraction: Sequence[float]) -> list[int]:
    """Analysed layers whose index lies in [lo * num_layers, hi * num_layers]."""
    lo, hi = fraction
    return [layer for layer in layers if lo * num_layers <= layer <= hi * num_layers]


def summarise_overlap(per_pair: pl.DataFrame, pooled: pl.DataFrame, *, k: int, num_layers: int,
                      middle_fraction: Sequence[float], n_resamples: int, confidence: float,
                      seed: int) -> pl.DataFrame:
    """Per layer: the per-pair means with bootstrap CIs over pairs, and the pooled variant.

    One bootstrap draw of pairs is shared by all layers, so `argmin_frequency` (the fraction of
    resamples in which a layer has the smallest mean overlap) and `argmax_middle_frequency` (the
    same for the largest among the middle layers) say how certain the two marks are.
    """
    layers = sorted(per_pair["layer"].unique().to_list())
    mids = middle_layers(layers, num_layers, middle_fraction)
    wide = {stat: per_pair.pivot(on="layer", index="question_id", values=stat, sort_columns=False)
            .sort("question_id").select([str(layer) for layer in layers]).to_numpy().astype(np.float64)
            for stat in OVERLAP_STATS}
    n_pairs = wide["overlap_pct"].shape[0]
    idx = bootstrap_indices(n_pairs, n_resamples, seed)
    rows = {"layer": layers}
    for stat, mat in wide.items():
        # [n_resamples, n_layers]; NaN entries (jaccard, amplification) are left out of each mean.
        resampled = _nanmean_axis1(mat[idx])
        low, high = _interval(resampled, confidence)
        rows[stat] = _nanmean_axis1(mat[None])[0]
        rows[f"{stat}_low"], rows[f"{stat}_high"] = low, high
        if stat == "overlap_pct":
            boot_overlap = resampled
    rows["n_pairs_amplification"] = np.isfinite(wide["amplification"]).sum(axis=0)
    # How often each layer is the argmin (all layers) / argmax (middle layers) across resamples.
    argmin = np.bincount(np.argmin(boot_overlap, axis=1), minlength=len(layers)) / n_resamples
    rows["argmin_frequency"] = argmin
    argmax_mid = np.full(len(layers), np.nan)
    if mids:
        cols = [layers.index(m) for m in mids]
        counts = np.bincount(np.argmax(boot_overlap[:, cols], axis=1), minlength=len(cols)) / n_resamples
        argmax_mid[cols] = counts
    rows["argmax_middle_frequency"] = argmax_mid
    summary = pl.DataFrame(rows).with_columns(
        pl.lit("per_pair").alias("variant"), pl.lit(n_pairs).alias("n_pairs"),
        pl.col("layer").is_in(mids).alias("is_middle"))
    mean = summary["overlap_pct"].to_numpy()
    min_layer = layers[int(np.argmin(mean))]
    max_mid = mids[int(np.argmax([mean[layers.index(m)] for m in mids]))] if mids else None
    summary = summary.with_columns(
        (pl.col("layer") == min_layer).alias("is_min_overlap"),
        (pl.col("layer") == max_mid).fill_null(False).alias("is_max_overlap_middle"),
    )
    pooled = pooled.with_columns(
        pl.lit("pooled").alias("variant"), pl.lit(n_pairs).alias("n_pairs"),
        pl.col("layer").is_in(mids).alias("is_middle"),
        pl.lit(False).alias("is_min_overlap"), pl.lit(False).alias("is_max_overlap_middle"))
    out = pl.concat([summary, pooled], how="diagonal_relaxed").with_columns(pl.lit(k).alias("k"))
    order = ["layer", "variant", "k", "n_pairs", "is_middle", "is_min_overlap", "is_max_overlap_middle",
             *[c for s in OVERLAP_STATS for c in (s, f"{s}_low", f"{s}_high")],
             "n_pairs_amplification", "argmin_frequency", "argmax_middle_frequency"]
    return out.select(order).with_columns(pl.col("layer").cast(pl.Int32)).sort("variant", "layer", descending=[True, False])


def resolve_focus_layers(config: dict, overlap: pl.DataFrame | None) -> tuple[list[int], str]:
    """(focus layers, where they came from): the one place that decides them.

    The config's list; or, for "auto", the overlap table's max-overlap middle layer; or, for "auto"
    without an overlap stage, the model's middle layer.
    """
    n = config["model"]["num_layers"]
    if config["focus_layers"] != "auto":
        layers, source = sorted(config["focus_layers"]), "config"
    elif overlap is not None:
        layers = overlap.filter(pl.col("variant") == "per_pair", pl.col("is_max_overlap_middle"))["layer"].to_list()
        if not layers:
            raise ValueError(
                "focus_layers is 'auto' but no analysed layer lies among the middle layers "
                "(features.overlap.middle_fraction): list focus_layers explicitly or analyse more layers.")
        source = "overlap"
    else:
        layers, source = [n // 2], "fallback_middle_layer"
    for layer in layers:
        if not 0 <= layer < n:
            raise ConfigError(f"Focus layer {layer} is outside the model, which has layers 0..{n - 1}. "
                              "Fix 'focus_layers' in the config (or model.num_layers if the model changed).")
    return layers, source


def focus_layers(config: dict, overlap: pl.DataFrame | None = None) -> list[int]:
    """The focus layers of `resolve_focus_layers`."""
    return resolve_focus_layers(config, overlap)[0]
