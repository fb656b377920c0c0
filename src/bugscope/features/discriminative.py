"""Discriminative features: paired (buggy vs correct format) and unpaired (answered wrong vs right)
tests per feature, BH q-values, and the top features per layer, comparison and direction."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import polars as pl
from scipy import stats as sps

from bugscope.data.prompts import is_selection_pair
from bugscope.features.values import dense_matrix
from bugscope.stats import (
    cluster_means,
    cluster_resample_weights,
    cluster_resampled_means,
    clustered_proportion_columns,
    percentile_interval,
)

log = logging.getLogger("bugscope.features")


def bh_qvalues(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (NaN p-values are treated as 1)."""
    p = np.where(np.isfinite(p), p, 1.0)
    if p.size == 0:
        return p
    return sps.false_discovery_control(p, method="bh")


def paired_test(a: np.ndarray, b: np.ndarray, test: str) -> tuple[np.ndarray, np.ndarray]:
    """Column-wise paired test of a vs b ([n, m] each, one row per independent unit): (p-value,
    Cohen's d_z of a - b). Callers pass number-pair means (`pair_means`): the two orders of a pair
    are not independent (research notes section 8).

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


def _tie_term(x: np.ndarray) -> np.ndarray:
    """Per column of [n, m]: sum over groups of tied values of t^3 - t (the rank-sum variance's tie
    correction), from the runs of equal values in each sorted column."""
    ordered = np.sort(x, axis=0)
    new_run = np.vstack([np.ones((1, x.shape[1]), bool), ordered[1:] != ordered[:-1]])
    run_id = np.cumsum(new_run, axis=0) - 1  # run index within each column
    counts = np.zeros((x.shape[0], x.shape[1]))
    np.add.at(counts, (run_id, np.broadcast_to(np.arange(x.shape[1]), x.shape)), 1.0)
    return (counts ** 3 - counts).sum(axis=0)


def stratified_unpaired_test(a: np.ndarray, b: np.ndarray, strata_a, strata_b,
                             test: str) -> tuple[np.ndarray, np.ndarray]:
    """Column-wise two-sample test of a vs b within strata (the question order), pooled across them:
    (p-value, stratified Cohen's d). Within one order each number pair gives at most one prompt, so
    the rows of a stratum are independent, and a feature that only tells the orders apart shows no
    effect.

    wilcoxon: van Elteren's stratified rank-sum test (weights 1 / (n_s + 1), ties corrected); ttest:
    the strata's mean differences pooled with Mantel-Haenszel weights over their pooled variance.
    d: the same weighted mean difference over the within-stratum pooled SD. A stratum without rows
    on both sides has no weight; with none left, p = 1 and d = 0.
    """
    strata_a, strata_b = np.asarray(strata_a), np.asarray(strata_b)
    m = a.shape[1]
    num, var, diff, w_sum, ss, dof = (np.zeros(m) for _ in range(6))
    for level in sorted(set(strata_a.tolist()) & set(strata_b.tolist())):
        xa, xb = a[strata_a == level], b[strata_b == level]
        na, nb = len(xa), len(xb)
        n = na + nb
        w = na * nb / n
        d = xa.mean(axis=0) - xb.mean(axis=0)
        ss_a = (na - 1) * xa.var(axis=0, ddof=1) if na > 1 else 0.0
        ss_b = (nb - 1) * xb.var(axis=0, ddof=1) if nb > 1 else 0.0
        diff += w * d
        w_sum += w
        ss += ss_a
        ss += ss_b
        dof += n - 2
        if test == "wilcoxon":
            both = np.concatenate([xa, xb])
            ranks = sps.rankdata(both, axis=0)
            v = na * nb / 12 * ((n + 1) - _tie_term(both) / (n * (n - 1))) if n > 1 else np.zeros(m)
            ws = 1.0 / (n + 1)
            num += ws * (ranks[:na].sum(axis=0) - na * (n + 1) / 2)
            var += ws * ws * v
        elif test == "ttest":
            num += w * d
            var += w * w * ((ss_a + ss_b) / max(n - 2, 1)) * (1 / na + 1 / nb)
        else:
            raise ValueError(f"features.discriminative.test is {test!r}; expected wilcoxon or ttest")
    with np.errstate(all="ignore"):
        z = np.where(var > 0, num / np.sqrt(var), 0.0)
        sd = np.sqrt(np.where(dof > 0, ss / dof, 0.0))
        effect = np.where((sd > 0) & (w_sum > 0), diff / np.where(w_sum > 0, w_sum, 1) / sd, 0.0)
    p = np.where(var > 0, 2 * sps.norm.sf(np.abs(z)), 1.0)
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
                          "significant", "n_a", "n_b", "n_tested", "n_pairs", "ratio", "ratio_low", "ratio_high",
                          "heldout_mean_a", "heldout_mean_b", "heldout_firing_rate_a", "heldout_firing_rate_b",
                          "n_heldout_pairs", "heldout_ratio", "heldout_ratio_low", "heldout_ratio_high",
                          "heldout_firing_rate_a_low", "heldout_firing_rate_a_high", "heldout_firing_rate_b_low",
                          "heldout_firing_rate_b_high"]
HELDOUT_COLUMNS = DISCRIMINATIVE_COLUMNS[DISCRIMINATIVE_COLUMNS.index("heldout_mean_a"):]


def _stratified_ratio(means_a: np.ndarray, means_b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """sum_s w_s mean_a_s / sum_s w_s mean_b_s over strata (last axis groups of m columns)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        num = np.nansum(means_a * w, axis=-2)
        den = np.nansum(means_b * w, axis=-2)
        return np.where(den > 0, num / den, np.nan)


def interval_columns(a: np.ndarray, b: np.ndarray, clusters_a: np.ndarray, clusters_b: np.ndarray, *,
                     boot: dict, prefix: str = "", strata_a=None, strata_b=None) -> dict[str, np.ndarray]:
    """Per column (feature) of a [n_a, m] and b [n_b, m]: the ratio of means a / b with a percentile
    bootstrap over number pairs (a pair's rows on both sides move together: research notes section
    8), the firing rates of both sides with exact intervals over number pairs, and the number of pairs.

    With strata (the question order of each row), the ratio compares a and b within each stratum
    and pools them with Mantel-Haenszel weights n_a n_b / (n_a + n_b): a feature that only tells
    the orders apart, where one order is mostly wrong, then has a ratio near 1. A stratum without
    rows on both sides has no weight."""
    m = a.shape[1]
    strata_a = np.zeros(len(a), dtype=np.int64) if strata_a is None else np.asarray(strata_a)
    strata_b = np.zeros(len(b), dtype=np.int64) if strata_b is None else np.asarray(strata_b)
    levels = sorted(set(strata_a.tolist()) | set(strata_b.tolist()))
    blocks, weights_s = [], []
    for level in levels:
        ia, ib = strata_a == level, strata_b == level
        na, nb = int(ia.sum()), int(ib.sum())
        weights_s.append(na * nb / (na + nb) if na and nb else 0.0)
        blocks.append((ia, ib))
    # columns: [a of stratum 0, ..., a of stratum S-1, b of stratum 0, ...], m each; NaN off-stratum
    n_a, n_b, s = len(a), len(b), len(levels)
    stacked = np.full((n_a + n_b, 2 * s * m), np.nan)
    for k, (ia, ib) in enumerate(blocks):
        stacked[:n_a][ia, k * m:(k + 1) * m] = a[ia]
        stacked[n_a:][ib, (s + k) * m:(s + k + 1) * m] = b[ib]
    clusters = np.concatenate([clusters_a, clusters_b])
    labels, index = np.unique(clusters, return_inverse=True)
    weights = cluster_resample_weights(len(labels), n_resamples=boot["n_resamples"], seed=boot["seed"])
    w = np.asarray(weights_s)[:, None]  # [S, 1]
    # [R, side, S, m]; the resample count is named, so that no feature (m = 0) reshapes too
    means = cluster_resampled_means(stacked, index, weights).reshape(len(weights), 2, s, m)
    resampled = _stratified_ratio(means[:, 0], means[:, 1], w)
    with warnings.catch_warnings():  # a stratum without rows on one side: NaN, and weight 0
        warnings.simplefilter("ignore", RuntimeWarning)
        full = np.nanmean(stacked.reshape(n_a + n_b, 2, s, m), axis=0)
    point = _stratified_ratio(full[0], full[1], w)
    low, high = percentile_interval(resampled, boot["confidence"])
    fa = clustered_proportion_columns((a > 0).astype(float), clusters_a, boot["confidence"])
    fb = clustered_proportion_columns((b > 0).astype(float), clusters_b, boot["confidence"])
    return {f"{prefix}ratio": point, f"{prefix}ratio_low": low, f"{prefix}ratio_high": high,
            f"{prefix}firing_rate_a_low": fa["low"], f"{prefix}firing_rate_a_high": fa["high"],
            f"{prefix}firing_rate_b_low": fb["low"], f"{prefix}firing_rate_b_high": fb["high"],
            "n_heldout_pairs" if prefix else "n_pairs": np.full(m, len(labels), dtype=np.int64)}


def _top_columns(top: pl.DataFrame, feature_ids: np.ndarray) -> np.ndarray:
    """The columns of `top`'s features among `feature_ids` (the columns of the dense matrices)."""
    column = {int(f): i for i, f in enumerate(feature_ids)}
    return np.array([column[int(f)] for f in top["feature_id"].to_list()], dtype=np.int64)


def _with_intervals(top: pl.DataFrame, feature_ids: np.ndarray, a: np.ndarray, b: np.ndarray, clusters_a, clusters_b,
                    boot: dict, prefix: str = "", strata=(None, None)) -> pl.DataFrame:
    """`top` with `interval_columns` of its features on a and b (all of a side's rows)."""
    idx = _top_columns(top, feature_ids)
    cols = interval_columns(a[:, idx], b[:, idx], clusters_a, clusters_b, boot=boot, prefix=prefix,
                            strata_a=strata[0], strata_b=strata[1])
    if not prefix:  # the firing-rate intervals are the held-out rows' (the tested ones)
        cols = {k: v for k, v in cols.items() if "firing" not in k}
    return top.with_columns(**{k: pl.Series(k, v) for k, v in cols.items()})

# Selection-aware ranking (research notes section 8): the top features ranked on the pairs with an
# even pair_id, their means measured on the others. The top-ranked of thousands of features clears
# a threshold on the data that ranked it more easily than on fresh pairs.
SPLIT_COMPARISON = "buggy_vs_correct_heldout"


def discriminative_features(values: pl.DataFrame, pairs: pl.DataFrame, scores: pl.DataFrame, *, layer: int,
                            cfg: dict, boot: dict) -> pl.DataFrame:
    """Top features of one layer per comparison and direction (see config/README.md).

    buggy_vs_correct: paired test across number pairs (a = buggy format, b = correct format; a
    pair's two orders averaged first).
    wrong_vs_right: within the buggy format, prompts answered wrong (a) vs right (b), unpaired.
    Only features firing in at least `min_firing_rate` of the prompts of either side are tested;
    BH-FDR runs over the tested features of the layer and comparison. Every row gets the ratio of
    means a / b with its interval over number pairs; the held-out rows, held-out ratios and firing
    rates with theirs (`interval_columns`; `boot`: n_resamples, confidence, seed).
    """
    out = []
    buggy_ids = pairs["prompt_id_buggy"].to_numpy()
    correct_ids = pairs["prompt_id_correct"].to_numpy()
    feature_ids = np.sort(values["feature_id"].unique().to_numpy())
    a = dense_matrix(values, buggy_ids, feature_ids)
    b = dense_matrix(values, correct_ids, feature_ids)
    keep = np.maximum((a > 0).mean(axis=0), (b > 0).mean(axis=0)) >= cfg["min_firing_rate"]
    number_pair = pairs["pair_id"].to_numpy()
    p, effect = paired_test(cluster_means(a[:, keep], number_pair), cluster_means(b[:, keep], number_pair), cfg["test"])
    top = _top_rows(layer, "buggy_vs_correct", feature_ids[keep], a[:, keep], b[:, keep], p, effect,
                    top_n=cfg["top_n"], alpha=cfg["fdr_alpha"], n_tested=int(keep.sum()))
    out.append(_with_intervals(top, feature_ids, a, b, number_pair, number_pair, boot))
    chosen = is_selection_pair(number_pair)
    if chosen.sum() > 1 and (~chosen).sum() > 1:
        sa, sb = a[chosen], b[chosen]
        keep_s = np.maximum((sa > 0).mean(axis=0), (sb > 0).mean(axis=0)) >= cfg["min_firing_rate"]
        p_s, effect_s = paired_test(cluster_means(sa[:, keep_s], number_pair[chosen]),
                                    cluster_means(sb[:, keep_s], number_pair[chosen]), cfg["test"])
        top = _top_rows(layer, SPLIT_COMPARISON, feature_ids[keep_s], sa[:, keep_s], sb[:, keep_s], p_s, effect_s,
                        top_n=cfg["top_n"], alpha=cfg["fdr_alpha"], n_tested=int(keep_s.sum()))
        idx = _top_columns(top, feature_ids)
        held_a, held_b = a[~chosen][:, idx], b[~chosen][:, idx]
        top = _with_intervals(top, feature_ids, sa, sb, number_pair[chosen], number_pair[chosen], boot)
        top = top.with_columns(pl.Series("heldout_mean_a", held_a.mean(axis=0)),
                               pl.Series("heldout_mean_b", held_b.mean(axis=0)),
                               pl.Series("heldout_firing_rate_a", (held_a > 0).mean(axis=0)),
                               pl.Series("heldout_firing_rate_b", (held_b > 0).mean(axis=0)))
        held = number_pair[~chosen]
        out.append(_with_intervals(top, feature_ids, a[~chosen], b[~chosen], held, held, boot, prefix="heldout_"))

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
        order = pairs["order"].to_numpy() if "order" in pairs.columns else np.zeros(len(right), dtype=np.int64)
        p, effect = stratified_unpaired_test(wrong_m[:, keep], right_m[:, keep], order[~right], order[right],
                                             cfg["test"])
        top = _top_rows(layer, "wrong_vs_right", feature_ids[keep], wrong_m[:, keep], right_m[:, keep], p,
                        effect, top_n=cfg["top_n"], alpha=cfg["fdr_alpha"], n_tested=int(keep.sum()))
        # Stratified by question order (the test above and the ratio): the model names the number
        # asked last, so which prompts are wrong follows the order, and an order feature would pass
        # for a wrong-answer feature.
        out.append(_with_intervals(top, feature_ids, wrong_m, right_m, number_pair[~right], number_pair[right], boot,
                                   strata=(order[~right], order[right])))
    for col in HELDOUT_COLUMNS:
        dtype = pl.Int64 if col == "n_heldout_pairs" else pl.Float64
        out = [t if col in t.columns else t.with_columns(pl.lit(None, dtype).alias(col)) for t in out]
    return pl.concat([t.select(DISCRIMINATIVE_COLUMNS) for t in out], how="vertical_relaxed")
