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

The success and broken rates are proportions over few targets, so their intervals are exact over
number pairs (`stats.clustered_proportion_columns`: Clopper-Pearson with one target per pair,
Wilson on the design-effect-adjusted n with several); `n_eligible_pairs` is the number of pairs
the success rate rests on. Every other interval is a percentile bootstrap over number pairs
(`pair_id`: the two orders of a pair are not independent); all groups share the same resampled
pairs (the same seed), so their intervals are comparable. Rows are given per pair kind and question order, and pooled ("all").

Two reference rows sit beside the head sets at the same layer and positions: the ceiling (family
`ceiling`: the whole residual stream patched; each row's `ceiling_share` is the eligible targets it
fixes over those the ceiling fixes, with its CI) and, where the subsets were run, the random-head
control (family `random_control`, head set `random_k{k}`: the mean over the random all-head
subsets of k heads, k the size of the even or the odd pool).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import polars as pl

from bugscope.data.prompts import ALL, BUG_PAIR_KIND, kind_order_splits
from bugscope.patching.head_sets import control_sizes
from bugscope.stats import (
    cluster_bootstrap_mean_ci_columns,
    cluster_bootstrap_ratio_ci_columns,
    clustered_proportion_columns,
)

SUMMARY_KEYS = ["method", "positions", "operation", "direction", "target_format", "source_format", "pair_kind",
                "order", "layer", "head_set"]
HEAD_SET_COLUMNS = ["family", "pool", "k", "sample", "heads"]
_SPLIT = ["method", "positions", "operation", "direction"]
_TARGET = ["prompt_id", "pair_id", "pair_kind", "order", "baseline_logit_diff", "source_logit_diff"]


def per_prompt_matrices(per_prompt: pl.DataFrame, keys: list[str]) -> tuple[pl.DataFrame, pl.DataFrame, np.ndarray]:
    """(groups: the unique `keys`, targets: one row per prompt_id, ld [targets, groups])."""
    groups = per_prompt.select(keys).unique(maintain_order=True)
    targets = per_prompt.select(*[c for c in _TARGET if c in per_prompt.columns]).unique("prompt_id").sort("prompt_id")
    index = {pid: i for i, pid in enumerate(targets["prompt_id"].to_list())}
    ld = np.full((targets.height, groups.height), np.nan)
    gkey = per_prompt.select(keys).join(groups.with_row_index("_g"), on=keys, how="left", maintain_order="left")["_g"]
    rows = np.array([index[p] for p in per_prompt["prompt_id"].to_list()])
    ld[rows, gkey.to_numpy()] = per_prompt["logit_diff"].to_numpy()
    if np.isnan(ld).any():
        raise ValueError("summarise: some (group, prompt) cells are missing; every group must cover every prompt.")
    return groups, targets, ld


def is_eligible(baseline_logit_diff, source_logit_diff, direction: str):
    """Whether a patch can move the target to its source's answer: fix, the target wrong and the
    source right; break, the target right and the source wrong (research notes section 8)."""
    target_right, source_right = baseline_logit_diff > 0, source_logit_diff > 0
    if direction == "fix":
        return ~target_right & source_right
    return target_right & ~source_right


def rate_columns(ld: np.ndarray, right: np.ndarray, base: np.ndarray, src: np.ndarray, pairs: np.ndarray,
           boot: dict, direction: str = "fix", ceiling: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The columns of the module docstring for targets x groups matrices (right: fraction right).

    Success is taking the source's answer, on the targets whose answer differs from it
    (`is_eligible`): in the break direction, a right target turned wrong by a wrong source.
    `ceiling` [groups]: the column of each group's ceiling (-1: none), for the ceiling share."""
    m = ld.shape[1]
    wrong_base, right_base = base <= 0, base > 0
    eligible = is_eligible(base, src, direction)
    takes_source = right if direction == "fix" else 1.0 - right

    def ci(values):  # rows outside a rate's condition are NaN
        return cluster_bootstrap_mean_ci_columns(values, pairs, **boot)

    def only(mask, values):
        return np.where(mask[:, None], values, np.nan)

    def exact(values):
        out = clustered_proportion_columns(values, pairs, boot["confidence"])
        return out["rate"], out["low"], out["high"], out["n_clusters"]

    succ = exact(only(eligible, takes_source))
    share = ceiling_share(only(eligible, takes_source), ceiling, pairs, boot)
    rec = cluster_bootstrap_ratio_ci_columns(only(eligible, ld - base[:, None]),
                                             only(eligible, np.broadcast_to((src - base)[:, None], ld.shape)),
                                             pairs, **boot)
    flip = ci(np.where(right_base[:, None], 1.0 - right, right))
    fixed = ci(only(wrong_base, right))
    brok = exact(only(right_base, 1.0 - right))
    acc = ci(right)
    mean_ld = ci(ld)
    b_acc = [v[0] for v in ci(right_base.astype(float)[:, None])]
    b_ld = [v[0] for v in ci(base[:, None])]
    return {
        "n_prompts": np.full(m, len(base)), "n_pairs": np.full(m, len(np.unique(pairs))),
        "n_eligible": np.full(m, int(eligible.sum())), "n_eligible_pairs": succ[3],
        "n_baseline_wrong": np.full(m, int(wrong_base.sum())),
        "n_baseline_right": np.full(m, int(right_base.sum())),
        "success_rate": succ[0], "success_low": succ[1], "success_high": succ[2],
        "ceiling_share": share[0], "ceiling_share_low": share[1], "ceiling_share_high": share[2],
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


def ceiling_share(success: np.ndarray, ceiling: np.ndarray | None, pairs: np.ndarray, boot: dict):
    """(share, low, high) [groups]: the eligible targets a group fixes over those its ceiling (the
    whole residual stream patched at the same layer and positions) fixes, a ratio of sums over the
    same targets with its cluster-bootstrap CI. "X fixes the bug" at a site is read against what
    any patch there can fix: where the ceiling fixes 51 of 63 targets, a head set fixing 50 fixes
    what the site carries. NaN without a ceiling column or with no target the ceiling fixes."""
    m = success.shape[1]
    if ceiling is None or (ceiling < 0).all():
        nan = np.full(m, np.nan)
        return nan, nan.copy(), nan.copy()
    has = ceiling >= 0
    denominator = np.where(has[None, :], success[:, np.where(has, ceiling, 0)], np.nan)
    return cluster_bootstrap_ratio_ci_columns(np.where(has[None, :], success, np.nan), denominator, pairs, **boot)


def ceiling_columns(groups: pl.DataFrame, keys: Sequence[str]) -> np.ndarray:
    """[groups]: the row index of each group's ceiling group (family `ceiling`, the same `keys` but
    the head set), -1 where there is none."""
    keys = [k for k in keys if k != "head_set" and k in groups.columns]
    index = groups.with_row_index("_g")
    ceilings = index.filter(pl.col("family") == "ceiling").select(*keys, pl.col("_g").alias("_ceiling"))
    if "family" not in groups.columns or ceilings.height == 0:
        return np.full(groups.height, -1)
    joined = index.join(ceilings, on=keys, how="left", maintain_order="left")
    return joined["_ceiling"].fill_null(-1).to_numpy().astype(int)


def _frame(groups: pl.DataFrame, cols: dict[str, np.ndarray], confidence: float) -> pl.DataFrame:
    return groups.with_columns(**{k: pl.Series(k, v) for k, v in cols.items()}).with_columns(
        pl.lit(confidence).alias("confidence"))


def summarise(per_prompt: pl.DataFrame, *, keys: Sequence[str], n_resamples: int, confidence: float,
              seed: int, direction: str = "fix") -> pl.DataFrame:
    """One row per `keys` group (e.g. layer, head_set) over all prompts: the rates of the module
    docstring. `per_prompt` has prompt_id, pair_id, logit_diff, baseline_logit_diff, source_logit_diff."""
    groups, targets, ld = per_prompt_matrices(per_prompt, list(keys))
    cols = rate_columns(ld, (ld > 0).astype(float), targets["baseline_logit_diff"].to_numpy(),
                  targets["source_logit_diff"].to_numpy(), targets["pair_id"].to_numpy(),
                  {"n_resamples": n_resamples, "confidence": confidence, "seed": seed}, direction)
    return _frame(groups, cols, confidence)


def _with_random_control(groups: pl.DataFrame, ld: np.ndarray, right: np.ndarray, n_heads: int):
    """Adds the random-head control columns: for k the size of the even and of the odd pool, the
    mean logit difference and the fraction right over the random all-head subsets of k heads."""
    sizes = control_sizes(n_heads)
    is_drawn = (groups["family"] == "subset") & (groups["pool"] == "all")
    extra, ld_cols, right_cols = [], [], []
    for _, sub in groups.with_row_index("_g").filter(is_drawn).group_by(
            ["layer", *[c for c in groups.columns if c not in ("layer", "head_set", *HEAD_SET_COLUMNS)]],
            maintain_order=True):
        for k in sizes:
            cols = sub.filter(pl.col("k") == k)["_g"].to_numpy()
            if len(cols) == 0:
                continue
            row = sub.row(0, named=True)
            extra.append({**{c: row[c] for c in groups.columns}, "head_set": f"random_k{k}",
                          "family": "random_control", "k": k, "sample": -1, "heads": []})
            ld_cols.append(ld[:, cols].mean(axis=1))
            right_cols.append(right[:, cols].mean(axis=1))
    if not extra:
        return groups, ld, right
    more = pl.DataFrame(extra, schema=groups.schema)
    return (pl.concat([groups, more]), np.column_stack([ld, *ld_cols]), np.column_stack([right, *right_cols]))


def summary_table(per_prompt: pl.DataFrame, *, n_resamples: int, confidence: float, seed: int,
                  n_heads: int | None = None, extra_keys: Sequence[str] = ()) -> pl.DataFrame:
    """One row per (method, positions, ..., pair kind, order, layer, head set[, extra_keys]): the
    rates of the module docstring plus the head-set columns. With `n_heads`, the random-head control
    rows are added where the subsets were run. The direction column decides eligibility (`rate_columns`)."""
    set_keys = [k for k in SUMMARY_KEYS if k not in ("pair_kind", "order")] + list(extra_keys)
    boot = {"n_resamples": n_resamples, "confidence": confidence, "seed": seed}
    parts = []
    for _, by_method in per_prompt.group_by(_SPLIT, maintain_order=True):
        groups, targets, ld = per_prompt_matrices(by_method, set_keys)
        sets = by_method.select(*set_keys, *HEAD_SET_COLUMNS).unique(set_keys, maintain_order=True)
        groups = groups.join(sets, on=set_keys, how="left", maintain_order="left")
        right = (ld > 0).astype(float)
        if n_heads is not None:
            groups, ld, right = _with_random_control(groups, ld, right, n_heads)
        base, src = targets["baseline_logit_diff"].to_numpy(), targets["source_logit_diff"].to_numpy()
        pairs = targets["pair_id"].to_numpy()
        ceiling = ceiling_columns(groups, set_keys)
        for kind, order, mask in kind_order_splits(targets["pair_kind"].cast(pl.String).to_list(),
                                                   targets["order"].cast(pl.String).to_list()):
            cols = rate_columns(ld[mask], right[mask], base[mask], src[mask], pairs[mask], boot,
                          by_method["direction"][0], ceiling)
            parts.append(_frame(groups.with_columns(pl.lit(kind).alias("pair_kind"), pl.lit(order).alias("order")),
                                cols, confidence))
    return concat_summaries(parts)


def concat_summaries(parts: Sequence[pl.DataFrame]) -> pl.DataFrame:
    """`summary_table`s of disjoint head sets of the same target prompts as one table. Its rows are
    the same as one `summary_table` of all of them: every group's interval uses the same resampled
    pairs (the seed and the pairs decide the draws), so the inputs can be summarised one at a time."""
    out = pl.concat(parts)
    first = [*SUMMARY_KEYS, *[c for c in ("fraction",) if c in out.columns], *HEAD_SET_COLUMNS]
    return out.select(*first, *[c for c in out.columns if c not in first]).sort(
        "method", "positions", "direction", "pair_kind", "order", "layer", "family", "head_set",
        *[c for c in ("fraction",) if c in out.columns])


def bug_kind_rows(summary: pl.DataFrame) -> pl.DataFrame:
    """The rows the figures and the ledger read by default: the bug's pair kind, both orders pooled."""
    return summary.filter(pl.col("pair_kind") == BUG_PAIR_KIND, pl.col("order") == ALL)
