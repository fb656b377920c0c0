"""The patching summary: success, broken and accuracy rates and mean logit differences per
(method, positions, ..., layer, head set), with bootstrap confidence intervals."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import polars as pl

from bugscope.stats import cluster_bootstrap_mean_ci_columns

SUMMARY_KEYS = ["method", "positions", "operation", "direction", "target_format", "source_format", "layer", "head_set"]
HEAD_SET_COLUMNS = ["family", "pool", "k", "sample", "heads"]


def summarise(per_prompt: pl.DataFrame, *, keys: Sequence[str], n_resamples: int, confidence: float,
              seed: int) -> pl.DataFrame:
    """One row per `keys` group (e.g. layer, head_set): rates and mean logit difference with bootstrap CIs.

    - success_rate: among target prompts that are *wrong* unpatched, the fraction right after the patch;
    - broken_rate: among target prompts that are *right* unpatched, the fraction wrong after the patch;
    - accuracy: the fraction of all target prompts right after the patch (baseline_accuracy beside it);
    - mean_logit_diff: mean patched logit difference over all target prompts.
    Every interval is a percentile bootstrap over number pairs (`pair_id`: the two orders of a pair
    are not independent, research notes section 8); all groups share the same resampled pairs (the
    same seed), so their intervals are comparable.
    """
    keys = list(keys)
    groups = per_prompt.select(keys).unique(maintain_order=True)
    pids = np.sort(per_prompt["prompt_id"].unique().to_numpy())
    per_target = per_prompt.unique("prompt_id").sort("prompt_id")
    base = per_target["baseline_logit_diff"].to_numpy()
    pairs = per_target["pair_id"].to_numpy()
    index = {pid: i for i, pid in enumerate(pids)}
    n, m = len(pids), groups.height
    mat = np.full((n, m), np.nan)
    gkey = per_prompt.select(keys).join(groups.with_row_index("_g"), on=keys, how="left", maintain_order="left")["_g"]
    rows_idx = np.array([index[p] for p in per_prompt["prompt_id"].to_list()])
    mat[rows_idx, gkey.to_numpy()] = per_prompt["logit_diff"].to_numpy()
    if np.isnan(mat).any():
        raise ValueError("summarise: some (group, prompt) cells are missing; every group must cover every prompt.")
    wrong, right = base <= 0, base > 0
    boot = {"n_resamples": n_resamples, "confidence": confidence, "seed": seed}

    def ci(values):  # rows outside a rate's condition are NaN
        return cluster_bootstrap_mean_ci_columns(values, pairs, **boot)

    succ = ci(np.where(wrong[:, None], mat > 0, np.nan))
    brok = ci(np.where(right[:, None], mat <= 0, np.nan))
    acc = ci((mat > 0).astype(float))
    ld = ci(mat)
    b_acc = [v[0] for v in ci(right.astype(float)[:, None])]
    b_ld = [v[0] for v in ci(base[:, None])]
    cols = {
        "n_prompts": np.full(m, n), "n_pairs": np.full(m, len(np.unique(pairs))), "n_baseline_wrong": np.full(m, int(wrong.sum())),
        "n_baseline_right": np.full(m, int(right.sum())),
        "success_rate": succ[0], "success_low": succ[1], "success_high": succ[2],
        "broken_rate": brok[0], "broken_low": brok[1], "broken_high": brok[2],
        "accuracy": acc[0], "accuracy_low": acc[1], "accuracy_high": acc[2],
        "baseline_accuracy": np.full(m, b_acc[0]), "baseline_accuracy_low": np.full(m, b_acc[1]),
        "baseline_accuracy_high": np.full(m, b_acc[2]),
        "mean_logit_diff": ld[0], "logit_diff_low": ld[1], "logit_diff_high": ld[2],
        "baseline_mean_logit_diff": np.full(m, b_ld[0]),
        "baseline_logit_diff_low": np.full(m, b_ld[1]), "baseline_logit_diff_high": np.full(m, b_ld[2]),
    }
    return groups.with_columns(**{k: pl.Series(k, v) for k, v in cols.items()}).with_columns(
        pl.lit(confidence).alias("confidence"))



def summary_table(per_prompt: pl.DataFrame, *, n_resamples: int, confidence: float, seed: int) -> pl.DataFrame:
    """One row per (method, positions, ..., layer, head set): `summarise` plus the head-set columns."""
    sets = per_prompt.select(*SUMMARY_KEYS, *HEAD_SET_COLUMNS).unique(SUMMARY_KEYS, maintain_order=True)
    parts = []
    for _, sub in per_prompt.group_by(["method", "positions", "operation", "direction"], maintain_order=True):
        parts.append(summarise(sub, keys=SUMMARY_KEYS, n_resamples=n_resamples, confidence=confidence, seed=seed))
    out = pl.concat(parts).join(sets, on=SUMMARY_KEYS, how="left", maintain_order="left")
    first = [*SUMMARY_KEYS, *HEAD_SET_COLUMNS]
    return out.select(*first, *[c for c in out.columns if c not in first]).sort(
        "method", "positions", "layer", "family", "head_set")
