"""The patching summary per (method, positions, ..., pair kind, order, layer, head set), with
cluster-bootstrap confidence intervals over number pairs.

A patch can only *fix* a target whose source is right (research notes section 8). The rates:
- success_rate: among the *eligible* targets (source right, target wrong unpatched; n_eligible),
  the fraction right after the patch. Claims of "100 %" and "0 %" are judged on it;
- recovery: the normalised recovery over the eligible targets, sum(LD_patched - LD_target) /
  sum(LD_source - LD_target): 1 = the patch moves the logit difference all the way to the
  source's, 0 = not at all. A ratio of sums (of means), not a mean of per-prompt ratios, whose
  small denominators would dominate;
- flip_rate: among all targets, the fraction whose answer the patch changes (either way);
- fixed_rate_all_wrong: among all targets wrong unpatched (n_baseline_wrong), the fraction right
  after the patch: the original study's success, which counts targets no source can fix;
- broken_rate: among the targets right unpatched, the fraction wrong after the patch;
- accuracy and mean_logit_diff: over all targets (baseline_accuracy beside them).

Every interval is a percentile bootstrap over number pairs (`pair_id`: the two orders of a pair
are not independent); all groups share the same resampled pairs (the same seed), so their
intervals are comparable. Rows are given per pair kind and question order, and pooled ("all").

Two reference rows sit beside the head sets at the same layer and positions: the ceiling (family
`ceiling`: the whole residual stream patched) and, where the subsets were run, the random-head
control (family `random_control`, head set `random_k{k}`: the mean over the random all-head
subsets of k heads, k the size of the even or the odd pool).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import polars as pl

from bugscope.head_sets import pool_heads
from bugscope.prompts import BUG_PAIR_KIND
from bugscope.stats import cluster_bootstrap_mean_ci_columns, cluster_bootstrap_ratio_ci_columns

ALL = "all"  # the pooled value of pair_kind and order
SUMMARY_KEYS = ["method", "positions", "operation", "direction", "target_format", "source_format", "pair_kind",
                "order", "layer", "head_set"]
HEAD_SET_COLUMNS = ["family", "pool", "k", "sample", "heads"]
_SPLIT = ["method", "positions", "operation", "direction"]


def _matrix(per_prompt: pl.DataFrame, groups: pl.DataFrame, keys: list[str], column: str, index: dict) -> np.ndarray:
    mat = np.full((len(index), groups.height), np.nan)
    gkey = per_prompt.select(keys).join(groups.with_row_index("_g"), on=keys, how="left", maintain_order="left")["_g"]
    rows_idx = np.array([index[p] for p in per_prompt["prompt_id"].to_list()])
    mat[rows_idx, gkey.to_numpy()] = per_prompt[column].to_numpy()
    return mat


def summarise(per_prompt: pl.DataFrame, *, keys: Sequence[str], n_resamples: int, confidence: float,
              seed: int) -> pl.DataFrame:
    """One row per `keys` group (e.g. layer, head_set): the rates of the module docstring with CIs.

    `per_prompt` has prompt_id, pair_id, logit_diff, baseline_logit_diff and source_logit_diff, and
    optionally p_correct (the fraction of several head sets under which the prompt is right; the
    random-head control), else p_correct = logit_diff > 0.
    """
    keys = list(keys)
    groups = per_prompt.select(keys).unique(maintain_order=True)
    pids = np.sort(per_prompt["prompt_id"].unique().to_numpy())
    per_target = per_prompt.unique("prompt_id").sort("prompt_id")
    base = per_target["baseline_logit_diff"].to_numpy()
    src = per_target["source_logit_diff"].to_numpy()
    pairs = per_target["pair_id"].to_numpy()
    index = {pid: i for i, pid in enumerate(pids)}
    m = groups.height
    ld = _matrix(per_prompt, groups, keys, "logit_diff", index)
    if np.isnan(ld).any():
        raise ValueError("summarise: some (group, prompt) cells are missing; every group must cover every prompt.")
    right = (_matrix(per_prompt, groups, keys, "p_correct", index) if "p_correct" in per_prompt.columns
             else (ld > 0).astype(float))
    wrong_base, right_base = base <= 0, base > 0
    eligible = wrong_base & (src > 0)
    boot = {"n_resamples": n_resamples, "confidence": confidence, "seed": seed}

    def ci(values):  # rows outside a rate's condition are NaN
        return cluster_bootstrap_mean_ci_columns(values, pairs, **boot)

    def only(mask, values):
        return np.where(mask[:, None], values, np.nan)

    succ = ci(only(eligible, right))
    rec = cluster_bootstrap_ratio_ci_columns(only(eligible, ld - base[:, None]),
                                             only(eligible, np.broadcast_to((src - base)[:, None], ld.shape)),
                                             pairs, **boot)
    flip = ci(np.where(right_base[:, None], 1.0 - right, right))
    fixed = ci(only(wrong_base, right))
    brok = ci(only(right_base, 1.0 - right))
    acc = ci(right)
    mean_ld = ci(ld)
    b_acc = [v[0] for v in ci(right_base.astype(float)[:, None])]
    b_ld = [v[0] for v in ci(base[:, None])]
    cols = {
        "n_prompts": np.full(m, len(pids)), "n_pairs": np.full(m, len(np.unique(pairs))),
        "n_eligible": np.full(m, int(eligible.sum())), "n_baseline_wrong": np.full(m, int(wrong_base.sum())),
        "n_baseline_right": np.full(m, int(right_base.sum())),
        "success_rate": succ[0], "success_low": succ[1], "success_high": succ[2],
        "recovery": rec[0], "recovery_low": rec[1], "recovery_high": rec[2],
        "flip_rate": flip[0], "flip_low": flip[1], "flip_high": flip[2],
        "fixed_rate_all_wrong": fixed[0], "fixed_all_wrong_low": fixed[1], "fixed_all_wrong_high": fixed[2],
        "broken_rate": brok[0], "broken_low": brok[1], "broken_high": brok[2],
        "accuracy": acc[0], "accuracy_low": acc[1], "accuracy_high": acc[2],
        "baseline_accuracy": np.full(m, b_acc[0]), "baseline_accuracy_low": np.full(m, b_acc[1]),
        "baseline_accuracy_high": np.full(m, b_acc[2]),
        "mean_logit_diff": mean_ld[0], "logit_diff_low": mean_ld[1], "logit_diff_high": mean_ld[2],
        "baseline_mean_logit_diff": np.full(m, b_ld[0]),
        "baseline_logit_diff_low": np.full(m, b_ld[1]), "baseline_logit_diff_high": np.full(m, b_ld[2]),
    }
    return groups.with_columns(**{k: pl.Series(k, v) for k, v in cols.items()}).with_columns(
        pl.lit(confidence).alias("confidence"))


def random_control(per_prompt: pl.DataFrame, n_heads: int) -> pl.DataFrame:
    """Per-prompt rows of the random-head control: for k the size of the even and of the odd pool,
    the mean logit difference and the fraction right over the random all-head subsets of k heads."""
    sizes = sorted({len(pool_heads("even", n_heads)), len(pool_heads("odd", n_heads))} - {0})
    drawn = per_prompt.filter(pl.col("family") == "subset", pl.col("pool") == "all", pl.col("k").is_in(sizes))
    if drawn.height == 0:
        return per_prompt.clear().with_columns(pl.lit(None, pl.Float64).alias("p_correct"))
    by = [c for c in per_prompt.columns if c not in ("head_set", "family", "sample", "heads", "logit_diff", "is_correct")]
    out = drawn.group_by(by, maintain_order=True).agg(
        pl.col("logit_diff").mean(), (pl.col("logit_diff") > 0).cast(pl.Float64).mean().alias("p_correct"))
    return out.with_columns(
        pl.format("random_k{}", pl.col("k")).alias("head_set"), pl.lit("random_control").alias("family"),
        pl.lit(-1, pl.Int32).alias("sample"), pl.lit([], pl.List(pl.Int32)).alias("heads"),
        (pl.col("logit_diff") > 0).alias("is_correct"))


def _splits(per_prompt: pl.DataFrame):
    """(pair_kind, order, rows): every kind and order, and each pooled."""
    kinds = [ALL, *sorted(per_prompt["pair_kind"].unique().to_list())]
    orders = [ALL, *sorted(per_prompt["order"].unique().to_list())]
    for kind in kinds:
        for order in orders:
            sub = per_prompt
            if kind != ALL:
                sub = sub.filter(pl.col("pair_kind") == kind)
            if order != ALL:
                sub = sub.filter(pl.col("order") == order)
            if sub.height:
                yield kind, order, sub


def summary_table(per_prompt: pl.DataFrame, *, n_resamples: int, confidence: float, seed: int,
                  n_heads: int | None = None) -> pl.DataFrame:
    """One row per (method, positions, ..., pair kind, order, layer, head set): `summarise` plus the
    head-set columns. With `n_heads`, the random-head control rows are added where subsets exist."""
    if n_heads is not None:
        control = random_control(per_prompt, n_heads)
        if control.height:
            per_prompt = per_prompt.with_columns(pl.lit(None, pl.Float64).alias("p_correct"))
            per_prompt = pl.concat([per_prompt, control.select(per_prompt.columns).cast(dict(per_prompt.schema))])
    set_keys = [k for k in SUMMARY_KEYS if k not in ("pair_kind", "order")]
    sets = per_prompt.select(*set_keys, *HEAD_SET_COLUMNS).unique(set_keys, maintain_order=True)
    parts = []
    for _, by_method in per_prompt.group_by(_SPLIT, maintain_order=True):
        for kind, order, sub in _splits(by_method):
            sub = sub.with_columns(pl.lit(kind).alias("pair_kind"), pl.lit(order).alias("order"))
            if "p_correct" in sub.columns:
                sub = sub.with_columns(pl.col("p_correct").fill_null((pl.col("logit_diff") > 0).cast(pl.Float64)))
            parts.append(summarise(sub, keys=SUMMARY_KEYS, n_resamples=n_resamples, confidence=confidence, seed=seed))
    out = pl.concat(parts).join(sets, on=set_keys, how="left", maintain_order="left")
    first = [*SUMMARY_KEYS, *HEAD_SET_COLUMNS]
    return out.select(*first, *[c for c in out.columns if c not in first]).sort(
        "method", "positions", "pair_kind", "order", "layer", "family", "head_set")


def bug_kind_rows(summary: pl.DataFrame) -> pl.DataFrame:
    """The rows the figures and the ledger read by default: the bug's pair kind, both orders pooled."""
    return summary.filter(pl.col("pair_kind") == BUG_PAIR_KIND, pl.col("order") == ALL)
