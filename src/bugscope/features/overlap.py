"""Overlap of the top-k feature sets of the two formats, per prompt pair and pooled, summarised per
layer with cluster-bootstrap CIs and beside the same-format chance levels (bugscope.features.chance).

Definitions (also in config/README.md):
- shared / buggy_only / correct_only: sizes of the intersection and of the two differences of the
  two top-k sets of a pair; overlap_pct = 100 * shared / k; jaccard = shared / |union| (null when
  both sets are empty).
- amplification_geomean: exp of the mean over the shared features of log(value_buggy /
  value_correct); per layer, exp of the mean over pairs of these mean log ratios. Symmetric in the
  two formats and about 1 under the null. AMPLIFICATION_ORIGINAL: the original study's mean of
  the ratios, biased above 1 under the null, kept to compare with the original. Shared features
  have value > 0 in both formats, so no ratio divides by zero; a pair without shared features has
  no amplification (null) and is left out of those columns' means.
- pooled variant (the seed's): top-k of the format-mean value vectors (mean over every prompt of
  the format, absent = 0), then the same statistics; one number per layer, no CI.
- every CI resamples number pairs (`pair_id`: both question orders of a drawn pair together).
- per_pair_heldout variant (selection-aware, research notes section 8): the two marks are chosen
  on the pairs with an even pair_id and every statistic of the row is measured on the others (odd
  pair_id), baselines included, so a claim on the marked layer is tested on pairs that did not
  choose it. The argmin of 30 noisy layers clears a threshold more easily on the data that chose it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import polars as pl

from bugscope.data.prompts import is_selection_pair
from bugscope.features.values import top_k
from bugscope.stats import cluster_resample_weights, cluster_resampled_means, percentile_interval

# The seed's amplification estimator (biased above 1 under the null), kept for the original study.
AMPLIFICATION_ORIGINAL = "amplification_original_mean_of_ratios"


def _set_statistics(joined: pl.DataFrame, by: str, k: int) -> pl.DataFrame:
    """Overlap statistics per `by` group of a full join of two top-k sets (value_a, value_b)."""
    a, b = pl.col("value_a").is_not_null(), pl.col("value_b").is_not_null()
    ratio = (pl.col("value_a") / pl.col("value_b")).filter(a & b)
    return (joined.group_by(by).agg(
        (a & b).sum().cast(pl.Int32).alias("shared"),
        (a & ~b).sum().cast(pl.Int32).alias("a_only"),
        (b & ~a).sum().cast(pl.Int32).alias("b_only"),
        a.sum().cast(pl.Int32).alias("n_top_a"),
        b.sum().cast(pl.Int32).alias("n_top_b"),
        ratio.log().mean().exp().alias("amplification_geomean"),
        ratio.mean().alias(AMPLIFICATION_ORIGINAL),
    ))


def _finish_overlap(stats: pl.DataFrame, k: int) -> pl.DataFrame:
    union = pl.col("shared") + pl.col("a_only") + pl.col("b_only")
    return stats.with_columns(
        (100.0 * pl.col("shared") / k).alias("overlap_pct"),
        pl.when(union > 0).then(pl.col("shared") / union).otherwise(None).alias("jaccard"),
    )


# The set sizes of a comparison of the buggy (a) and the correct (b) prompt, as the tables name them.
CROSS_FORMAT_NAMES = {"a_only": "buggy_only", "b_only": "correct_only", "n_top_a": "n_top_buggy",
                      "n_top_b": "n_top_correct"}


def compare_top_sets(top: pl.DataFrame, couples: pl.DataFrame, key: str, k: int) -> pl.DataFrame:
    """Overlap statistics of the two top-k sets of each row of `couples` (key, prompt_id_a,
    prompt_id_b): shared, a_only, b_only, n_top_a, n_top_b, the amplifications (a / b),
    overlap_pct, jaccard. Every row gets statistics, also when a prompt has no active feature."""
    sides = [couples.select(key, f"prompt_id_{s}").join(top, left_on=f"prompt_id_{s}", right_on="prompt_id")
             .select(key, "feature_id", pl.col("value").alias(f"value_{s}")) for s in ("a", "b")]
    joined = sides[0].join(sides[1], on=[key, "feature_id"], how="full", coalesce=True)
    stats = _set_statistics(joined, key, k)
    out = couples.select(key).join(stats, on=key, how="left").with_columns(
        pl.col("shared", "a_only", "b_only", "n_top_a", "n_top_b").fill_null(0))
    return _finish_overlap(out, k)


def pair_overlap(values: pl.DataFrame, pairs: pl.DataFrame, k: int) -> pl.DataFrame:
    """Per prompt pair: shared, buggy_only, correct_only, n_top_*, overlap_pct, jaccard, the amplifications.

    `values` holds prompt_id, feature_id, value; every pair of `pairs` gets a row, also when one or
    both of its prompts have no active feature.
    """
    couples = pairs.select("question_id", pl.col("prompt_id_buggy").alias("prompt_id_a"),
                           pl.col("prompt_id_correct").alias("prompt_id_b"))
    stats = compare_top_sets(top_k(values, k), couples, "question_id", k).rename(CROSS_FORMAT_NAMES)
    return pairs.select("question_id", "pair_id").join(stats, on="question_id", how="left").sort("question_id")


def pooled_overlap(values: pl.DataFrame, pairs: pl.DataFrame, k: int) -> dict:
    """The seed's variant: top-k of the format-mean value vectors (absent = 0), one row of statistics."""
    n = pairs.height

    def mean_vector(col: str, prompt: int) -> pl.DataFrame:
        return (pairs.select(pl.col(col).alias("prompt_id")).join(values, on="prompt_id")
                .group_by("feature_id").agg((pl.col("value").sum() / n).alias("value"))
                .with_columns(pl.lit(prompt, pl.Int32).alias("prompt_id")))

    means = pl.concat([mean_vector("prompt_id_buggy", 0), mean_vector("prompt_id_correct", 1)])
    couples = pl.DataFrame({"group": [0], "prompt_id_a": [0], "prompt_id_b": [1]}, schema_overrides={
        "prompt_id_a": pl.Int32, "prompt_id_b": pl.Int32})
    stats = compare_top_sets(top_k(means, k), couples, "group", k).rename(CROSS_FORMAT_NAMES)
    return stats.drop("group").row(0, named=True)


OVERLAP_STATS = ("overlap_pct", "jaccard", "amplification_geomean", AMPLIFICATION_ORIGINAL, "shared", "buggy_only",
                 "correct_only")


def middle_layers(layers: Sequence[int], num_layers: int, fraction: Sequence[float]) -> list[int]:
    """Analysed layers whose index lies in [lo * num_layers, hi * num_layers]."""
    lo, hi = fraction
    return [layer for layer in layers if lo * num_layers <= layer <= hi * num_layers]


# The chance baselines (bugscope.features.chance), `variant` of their summary rows.
COMPARISONS = ("same_format_different_question", "same_format_swapped_order")
# Statistics averaged on the log scale (a geometric mean): the interval is exp of the log one.
LOG_STATS = ("amplification_geomean",)
BASELINE_STATS = ("overlap_pct", "jaccard", "amplification_geomean", AMPLIFICATION_ORIGINAL, "shared")
# Baseline rows with this `format` pool the rows of both formats.
BOTH_FORMATS = "both"


class _Clustered:
    """Rows of one comparison at every layer, resampled by number pair (`pair_id`) with shared weights.

    `frame` has one row per (row key, layer); `points` / `boot` give, per statistic, the mean over
    rows [n_layers] and its resampled means [n_resamples, n_layers] (log scale for LOG_STATS).
    """

    def __init__(self, frame: pl.DataFrame, key: str, layers: list[int], stats, cluster_of: dict, weights):
        wide = {s: frame.pivot(on="layer", index=key, values=s, sort_columns=False).sort(key) for s in stats}
        pairs = frame.select(key, "pair_id").unique().sort(key)["pair_id"].to_list()
        index = np.array([cluster_of[p] for p in pairs], dtype=np.int64)
        self.n_rows, self.n_clusters = len(pairs), len(set(pairs))
        self.points, self.boot, self.n_finite = {}, {}, {}
        for stat, table in wide.items():
            mat = table.select([str(layer) for layer in layers]).to_numpy().astype(np.float64)
            if stat in LOG_STATS:
                mat = np.log(mat)
            self.n_finite[stat] = np.isfinite(mat).sum(axis=0)
            with np.errstate(invalid="ignore", divide="ignore"):
                self.points[stat] = np.nansum(mat, axis=0) / self.n_finite[stat]
            self.boot[stat] = cluster_resampled_means(mat, index, weights)

    def columns(self, confidence: float, stats) -> dict:
        out = {}
        for stat in stats:
            low, high = percentile_interval(self.boot[stat], confidence)
            values = (self.points[stat], low, high)
            if stat in LOG_STATS:
                values = tuple(np.exp(v) for v in values)
            out.update(dict(zip((stat, f"{stat}_low", f"{stat}_high"), values)))
        return out


def _difference(name: str, point, boot, confidence: float, log: bool = False) -> dict:
    """A difference of two means computed within each resample (exp'd for a log-scale ratio)."""
    low, high = percentile_interval(boot, confidence)
    values = tuple(np.exp(v) for v in (point, low, high)) if log else (point, low, high)
    return dict(zip((name, f"{name}_low", f"{name}_high"), values))


def summarise_overlap(per_pair: pl.DataFrame, pooled: pl.DataFrame, *, k: int, num_layers: int,
                      middle_fraction: Sequence[float], n_resamples: int, confidence: float, seed: int,
                      baselines: pl.DataFrame | None = None,
                      original_single_pair: pl.DataFrame | None = None,
                      heldout_baselines: pl.DataFrame | None = None) -> pl.DataFrame:
    """Per layer: the per-pair means with cluster-bootstrap CIs, the chance baselines, the pooled variant.

    Every interval resamples number pairs (`pair_id`), keeping both question orders of a drawn pair,
    with one weight matrix for every layer and comparison. So `argmin_frequency` (the fraction of
    resamples in which a layer has the smallest mean overlap) and `argmax_middle_frequency` (the
    same for the largest among the middle layers) say how certain the two marks are, and the
    beyond-baseline columns (`format_effect_pct`, `amplification_excess`) are differences taken
    within each resample. `baselines` (`bugscope.features.chance.baseline_overlap` rows of every
    layer) adds the rows of the two same-format comparisons, per format and for both formats.

    The `per_pair_heldout` rows (see the module docstring) are the per_pair statistics of the odd
    pair ids, marked by the even ones; their beyond-baseline columns come from `heldout_baselines`,
    baseline rows built from the odd pairs only (partners among the odd pairs too), and are null
    without them. They are left out when either half has fewer than two number pairs.
    """
    layers = sorted(per_pair["layer"].unique().to_list())
    mids = middle_layers(layers, num_layers, middle_fraction)
    summary, baseline_rows = _cross_rows(per_pair, baselines, layers, mids, n_resamples=n_resamples,
                                         confidence=confidence, seed=seed)
    summary = _with_marks(summary.with_columns(pl.lit("per_pair").alias("variant")),
                          summary["overlap_pct"].to_numpy(), layers, mids)
    unmarked = [pl.lit(False).alias("is_min_overlap"), pl.lit(False).alias("is_max_overlap_middle"),
                pl.col("layer").is_in(mids).alias("is_middle")]
    pooled = pooled.with_columns(pl.lit("pooled").alias("variant"), pl.lit(summary["n_pairs"][0]).alias("n_pairs"),
                                 pl.lit(summary["n_number_pairs"][0]).alias("n_number_pairs"), *unmarked)
    parts = [summary, pooled, *(b.with_columns(*unmarked) for b in baseline_rows)]
    heldout = _heldout_rows(per_pair, heldout_baselines, layers, mids, n_resamples=n_resamples,
                            confidence=confidence, seed=seed)
    if heldout is not None:
        parts.append(heldout)
    if original_single_pair is not None:
        # The original study's own measurement: one question (9.8 vs 9.11, correct first), top-k at
        # the prompt's last token; one number per layer, no CI (features.stages.run_overlap).
        parts.append(original_single_pair.with_columns(
            pl.lit("original_single_pair").alias("variant"), pl.lit(1).alias("n_pairs"),
            pl.lit(1).alias("n_number_pairs"), *unmarked))
    out = pl.concat(parts, how="diagonal_relaxed").with_columns(pl.lit(k).alias("k"))
    if "format" not in out.columns:
        out = out.with_columns(pl.lit(None, pl.String).alias("format"))
    for col in SUMMARY_COLUMNS:
        if col not in out.columns:
            out = out.with_columns(pl.lit(None, pl.Float64).alias(col))
    variant_order = pl.col("variant").replace_strict(
        {v: i for i, v in enumerate(VARIANTS)}, default=len(VARIANTS), return_dtype=pl.Int32)
    return (out.with_columns(pl.col("layer").cast(pl.Int32)).sort(variant_order, pl.col("format"), "layer",
                                                                 nulls_last=False).select(SUMMARY_COLUMNS))


def _cross_rows(per_pair: pl.DataFrame, baselines: pl.DataFrame | None, layers: list[int], mids: list[int], *,
                n_resamples: int, confidence: float, seed: int) -> tuple[pl.DataFrame, list[pl.DataFrame]]:
    """(cross-format rows per layer, baseline rows) of the pairs in `per_pair`, no variant or marks yet."""
    clusters = sorted(per_pair["pair_id"].unique().to_list())
    cluster_of = {p: i for i, p in enumerate(clusters)}
    weights = cluster_resample_weights(len(clusters), n_resamples=n_resamples, seed=seed)
    cross = _Clustered(per_pair, "question_id", layers, OVERLAP_STATS, cluster_of, weights)
    rows = {"layer": layers, **cross.columns(confidence, OVERLAP_STATS)}
    rows["n_pairs_amplification"] = cross.n_finite["amplification_geomean"]
    boot_overlap = cross.boot["overlap_pct"]
    # How often each layer is the argmin (all layers) / argmax (middle layers) across resamples.
    rows["argmin_frequency"] = np.bincount(np.argmin(boot_overlap, axis=1), minlength=len(layers)) / n_resamples
    argmax_mid = np.full(len(layers), np.nan)
    if mids:
        cols = [layers.index(m) for m in mids]
        argmax_mid[cols] = np.bincount(np.argmax(boot_overlap[:, cols], axis=1), minlength=len(cols)) / n_resamples
    rows["argmax_middle_frequency"] = argmax_mid
    reference, baseline_rows = _baseline_rows(baselines, layers, cluster_of, weights, confidence)
    rows.update(_beyond_baseline(cross, reference, confidence, len(layers)))
    summary = pl.DataFrame(rows).with_columns(
        pl.lit(cross.n_rows).alias("n_pairs"), pl.lit(cross.n_clusters).alias("n_number_pairs"),
        pl.col("layer").is_in(mids).alias("is_middle"))
    return summary, baseline_rows


def _with_marks(summary: pl.DataFrame, mean_overlap: np.ndarray, layers: list[int], mids: list[int]) -> pl.DataFrame:
    """Mark the layer of smallest `mean_overlap` and the middle layer of largest (first on ties)."""
    min_layer = layers[int(np.argmin(mean_overlap))]
    max_mid = mids[int(np.argmax([mean_overlap[layers.index(m)] for m in mids]))] if mids else None
    return summary.with_columns(
        (pl.col("layer") == min_layer).alias("is_min_overlap"),
        (pl.col("layer") == max_mid).fill_null(False).alias("is_max_overlap_middle"),
    )


# The selection-aware split, the same as the discriminative features' (SPLIT_COMPARISON there):
# marks chosen on the even pair ids, statistics measured on the odd ones.
HELDOUT_VARIANT = "per_pair_heldout"


def _heldout_rows(per_pair: pl.DataFrame, heldout_baselines: pl.DataFrame | None, layers: list[int],
                  mids: list[int], *, n_resamples: int, confidence: float, seed: int) -> pl.DataFrame | None:
    """The per_pair_heldout rows: statistics of the odd pair ids, marks of the even ones (None if a half has < 2 pairs)."""
    chosen = per_pair.filter(is_selection_pair(pl.col("pair_id")))
    held = per_pair.filter(~is_selection_pair(pl.col("pair_id")))
    if chosen["pair_id"].n_unique() < 2 or held["pair_id"].n_unique() < 2:
        return None
    if heldout_baselines is not None and heldout_baselines.filter(is_selection_pair(pl.col("pair_id"))).height:
        raise ValueError("heldout_baselines hold a selection pair (even pair_id): build them from the odd pairs only "
                         "(bugscope.features.chance.baseline_couples of the held-out pairs).")
    # The mean overlap of the selection half, per layer, in the order of `layers` (no null overlap_pct).
    means = chosen.group_by("layer").agg(pl.col("overlap_pct").cast(pl.Float64).mean())
    selection_mean = np.array([means.filter(pl.col("layer") == la)["overlap_pct"].item() for la in layers])
    rows, _ = _cross_rows(held, heldout_baselines, layers, mids, n_resamples=n_resamples, confidence=confidence,
                          seed=seed)
    return _with_marks(rows.with_columns(pl.lit(HELDOUT_VARIANT).alias("variant")), selection_mean, layers, mids)


def _baseline_rows(baselines, layers, cluster_of, weights, confidence) -> tuple[dict, list[pl.DataFrame]]:
    """({comparison: _Clustered over both formats}, summary rows per comparison and format)."""
    reference, out = {}, []
    if baselines is None or baselines.height == 0:
        return reference, out
    for comparison in COMPARISONS:
        rows = baselines.filter(pl.col("comparison") == comparison)
        if rows.height == 0:
            continue
        formats = sorted(rows["format"].unique().to_list())
        for fmt in [*formats, BOTH_FORMATS]:
            part = rows if fmt == BOTH_FORMATS else rows.filter(pl.col("format") == fmt)
            clustered = _Clustered(part, "couple", layers, BASELINE_STATS, cluster_of, weights)
            if fmt == BOTH_FORMATS:
                reference[comparison] = clustered
            out.append(pl.DataFrame({"layer": layers, **clustered.columns(confidence, BASELINE_STATS),
                                     "n_pairs_amplification": clustered.n_finite["amplification_geomean"]}).with_columns(
                pl.lit(comparison).alias("variant"), pl.lit(fmt).alias("format"),
                pl.lit(clustered.n_rows).alias("n_pairs"), pl.lit(clustered.n_clusters).alias("n_number_pairs")))
    return reference, out


def _beyond_baseline(cross: _Clustered, reference: dict, confidence: float, n_layers: int) -> dict:
    """The per_pair rows' comparisons with the baselines of both formats (null without baselines)."""
    out = {}
    diff = dict(zip(("different", "swapped"), COMPARISONS))
    for name, comparison, stat in [("baseline_overlap_pct", diff["different"], "overlap_pct"),
                                   ("swapped_order_overlap_pct", diff["swapped"], "overlap_pct"),
                                   ("amplification_geomean_null", diff["different"], "amplification_geomean")]:
        ref = reference.get(comparison)
        if ref is not None:
            col = ref.columns(confidence, [stat])
            out.update({name: col[stat], f"{name}_low": col[f"{stat}_low"], f"{name}_high": col[f"{stat}_high"]})
    for name, comparison in [("format_effect_pct", diff["different"]), ("format_effect_swapped_order_pct", diff["swapped"])]:
        ref = reference.get(comparison)
        if ref is not None:
            out.update(_difference(name, ref.points["overlap_pct"] - cross.points["overlap_pct"],
                                   ref.boot["overlap_pct"] - cross.boot["overlap_pct"], confidence))
    ref = reference.get(diff["different"])
    if ref is not None:
        g = "amplification_geomean"
        out.update(_difference("amplification_excess", cross.points[g] - ref.points[g], cross.boot[g] - ref.boot[g],
                               confidence, log=True))
    return out


VARIANTS = ("per_pair", "pooled", *COMPARISONS, "original_single_pair", HELDOUT_VARIANT)
BEYOND_BASELINE = ("baseline_overlap_pct", "swapped_order_overlap_pct", "format_effect_pct",
                   "format_effect_swapped_order_pct", "amplification_geomean_null", "amplification_excess")
SUMMARY_COLUMNS = ["layer", "variant", "format", "k", "n_pairs", "n_number_pairs", "is_middle", "is_min_overlap",
                   "is_max_overlap_middle", *[c for s in OVERLAP_STATS for c in (s, f"{s}_low", f"{s}_high")],
                   "n_pairs_amplification", "argmin_frequency", "argmax_middle_frequency",
                   *[c for s in BEYOND_BASELINE for c in (s, f"{s}_low", f"{s}_high")]]
