"""Feature analyses on the encoded SAE features: overlap, discriminative and named features, and
the direct attribution of attention heads to SAE features.

Inputs are the sparse feature tables of the SAE stage (`results/features/{hook}.parquet`: one row
per (prompt_id, position, feature_id) with a non-zero activation) and the prompt table. A *prompt
pair* is the buggy-format row and the correct-format row of one `question_id`; every statistic
"over pairs" resamples these pairs.

Value of a feature in a prompt (`features.position`): its activation at the decision position
("decision"), or its mean over the aligned positions ("aligned_mean": the sum over the aligned
positions divided by their number, absent = 0).

Definitions (also in config/README.md):
- top-k set of a prompt: its k features of largest value, among features with value > 0 (ties
  broken by the smaller feature id); it holds fewer than k features when fewer are active.
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

import itertools
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import polars as pl
import torch
from scipy import stats as sps

log = logging.getLogger("bugscope.features")

FEATURES_KIND = "features"
POSITION_MODES = ("decision", "aligned_mean")


def derived_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from the master seed and labels (layer, statistic, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


# --- prompts, pairs and per-prompt feature values ----------------------------------------------


def prompt_pairs(prompts: pl.DataFrame, buggy_format: str, correct_format: str) -> pl.DataFrame:
    """One row per question that has both formats: question_id, pair_id, prompt_id_buggy, prompt_id_correct."""
    sel = prompts.select("prompt_id", "question_id", "pair_id", "format")
    buggy = sel.filter(pl.col("format") == buggy_format).select(
        "question_id", "pair_id", pl.col("prompt_id").alias("prompt_id_buggy"))
    correct = sel.filter(pl.col("format") == correct_format).select(
        "question_id", pl.col("prompt_id").alias("prompt_id_correct"))
    pairs = buggy.join(correct, on="question_id", how="inner").sort("question_id")
    if pairs.height == 0:
        raise ValueError(
            f"The prompt table has no question in both formats {buggy_format!r} and {correct_format!r}: "
            "check prompts.buggy_format, prompts.correct_format and prompts.formats."
        )
    return pairs


def position_weights(prompts: pl.DataFrame, mode: str) -> pl.DataFrame:
    """prompt_id, position, weight: the positions whose weighted sum is a prompt's feature value."""
    if mode == "decision":
        return prompts.select("prompt_id", pl.col("decision_pos").alias("position"), pl.lit(1.0).alias("weight"))
    if mode == "aligned_mean":
        # Position 0 is an attention sink whose SAE code is junk (research notes 3). An aligned
        # index is dropped for every format of a question when it is position 0 in any of them,
        # so the formats still average over the same tokens.
        long = (prompts.select("prompt_id", "question_id", pl.col("aligned_positions").alias("position"))
                .with_columns(pl.int_ranges(pl.col("position").list.len()).alias("index"))
                .explode("position", "index"))
        sink = long.filter(pl.col("position") == 0).select("question_id", "index").unique()
        kept = long.join(sink, on=["question_id", "index"], how="anti")
        return (kept.with_columns((1.0 / pl.len().over("prompt_id")).alias("weight"))
                .select("prompt_id", "position", "weight").sort("prompt_id", "position"))
    raise ValueError(f"features.position is {mode!r}; expected one of {', '.join(POSITION_MODES)}")


def prompt_values(features: pl.DataFrame, weights: pl.DataFrame) -> pl.DataFrame:
    """prompt_id, feature_id, value (> 0 only): the per-prompt feature value of `position_weights`.

    Raises when a required position is missing from the feature table for every prompt, which
    means the cache holds fewer positions than the mode needs.
    """
    weights = weights.with_columns(pl.col("prompt_id").cast(pl.Int32), pl.col("position").cast(pl.Int32))
    cached = features.select("prompt_id", "position").unique()
    needed = weights.select("prompt_id", "position")
    if cached.height and needed.join(cached, on=["prompt_id", "position"], how="semi").height == 0:
        raise ValueError(
            "None of the positions this analysis needs are in the feature table. With "
            "features.position: aligned_mean the cache must hold the aligned positions "
            "(cache.positions: aligned or all)."
        )
    # sorted and order-keeping, so every float sum is taken in the same order on every run
    return (features.join(weights, on=["prompt_id", "position"], how="inner")
            .sort("prompt_id", "feature_id", "position")
            .group_by("prompt_id", "feature_id", maintain_order=True)
            .agg((pl.col("activation").cast(pl.Float64) * pl.col("weight")).sum().alias("value"))
            .filter(pl.col("value") > 0))


def top_k(values: pl.DataFrame, k: int, by: str = "prompt_id") -> pl.DataFrame:
    """The k largest positive values per `by` group (ties: smaller feature id first)."""
    return (values.filter(pl.col("value") > 0)
            .sort([by, "value", "feature_id"], descending=[False, True, False])
            .with_columns(pl.int_range(pl.len()).over(by).alias("rank"))
            .filter(pl.col("rank") < k))


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


# --- bootstrap helpers ------------------------------------------------------------------------


def bootstrap_indices(n: int, n_resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def _interval(resampled: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval per column of [n_resamples, m], ignoring NaN resamples."""
    alpha = (1 - confidence) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanquantile(resampled, [alpha, 1 - alpha], axis=0)
    return low, high


def _nanmean_axis1(x: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=1)


# --- overlap per layer --------------------------------------------------------------------------

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


def focus_layers(config: dict, overlap: pl.DataFrame | None = None) -> list[int]:
    """The configured focus layers, or ("auto") the max-overlap middle layer of the overlap table."""
    if config["focus_layers"] != "auto":
        return sorted(config["focus_layers"])
    if overlap is None:
        raise ValueError("focus_layers is 'auto': the overlap table (results/analysis/overlap.parquet) is needed to resolve it.")
    marked = overlap.filter(pl.col("variant") == "per_pair", pl.col("is_max_overlap_middle"))["layer"].to_list()
    if not marked:
        raise ValueError(
            "focus_layers is 'auto' but no analysed layer lies among the middle layers "
            "(features.overlap.middle_fraction): list focus_layers explicitly or analyse more layers.")
    return marked


# --- discriminative features --------------------------------------------------------------------


def dense_matrix(values: pl.DataFrame, prompt_ids: np.ndarray, feature_ids: np.ndarray) -> np.ndarray:
    """[len(prompt_ids), len(feature_ids)] values (absent = 0), filled by one vectorised scatter."""
    out = np.zeros((len(prompt_ids), len(feature_ids)), dtype=np.float64)
    if values.height == 0 or len(feature_ids) == 0:
        return out
    row_of = pl.DataFrame({"prompt_id": prompt_ids.astype(np.int32), "row": np.arange(len(prompt_ids))})
    col_of = pl.DataFrame({"feature_id": feature_ids.astype(np.int32), "col": np.arange(len(feature_ids))})
    hit = (values.with_columns(pl.col("prompt_id").cast(pl.Int32), pl.col("feature_id").cast(pl.Int32))
           .join(row_of, on="prompt_id").join(col_of, on="feature_id"))
    out[hit["row"].to_numpy(), hit["col"].to_numpy()] = hit["value"].to_numpy()
    return out


def bh_qvalues(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (NaN p-values are treated as 1)."""
    p = np.where(np.isfinite(p), p, 1.0)
    if p.size == 0:
        return p
    return sps.false_discovery_control(p, method="bh")


def paired_test(a: np.ndarray, b: np.ndarray, test: str) -> tuple[np.ndarray, np.ndarray]:
    """Column-wise paired test of a vs b ([n, m] each): (p-value, Cohen's d_z of a - b).

    A column without any non-zero difference gets p = 1 and effect 0.
    """
    d = a - b
    nonzero = (d != 0).any(axis=0)
    p = np.ones(d.shape[1])
    sd = d.std(axis=0, ddof=1) if d.shape[0] > 1 else np.zeros(d.shape[1])
    with np.errstate(all="ignore"):
        effect = np.where(sd > 0, d.mean(axis=0) / sd, 0.0)
    if nonzero.any() and d.shape[0] > 1:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            if test == "wilcoxon":
                res = sps.wilcoxon(d[:, nonzero], axis=0, zero_method="wilcox", method="approx")
            elif test == "ttest":
                res = sps.ttest_rel(a[:, nonzero], b[:, nonzero], axis=0)
            else:
                raise ValueError(f"features.discriminative.test is {test!r}; expected wilcoxon or ttest")
        p[nonzero] = np.where(np.isfinite(res.pvalue), res.pvalue, 1.0)
    return p, effect


def unpaired_test(a: np.ndarray, b: np.ndarray, test: str) -> tuple[np.ndarray, np.ndarray]:
    """Column-wise two-sample test of a ([n_a, m]) vs b ([n_b, m]): (p-value, Cohen's d, pooled SD)."""
    n_a, n_b = a.shape[0], b.shape[0]
    pooled = np.sqrt(((n_a - 1) * a.var(axis=0, ddof=1) + (n_b - 1) * b.var(axis=0, ddof=1)) / (n_a + n_b - 2))
    with np.errstate(all="ignore"):
        effect = np.where(pooled > 0, (a.mean(axis=0) - b.mean(axis=0)) / pooled, 0.0)
    varying = np.concatenate([a, b]).std(axis=0) > 0
    p = np.ones(a.shape[1])
    if varying.any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            if test == "wilcoxon":
                res = sps.mannwhitneyu(a[:, varying], b[:, varying], axis=0, method="asymptotic")
            elif test == "ttest":
                res = sps.ttest_ind(a[:, varying], b[:, varying], axis=0, equal_var=False)
            else:
                raise ValueError(f"features.discriminative.test is {test!r}; expected wilcoxon or ttest")
        p[varying] = np.where(np.isfinite(res.pvalue), res.pvalue, 1.0)
    return p, effect


def _top_rows(layer: int, comparison: str, feature_ids: np.ndarray, a: np.ndarray, b: np.ndarray,
              p: np.ndarray, effect: np.ndarray, *, top_n: int, alpha: float, n_tested: int) -> pl.DataFrame:
    q = bh_qvalues(p)
    table = pl.DataFrame({
        "feature_id": feature_ids.astype(np.int32), "effect_size": effect,
        "mean_a": a.mean(axis=0), "mean_b": b.mean(axis=0),
        "firing_rate_a": (a > 0).mean(axis=0), "firing_rate_b": (b > 0).mean(axis=0),
        "p_value": p, "q_value": q,
    }).with_columns(
        (pl.col("mean_a") - pl.col("mean_b")).alias("mean_diff"),
        pl.when(pl.col("effect_size") > 0).then(pl.lit("up")).when(pl.col("effect_size") < 0)
        .then(pl.lit("down")).otherwise(None).alias("direction"),
    ).filter(pl.col("direction").is_not_null())
    # Ranking: features significant at the FDR level first, by |effect size| (their p-values are
    # often all tiny, so q alone would rank by numerical noise), then the rest by q-value.
    table = (table.with_columns(
                (pl.col("q_value") <= alpha).alias("_sig"),
                pl.when(pl.col("q_value") <= alpha).then(-pl.col("effect_size").abs()).otherwise(pl.col("q_value")).alias("_key"))
             .sort(["direction", "_sig", "_key", "feature_id"], descending=[False, True, False, False])
             .with_columns(pl.int_range(pl.len()).over("direction").cast(pl.Int32).alias("rank"))
             .filter(pl.col("rank") < top_n).drop("_sig", "_key"))
    return table.with_columns(
        pl.lit(layer, pl.Int32).alias("layer"), pl.lit(comparison).alias("comparison"),
        (pl.col("q_value") <= alpha).alias("significant"),
        pl.lit(a.shape[0], pl.Int32).alias("n_a"), pl.lit(b.shape[0], pl.Int32).alias("n_b"),
        pl.lit(n_tested, pl.Int32).alias("n_tested"))


DISCRIMINATIVE_COLUMNS = ["layer", "comparison", "direction", "rank", "feature_id", "effect_size", "mean_diff",
                          "mean_a", "mean_b", "firing_rate_a", "firing_rate_b", "p_value", "q_value",
                          "significant", "n_a", "n_b", "n_tested"]


def discriminative_features(values: pl.DataFrame, pairs: pl.DataFrame, scores: pl.DataFrame, *, layer: int,
                            cfg: dict) -> pl.DataFrame:
    """Top features of one layer per comparison and direction (see config/README.md).

    buggy_vs_correct: paired test across prompt pairs (a = buggy format, b = correct format).
    wrong_vs_right: within the buggy format, prompts answered wrong (a) vs right (b), unpaired.
    Only features firing in at least `min_firing_rate` of the prompts of either side are tested;
    BH-FDR runs over the tested features of the layer and comparison.
    """
    out = []
    buggy_ids = pairs["prompt_id_buggy"].to_numpy()
    correct_ids = pairs["prompt_id_correct"].to_numpy()
    feature_ids = np.sort(values["feature_id"].unique().to_numpy())
    a = dense_matrix(values, buggy_ids, feature_ids)
    b = dense_matrix(values, correct_ids, feature_ids)
    keep = np.maximum((a > 0).mean(axis=0), (b > 0).mean(axis=0)) >= cfg["min_firing_rate"]
    p, effect = paired_test(a[:, keep], b[:, keep], cfg["test"])
    out.append(_top_rows(layer, "buggy_vs_correct", feature_ids[keep], a[:, keep], b[:, keep], p, effect,
                         top_n=cfg["top_n"], alpha=cfg["fdr_alpha"], n_tested=int(keep.sum())))

    answered = pl.DataFrame({"prompt_id": buggy_ids.astype(np.int32)}).join(
        scores.select(pl.col("prompt_id").cast(pl.Int32), "is_correct"), on="prompt_id", how="left")
    if answered["is_correct"].null_count():
        raise ValueError("The baseline scores miss prompts of the prompt table: rerun the baseline rule.")
    right = answered["is_correct"].to_numpy().astype(bool)
    n_wrong, n_right = int((~right).sum()), int(right.sum())
    if min(n_wrong, n_right) < cfg["min_group_size"]:
        log.warning("layer %d: wrong_vs_right skipped, %d wrong and %d right buggy-format prompts (< min_group_size %d)",
                    layer, n_wrong, n_right, cfg["min_group_size"])
    else:
        wrong_m, right_m = a[~right], a[right]
        keep = np.maximum((wrong_m > 0).mean(axis=0), (right_m > 0).mean(axis=0)) >= cfg["min_firing_rate"]
        p, effect = unpaired_test(wrong_m[:, keep], right_m[:, keep], cfg["test"])
        out.append(_top_rows(layer, "wrong_vs_right", feature_ids[keep], wrong_m[:, keep], right_m[:, keep], p,
                             effect, top_n=cfg["top_n"], alpha=cfg["fdr_alpha"], n_tested=int(keep.sum())))
    return pl.concat(out, how="vertical_relaxed").select(DISCRIMINATIVE_COLUMNS)


# --- named features -----------------------------------------------------------------------------


def named_feature_ids(cfg_named: dict) -> dict[int, dict[str, list[int]]]:
    """features.named with integer layer keys (YAML may give strings or ints)."""
    return {int(layer): {cat: [int(i) for i in ids] for cat, ids in cats.items()} for layer, cats in cfg_named.items()}


def ratio_bootstrap(a: np.ndarray, b: np.ndarray, *, n_resamples: int, confidence: float, seed: int):
    """Ratio of column means mean(a) / mean(b) over paired rows, with a pair bootstrap CI.

    A resample whose denominator mean is 0 has no ratio and is left out of the interval; the
    point estimate is null when mean(b) is 0.
    """
    idx = bootstrap_indices(a.shape[0], n_resamples, seed)
    ma, mb = a[idx].mean(axis=1), b[idx].mean(axis=1)  # [n_resamples, m]
    with np.errstate(all="ignore"):
        boot = np.where(mb > 0, ma / mb, np.nan)
        point = np.where(b.mean(axis=0) > 0, a.mean(axis=0) / b.mean(axis=0), np.nan)
    low, high = _interval(boot, confidence)
    return point, low, high


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


# --- parity permutation test --------------------------------------------------------------------


@dataclass
class ParityResult:
    eta_squared: float  # share of the feature-centred variance of the [head, feature] matrix explained by parity
    p_value: float
    r: np.ndarray  # [features] point-biserial correlation of (head is odd) with the attribution
    r_p_value: np.ndarray  # [features] two-sided permutation p of |r|
    n_permutations: int
    exact: bool


def _labelings(n_heads: int, n_odd: int, n_permutations: int, seed: int) -> tuple[np.ndarray, bool]:
    """[P, n_heads] 0/1 labelings with n_odd ones: all of them when there are at most
    n_permutations (exact test), else the observed one plus n_permutations random ones."""
    observed = (np.arange(n_heads) % 2).astype(np.float64)
    if math.comb(n_heads, n_odd) <= n_permutations:
        combos = np.array(list(itertools.combinations(range(n_heads), n_odd)), dtype=np.int64)
        lab = np.zeros((len(combos), n_heads))
        np.put_along_axis(lab, combos, 1.0, axis=1)
        return lab, True
    rng = np.random.default_rng(seed)
    perms = rng.permuted(np.tile(observed, (n_permutations, 1)), axis=1)
    return np.vstack([observed[None], perms]), False


def parity_test(matrix: np.ndarray, *, n_permutations: int, seed: int) -> ParityResult:
    """Does head-index parity explain the [head, feature] attribution matrix? Permutation test.

    Statistic: eta^2 = between-parity sum of squares / total sum of squares, after centring every
    feature (column) over heads. Relabelling the heads (keeping 5 odd of 9, 16 of 32, ...) gives
    its null distribution; with at most `n_permutations` distinct labelings all are enumerated
    (exact p), otherwise p = (1 + #{T_perm >= T_obs}) / (1 + n_permutations).
    """
    m = np.asarray(matrix, dtype=np.float64)
    n_heads = m.shape[0]
    observed = (np.arange(n_heads) % 2).astype(np.float64)
    n_odd = int(observed.sum())
    centred = m - m.mean(axis=0, keepdims=True)
    total = float((centred ** 2).sum())
    labels, exact = _labelings(n_heads, n_odd, n_permutations, seed)
    sums = labels @ centred  # [P, F]: sum over the "odd" heads of each labeling
    scale = 1.0 / n_odd + 1.0 / (n_heads - n_odd)
    ss_between = (sums ** 2).sum(axis=1) * scale  # [P]
    obs_sums = observed @ centred
    obs_ss = float((obs_sums ** 2).sum() * scale)
    tol = 1e-12 * max(total, 1e-300)
    if exact:
        p = float(np.mean(ss_between >= obs_ss - tol))
    else:
        p = float((1 + np.sum(ss_between[1:] >= obs_ss - tol)) / (1 + n_permutations))
    col_ss = np.sqrt((centred ** 2).sum(axis=0))  # [F]
    lab_c = labels - labels.mean(axis=1, keepdims=True)
    lab_norm = np.sqrt((lab_c ** 2).sum(axis=1, keepdims=True))
    with np.errstate(all="ignore"):
        r_all = (lab_c @ centred) / (lab_norm * col_ss[None])  # [P, F]
        obs_c = observed - observed.mean()
        r_obs = (obs_c @ centred) / (np.sqrt((obs_c ** 2).sum()) * col_ss)
    hits = np.abs(np.nan_to_num(r_all)) >= np.abs(np.nan_to_num(r_obs))[None] - 1e-12
    r_p = hits.mean(axis=0) if exact else (1 + hits[1:].sum(axis=0)) / (1 + n_permutations)
    r_p = np.where(col_ss > 0, r_p, np.nan)
    return ParityResult(eta_squared=obs_ss / total if total > 0 else float("nan"), p_value=p if total > 0 else float("nan"),
                        r=r_obs, r_p_value=r_p, n_permutations=len(labels) if exact else n_permutations, exact=exact)


# --- head -> feature attribution ----------------------------------------------------------------


NORMALISATIONS = ("none", "expected_average_only_in", "covariance_whitening", "constant_norm_rescale", "layer_norm")


@dataclass
class EncoderView:
    """The SAE's pre-activation of selected features as an affine map of its input x ([n, d_in]):

        pre_f(x) = r_f * (s(x) * (P x) . W_enc[:, f] + b_enc[f] - a * b_dec . W_enc[:, f])

    with P = centring over d_in for a layer_norm SAE (else identity), s(x) the SAE's run-time
    input scale evaluated on the full x (sqrt(d_in)/|x| for constant_norm_rescale,
    1/(std(P x) + eps) for layer_norm, 1 otherwise: a dataset-level factor is already folded into
    W_enc by SAE-Lens), a = apply_b_dec_to_input and r_f = |W_dec[f]| when the SAE rescales by
    the decoder norm (else 1). With s(x) frozen, pre_f is linear in the summands of x.
    """

    w: torch.Tensor  # [d_in, F]: W_enc[:, f] * r_f
    const: torch.Tensor  # [F]
    normalisation: str
    eps: float = 1e-5

    def centre(self, c: torch.Tensor) -> torch.Tensor:
        return c - c.mean(dim=-1, keepdim=True) if self.normalisation == "layer_norm" else c

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """[n] the frozen input scale s(x)."""
        if self.normalisation == "constant_norm_rescale":
            return x.shape[-1] ** 0.5 / x.norm(dim=-1)
        if self.normalisation == "layer_norm":
            return 1.0 / (self.centre(x).std(dim=-1) + self.eps)
        return torch.ones(x.shape[:-1], dtype=x.dtype, device=x.device)

    def contribution(self, component: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """[..., n, F] the part of pre_f carried by `component` ([..., n, d_in]) at frozen scale s ([n])."""
        return s[:, None] * (self.centre(component) @ self.w)


def encoder_view(sae, feature_ids: Sequence[int], dtype=torch.float64) -> EncoderView:
    """EncoderView of an SAE-Lens SAE for `feature_ids`; raises for architectures it cannot express."""
    cfg = sae.cfg
    norm = getattr(cfg, "normalize_activations", "none")
    if norm not in NORMALISATIONS:
        raise ValueError(f"SAE normalisation {norm!r} is not supported by the head attribution (expected one of {NORMALISATIONS}).")
    if getattr(cfg, "reshape_activations", "none") != "none":
        raise ValueError("The head attribution needs an SAE over the residual stream (reshape_activations 'none').")
    if not hasattr(sae, "b_enc") or not hasattr(sae, "W_enc"):
        raise ValueError(f"SAE architecture {cfg.architecture()!r} has no single encoder bias; the head attribution "
                         "supports standard, topk and jumprelu SAEs.")
    ids = torch.as_tensor(list(feature_ids), dtype=torch.long, device=sae.W_enc.device)
    if len(ids) and int(ids.max()) >= cfg.d_sae:
        raise ValueError(f"feature id {int(ids.max())} is out of range for an SAE with d_sae={cfg.d_sae}: fix features.named.")
    w_enc = sae.W_enc.detach()[:, ids].to(dtype)
    r = (sae.W_dec.detach()[ids].to(dtype).norm(dim=-1) if getattr(cfg, "rescale_acts_by_decoder_norm", False)
         else torch.ones(len(ids), dtype=dtype, device=w_enc.device))
    a = 1.0 if cfg.apply_b_dec_to_input else 0.0
    const = r * (sae.b_enc.detach()[ids].to(dtype) - a * (sae.b_dec.detach().to(dtype) @ w_enc))
    return EncoderView(w=w_enc * r, const=const, normalisation=norm)


@torch.inference_mode()
def sae_pre_and_acts(sae, x: torch.Tensor, feature_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([n, F] pre-activation as SAE-Lens computes it (hook_sae_acts_pre), [n, F] activation)."""
    seen = {}
    handle = sae.hook_sae_acts_pre.register_forward_hook(lambda _m, _i, out: seen.__setitem__("pre", out))
    try:
        acts = sae.encode(x.to(sae.W_enc.dtype))
    finally:
        handle.remove()
    pre = seen["pre"]
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        pre = pre * sae.W_dec.norm(dim=-1)
    return pre[:, feature_ids], acts[:, feature_ids]


@dataclass
class LayerCapture:
    """Per prompt, at the decision position of one layer ([n, ...])."""

    resid_pre: torch.Tensor  # [n, d_model] input of the decoder layer
    z: torch.Tensor  # [n, n_heads * head_dim] input of o_proj (the per-head outputs)
    attn_out: torch.Tensor  # [n, d_model] output of self_attn (after o_proj)
    mlp_out: torch.Tensor  # [n, d_model]
    resid_post: torch.Tensor  # [n, d_model] output of the decoder layer


class _StopForward(Exception):
    pass


@torch.inference_mode()
def capture_decision(model, rows: Sequence[dict], *, layers: Sequence[int], batch_size: int,
                     pad_token_id: int) -> tuple[np.ndarray, dict[int, LayerCapture]]:
    """One forward pass per batch; returns prompt ids and, per layer, the decision-position tensors."""
    from bugscope.forward import iter_batches
    from bugscope.sites import decoder_layers, output_tensor

    device = next(model.parameters()).device
    store = {layer: {k: [] for k in ("resid_pre", "z", "attn_out", "mlp_out", "resid_post")} for layer in layers}
    last = max(layers)
    handles = []

    def keep(layer, key, t):
        # float32 holds a float32 or bfloat16 model's values exactly; attribute_layer works in float64
        store[layer][key].append(t[:, -1, :].detach().to("cpu", torch.float32))

    for layer in layers:
        block = decoder_layers(model)[layer]

        def pre_hook(_m, args, kwargs, layer=layer):
            keep(layer, "resid_pre", args[0] if args else kwargs["hidden_states"])

        def post_hook(_m, _i, out, layer=layer):
            keep(layer, "resid_post", output_tensor(out))
            if layer == last:
                raise _StopForward

        handles += [
            block.register_forward_pre_hook(pre_hook, with_kwargs=True),
            block.self_attn.o_proj.register_forward_pre_hook(lambda _m, args, layer=layer: keep(layer, "z", args[0])),
            block.self_attn.register_forward_hook(lambda _m, _i, out, layer=layer: keep(layer, "attn_out", output_tensor(out))),
            block.mlp.register_forward_hook(lambda _m, _i, out, layer=layer: keep(layer, "mlp_out", output_tensor(out))),
            block.register_forward_hook(post_hook),
        ]
    ids = []
    try:
        for batch in iter_batches(rows, batch_size, pad_token_id, device):
            ids.append(batch.prompt_ids.numpy())
            try:
                model.model(**batch.model_inputs(), use_cache=False)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    caps = {layer: LayerCapture(**{k: torch.cat(v) for k, v in parts.items()}) for layer, parts in store.items()}
    return np.concatenate(ids), caps


def head_outputs(model, layer: int, z: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[heads, n, d_model]: W_O[h] z_h, the residual-stream write of each head."""
    from bugscope.sites import head_input_module

    w_o = head_input_module(model, layer).weight.detach().to(z.dtype).cpu()  # [d_model, heads*head_dim]
    d_model = w_o.shape[0]
    head_dim = w_o.shape[1] // n_heads
    return torch.einsum("nhk,dhk->hnd", z.view(z.shape[0], n_heads, head_dim), w_o.view(d_model, n_heads, head_dim))


def _o_bias(model, layer: int, d_model: int) -> torch.Tensor:
    from bugscope.sites import head_input_module

    b = head_input_module(model, layer).bias
    return torch.zeros(d_model, dtype=torch.float64) if b is None else b.detach().to("cpu", torch.float64)


@torch.inference_mode()
def _mlp_tail(model, layer: int, resid_mid: torch.Tensor) -> torch.Tensor:
    """resid_post of a decision position given its resid_mid: resid_mid + mlp(post_attention_layernorm(.))."""
    from bugscope.sites import decoder_layers

    block = decoder_layers(model)[layer]
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    x = resid_mid.to(device, dtype)
    return (x + block.mlp(block.post_attention_layernorm(x))).to("cpu", torch.float64)


COMPONENTS = ("resid_pre", "mlp_out", "attn_bias", "sae_bias")


def attribute_layer(model, layer: int, sae, cap: LayerCapture, feature_ids: Sequence[int], *,
                    n_heads: int, site: str = "resid_post") -> dict[str, torch.Tensor | float]:
    """Direct attributions of every head to `feature_ids` at one layer, per prompt, and the ablation check.

    Returns float64 CPU tensors: 'pre' and 'act' [n, F] (the SAE's own pre-activation and
    activation at resid_post), 'heads' [H, n, F] (direct attributions W_enc[:, f] . (W_O[h] z_h)
    through the frozen SAE input map), the non-head terms 'resid_pre', 'mlp_out', 'attn_bias',
    'sae_bias' [n, F], the ablation changes 'zero_pre', 'zero_act', 'mean_pre', 'mean_act'
    [H, n, F] (head h's output at the decision position replaced by 0 or by its mean over all
    prompts; layer L's MLP recomputed; SAE re-encoded), and two identity residuals (floats):
    'identity_error' = max |sum of all terms - pre| and 'attn_identity_error' = max |sum over heads
    + attn_bias - contribution of the captured attention output|.
    """
    cap = LayerCapture(**{k: v.to(torch.float64) for k, v in vars(cap).items()})
    view = encoder_view(sae, feature_ids)
    view.w, view.const = view.w.cpu(), view.const.cpu()
    ids = torch.as_tensor(list(feature_ids), dtype=torch.long, device=sae.W_enc.device)
    sae_device = sae.W_enc.device

    def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre, act = sae_pre_and_acts(sae, x.to(sae_device), ids)
        return pre.to("cpu", torch.float64), act.to("cpu", torch.float64)

    if site not in ("resid_post", "attn_out"):
        raise ValueError(f"The head attribution needs SAEs on resid_post or attn_out, not {site!r}: heads have "
                         "no direct path into mlp_out. Set cache.site, or leave this stage out.")
    # attn_out SAEs read sum_h W_O[h] z_h + b_O only: the resid_pre and mlp_out terms are then 0.
    on_resid = site == "resid_post"
    x = cap.resid_post if on_resid else cap.attn_out
    n = x.shape[0]
    s = view.scale(x)  # [n]
    heads = head_outputs(model, layer, cap.z, n_heads)  # [H, n, d]
    bias = _o_bias(model, layer, x.shape[1]).expand(n, -1)
    out = {
        "heads": view.contribution(heads, s),
        "resid_pre": view.contribution(cap.resid_pre if on_resid else torch.zeros_like(x), s),
        "mlp_out": view.contribution(cap.mlp_out if on_resid else torch.zeros_like(x), s),
        "attn_bias": view.contribution(bias, s),
        "sae_bias": view.const.expand(n, -1).clone(),
    }
    out["pre"], out["act"] = encode(x)
    total = out["heads"].sum(0) + out["resid_pre"] + out["mlp_out"] + out["attn_bias"] + out["sae_bias"]
    out["identity_error"] = float((total - out["pre"]).abs().max()) if n else 0.0
    attn = view.contribution(cap.attn_out, s)
    out["attn_identity_error"] = float((out["heads"].sum(0) + out["attn_bias"] - attn).abs().max()) if n else 0.0

    # Ablation: only the decision position of layer L changes, and it is the last position, so
    # resid_post' = resid_mid' + MLP(resid_mid') is exact without another forward pass.
    def read(attn_out: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
        """SAE pre-activation and activation at the decision position for attention outputs [..., n, d]."""
        flat = attn_out.reshape(-1, attn_out.shape[-1])
        pres, acts = [], []
        resid_pre = cap.resid_pre.expand(*attn_out.shape[:-2], -1, -1).reshape(-1, attn_out.shape[-1])
        for start in range(0, flat.shape[0], chunk):
            a = flat[start:start + chunk]
            pre, act = encode(_mlp_tail(model, layer, resid_pre[start:start + chunk] + a) if on_resid else a)
            pres.append(pre)
            acts.append(act)
        shape = (*attn_out.shape[:-1], len(feature_ids))
        return torch.cat(pres).reshape(shape), torch.cat(acts).reshape(shape)

    base_pre, base_act = read(cap.attn_out)
    mean_heads = head_outputs(model, layer, cap.z.mean(0, keepdim=True), n_heads)  # [H, 1, d]
    for mode in ("zero", "mean"):
        replaced = torch.zeros_like(heads) if mode == "zero" else mean_heads.expand(-1, n, -1)
        pre, act = read(cap.attn_out[None] - heads + replaced)  # [H, n, F]
        out[f"{mode}_pre"], out[f"{mode}_act"] = pre - base_pre, act - base_act
    return out


ATTRIBUTION_COLUMNS = ["layer", "feature_id", "feature_source", "format", "component", "head", "n_prompts",
                       "direct_attribution", "zero_ablation_delta_pre", "zero_ablation_delta_act",
                       "mean_ablation_delta_pre", "mean_ablation_delta_act", "pre_activation", "activation"]


def summarise_attribution(res: dict, *, layer: int, feature_ids: Sequence[int], sources: Sequence[str],
                          formats: np.ndarray) -> pl.DataFrame:
    """Means per format of one layer's attribution: one row per (format, component/head, feature)."""
    frames = []
    n_feat = len(feature_ids)
    n_heads = res["heads"].shape[0]
    for fmt in sorted(set(formats.tolist())):
        mask = torch.as_tensor(formats == fmt)
        m = {k: v[..., mask, :].mean(dim=-2).numpy() for k, v in res.items() if isinstance(v, torch.Tensor)}
        comp = ["head"] * n_heads + list(COMPONENTS)
        head = list(range(n_heads)) + [None] * len(COMPONENTS)
        direct = np.concatenate([m["heads"], *[m[c][None] for c in COMPONENTS]])  # [H + 4, F]
        nan = np.full((len(COMPONENTS), n_feat), np.nan)
        frames.append(pl.DataFrame({
            "layer": np.full(direct.size, layer, dtype=np.int32),
            "feature_id": np.tile(np.asarray(feature_ids, dtype=np.int32), len(comp)),
            "feature_source": np.tile(np.asarray(sources, dtype=object), len(comp)).tolist(),
            "format": [fmt] * direct.size,
            "component": np.repeat(np.asarray(comp, dtype=object), n_feat).tolist(),
            "head": pl.Series(np.repeat(np.asarray(head, dtype=object), n_feat).tolist(), dtype=pl.Int32),
            "n_prompts": np.full(direct.size, int(mask.sum()), dtype=np.int32),
            "direct_attribution": direct.reshape(-1),
            **{f"{mode}_ablation_delta_{what}": np.concatenate([m[f"{mode}_{what}"], nan]).reshape(-1)
               for mode in ("zero", "mean") for what in ("pre", "act")},
            "pre_activation": np.tile(m["pre"], (len(comp), 1)).reshape(-1),
            "activation": np.tile(m["act"], (len(comp), 1)).reshape(-1),
        }))
    return pl.concat(frames).with_columns(pl.col(c).fill_nan(None) for c in ATTRIBUTION_COLUMNS[8:12]).select(ATTRIBUTION_COLUMNS)


PARITY_COLUMNS = ["layer", "target", "feature_id", "statistic", "value", "p_value", "n_permutations", "exact", "n_heads"]


def parity_rows(attribution: pl.DataFrame, *, layer: int, buggy_format: str, correct_format: str,
                n_permutations: int, seed: int) -> pl.DataFrame:
    """Parity tests of one layer's head x feature matrix of mean direct attributions.

    Targets: the buggy-format means, the correct-format means and their difference (buggy -
    correct). One row per target for eta^2 (all features), one per target and feature for the
    point-biserial r of "head index is odd".
    """
    heads = attribution.filter(pl.col("component") == "head", pl.col("layer") == layer)
    wide = heads.pivot(on="format", index=["head", "feature_id"], values="direct_attribution").sort("feature_id", "head")
    feature_ids = wide["feature_id"].unique(maintain_order=True).to_numpy()
    n_heads = wide["head"].n_unique()
    mats = {"buggy": wide[buggy_format].to_numpy().reshape(len(feature_ids), n_heads).T,
            "correct": wide[correct_format].to_numpy().reshape(len(feature_ids), n_heads).T}
    mats["difference"] = mats["buggy"] - mats["correct"]
    rows = []
    for t, (target, mat) in enumerate(mats.items()):
        res = parity_test(mat, n_permutations=n_permutations, seed=derived_seed(seed, layer, t))
        common = {"layer": layer, "target": target, "n_permutations": res.n_permutations, "exact": res.exact,
                  "n_heads": n_heads}
        rows.append({**common, "feature_id": None, "statistic": "eta_squared", "value": res.eta_squared,
                     "p_value": res.p_value})
        rows += [{**common, "feature_id": int(f), "statistic": "point_biserial_r", "value": float(r), "p_value": float(p)}
                 for f, r, p in zip(feature_ids, res.r, res.r_p_value)]
    return pl.DataFrame(rows, schema_overrides={"feature_id": pl.Int32, "layer": pl.Int32, "n_heads": pl.Int32,
                                                "n_permutations": pl.Int64}).with_columns(
        pl.col("value", "p_value").fill_nan(None)).select(PARITY_COLUMNS)


def attribution_features(discriminative: pl.DataFrame, named: dict[int, dict[str, list[int]]], layer: int,
                         n_features: int) -> tuple[list[int], list[str]]:
    """Feature ids of one layer for the attribution: the top buggy-vs-correct features per direction
    (`n_features` each) then the named features; `sources` says where each came from."""
    top = (discriminative.filter(pl.col("layer") == layer, pl.col("comparison") == "buggy_vs_correct",
                                 pl.col("rank") < n_features)
           .sort("direction", "rank", descending=[True, False]))
    ids, sources = [], []
    for fid, direction in zip(top["feature_id"].to_list(), top["direction"].to_list()):
        if fid not in ids:
            ids.append(fid)
            sources.append(f"discriminative_{direction}")
    for cat, cat_ids in named.get(layer, {}).items():
        for fid in cat_ids:
            if fid in ids:
                sources[ids.index(fid)] += f";named:{cat}"
            else:
                ids.append(fid)
                sources.append(f"named:{cat}")
    return ids, sources


# --- stage drivers (called by workflow/scripts/*.py; testable without Snakemake) -----------------


def check_config(config: dict) -> None:
    """Checks on the features section that the schema cannot express."""
    from bugscope.config import ConfigError, analysed_layers

    fcfg = config["features"]
    layers = set(analysed_layers(config))
    bad_named = sorted(int(layer) for layer in fcfg["named"] if int(layer) not in layers)
    if bad_named:
        raise ConfigError(
            f"features.named lists layers {bad_named}, which are not analysed (layers: {sorted(layers)}). "
            "Add them to 'layers' or remove them from features.named.")
    attr = fcfg["attribution"]["layers"]
    if attr != "all":
        bad = sorted(set(attr) - layers)
        if bad:
            raise ConfigError(
                f"features.attribution.layers lists {bad}, which are not analysed (layers: {sorted(layers)}). "
                "Add them to 'layers' or remove them from features.attribution.layers.")
    lo, hi = fcfg["overlap"]["middle_fraction"]
    if lo > hi:
        raise ConfigError(f"features.overlap.middle_fraction [{lo}, {hi}] is empty: write it as [low, high].")


def attribution_layers(config: dict) -> list[int]:
    from bugscope.config import analysed_layers

    layers = config["features"]["attribution"]["layers"]
    return analysed_layers(config) if layers == "all" else sorted(layers)


def load_prompt_frame(path, config: dict) -> pl.DataFrame:
    from bugscope.config import stage_hash
    from bugscope.io import read_table

    table, _ = read_table(path, kind="prompts", config_hash=stage_hash(config, "prompts"), columns=["prompt_id", "question_id", "pair_id", "format",
                                                         "decision_pos", "aligned_positions"])
    return pl.from_arrow(table)


def load_layer_values(path, weights: pl.DataFrame, config: dict) -> tuple[pl.DataFrame, dict]:
    """(prompt_id, feature_id, value) of one layer's feature table, and the table's metadata."""
    from bugscope.config import stage_hash
    from bugscope.io import read_table

    table, meta = read_table(path, kind=FEATURES_KIND, config_hash=stage_hash(config, "sae"), columns=["prompt_id", "position", "feature_id", "activation"])
    return prompt_values(pl.from_arrow(table), weights), meta


def source_provenance(metas: dict[int, dict]) -> dict:
    """Provenance of the input feature tables (SAE, model, config hash) keyed by layer."""
    return {str(layer): {k: v for k, v in meta.items() if k != "kind"} for layer, meta in metas.items()}


def run_overlap(config: dict, prompts_path, feature_paths: dict[int, str]) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """(per-layer summary, per-pair table, metadata) of the overlap stage."""
    fcfg, pcfg, boot = config["features"], config["prompts"], config["bootstrap"]
    k = fcfg["overlap"]["k"]
    prompts = load_prompt_frame(prompts_path, config)
    pairs = prompt_pairs(prompts, pcfg["buggy_format"], pcfg["correct_format"])
    weights = position_weights(prompts, fcfg["position"])
    per_pair, pooled, metas = [], [], {}
    for layer, path in sorted(feature_paths.items()):
        values, metas[layer] = load_layer_values(path, weights, config)
        layer_pairs = pair_overlap(values, pairs, k)
        short = layer_pairs.select((pl.min_horizontal("n_top_buggy", "n_top_correct") < k).mean()).item() or 0.0
        if short > 0.5:
            log.warning("layer %d: %.0f%% of the pairs have a top-k set with fewer than k=%d active features (SAE L0 "
                        "below k?); overlap_pct = shared / k is then capped below 100 (jaccard is not).", layer,
                        100 * short, k)
        per_pair.append(layer_pairs.with_columns(pl.lit(layer, pl.Int32).alias("layer")))
        pooled.append({"layer": layer, **pooled_overlap(values, pairs, k)})
    per_pair = pl.concat(per_pair).select("layer", pl.exclude("layer"))
    summary = summarise_overlap(
        per_pair, pl.DataFrame(pooled), k=k, num_layers=config["model"]["num_layers"],
        middle_fraction=fcfg["overlap"]["middle_fraction"], n_resamples=boot["n_resamples"],
        confidence=boot["confidence"], seed=derived_seed(config["seed"], 1))
    meta = {"position": fcfg["position"], "k": k, "confidence": boot["confidence"],
            "n_resamples": boot["n_resamples"], "buggy_format": pcfg["buggy_format"],
            "correct_format": pcfg["correct_format"], "sources": source_provenance(metas)}
    return summary, per_pair, meta


def run_discriminative(config: dict, prompts_path, scores_path, feature_paths: dict[int, str]) -> tuple[pl.DataFrame, dict]:
    from bugscope.config import stage_hash
    from bugscope.io import read_table

    fcfg, pcfg = config["features"], config["prompts"]
    prompts = load_prompt_frame(prompts_path, config)
    pairs = prompt_pairs(prompts, pcfg["buggy_format"], pcfg["correct_format"])
    weights = position_weights(prompts, fcfg["position"])
    scores = pl.from_arrow(read_table(scores_path, kind="baseline_scores", config_hash=stage_hash(config, "baseline"),
                                      columns=["prompt_id", "is_correct"])[0])
    out, metas = [], {}
    for layer, path in sorted(feature_paths.items()):
        values, metas[layer] = load_layer_values(path, weights, config)
        out.append(discriminative_features(values, pairs, scores, layer=layer, cfg=fcfg["discriminative"]))
    meta = {"position": fcfg["position"], **{k: v for k, v in fcfg["discriminative"].items()},
            "a_b": {"buggy_vs_correct": [pcfg["buggy_format"], pcfg["correct_format"]],
                    "wrong_vs_right": [f"{pcfg['buggy_format']} answered wrong", f"{pcfg['buggy_format']} answered right"]},
            "sources": source_provenance(metas)}
    return pl.concat(out, how="vertical_relaxed"), meta


NAMED_SCHEMA = {"layer": pl.Int32, "category": pl.String, "feature_id": pl.Int32, "mean_buggy": pl.Float64,
                "mean_correct": pl.Float64, "ratio": pl.Float64, "ratio_low": pl.Float64, "ratio_high": pl.Float64,
                "firing_rate_buggy": pl.Float64, "firing_rate_correct": pl.Float64, "n_pairs": pl.Int32}


def run_named(config: dict, prompts_path, feature_paths: dict[int, str]) -> tuple[pl.DataFrame, dict]:
    fcfg, pcfg, boot = config["features"], config["prompts"], config["bootstrap"]
    named = named_feature_ids(fcfg["named"])
    prompts = load_prompt_frame(prompts_path, config)
    pairs = prompt_pairs(prompts, pcfg["buggy_format"], pcfg["correct_format"])
    weights = position_weights(prompts, fcfg["position"])
    out, metas = [pl.DataFrame(schema=NAMED_SCHEMA)], {}
    for layer, path in sorted(feature_paths.items()):
        if layer not in named:
            continue
        values, metas[layer] = load_layer_values(path, weights, config)
        d_sae = metas[layer].get("d_sae")
        too_big = [f for ids in named[layer].values() for f in ids if d_sae is not None and f >= d_sae]
        if too_big:
            raise ValueError(f"features.named at layer {layer} lists ids {too_big}, out of range for its SAE "
                             f"(d_sae={d_sae}). These ids belong to another SAE: fix features.named.")
        out.append(named_features(values, pairs, layer=layer, named=named[layer], n_resamples=boot["n_resamples"],
                                  confidence=boot["confidence"], seed=derived_seed(config["seed"], 2, layer)))
    meta = {"position": fcfg["position"], "confidence": boot["confidence"], "n_resamples": boot["n_resamples"],
            "named": {str(k): v for k, v in named.items()}, "sources": source_provenance(metas)}
    return pl.concat(out, how="vertical_relaxed").cast(NAMED_SCHEMA), meta


def run_attribution(config: dict, model, tokenizer, prompts_path, discriminative_path,
                    sae_dirs: dict[int, str]) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """(attribution table, parity table, metadata) for the layers of `sae_dirs`."""
    from sae_lens import SAE

    from bugscope.config import stage_hash
    from bugscope.io import read_table
    from bugscope.model import pick_device
    from bugscope.sites import hook_name

    fcfg, pcfg = config["features"], config["prompts"]
    buggy, correct = pcfg["buggy_format"], pcfg["correct_format"]
    prompts = pl.from_arrow(read_table(prompts_path, kind="prompts", config_hash=stage_hash(config, "prompts"))[0]).filter(pl.col("format").is_in([buggy, correct]))
    discriminative = pl.from_arrow(read_table(discriminative_path, kind="discriminative_features",
                                              config_hash=stage_hash(config, "features"))[0])
    named = named_feature_ids(fcfg["named"])
    layers = sorted(sae_dirs)
    site = config["cache"]["site"]
    n_heads = model.config.num_attention_heads
    ids, caps = capture_decision(model, prompts.to_dicts(), layers=layers, batch_size=config["cache"]["batch_size"],
                                 pad_token_id=tokenizer.pad_token_id)
    formats = pl.DataFrame({"prompt_id": ids.astype(np.int32)}).join(
        prompts.select("prompt_id", "format"), on="prompt_id", how="left", maintain_order="left")["format"].to_numpy()
    device = pick_device(config["device"])
    tables, parity, errors, sae_meta = [], [], {}, {}
    for layer in layers:
        feats, sources = attribution_features(discriminative, named, layer, fcfg["attribution"]["n_features"])
        if not feats:
            log.warning("layer %d: no discriminative or named features to attribute", layer)
            continue
        sae = SAE.load_from_disk(sae_dirs[layer], device=str(device)).eval()
        hook = hook_name(layer, site)
        sae_hook = getattr(sae.cfg.metadata, "hook_name", None)
        if (sae_hook and sae_hook != hook) or sae.cfg.d_in != model.config.hidden_size:
            raise ValueError(f"{sae_dirs[layer]} holds an SAE for {sae_hook} with d_in={sae.cfg.d_in}, but layer {layer} "
                             f"needs one for {hook} with d_in={model.config.hidden_size}: rerun the SAE stage.")
        sae_meta[str(layer)] = {"path": str(sae_dirs[layer]), "architecture": sae.cfg.architecture(),
                                "d_sae": sae.cfg.d_sae, "normalize_activations": sae.cfg.normalize_activations}
        res = attribute_layer(model, layer, sae, caps.pop(layer), feats, n_heads=n_heads, site=site)
        scale = float(res["pre"].abs().max()) if res["pre"].numel() else 0.0
        errors[str(layer)] = {"identity_error": res["identity_error"], "attn_identity_error": res["attn_identity_error"],
                              "pre_activation_scale": scale}
        log.info("layer %d: %d features; identity error %.2e (attention part %.2e) at pre-activation scale %.2f",
                 layer, len(feats), res["identity_error"], res["attn_identity_error"], scale)
        table = summarise_attribution(res, layer=layer, feature_ids=feats, sources=sources, formats=formats)
        tables.append(table)
        parity.append(parity_rows(table, layer=layer, buggy_format=buggy, correct_format=correct,
                                  n_permutations=fcfg["attribution"]["n_permutations"], seed=config["seed"]))
        del sae
    if not tables:
        raise ValueError("No layer had features to attribute: check the discriminative table and features.named.")
    meta = {"position": "decision", "site": site, "buggy_format": buggy, "correct_format": correct, "n_heads": n_heads,
            "identity": errors, "saes": sae_meta, "n_permutations": fcfg["attribution"]["n_permutations"]}
    return pl.concat(tables), pl.concat(parity), meta
