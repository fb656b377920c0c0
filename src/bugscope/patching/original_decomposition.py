"""The decomposition of the gap between the original procedure and the per-head method: every
setting of `bugscope.patching.original_method.settings` on the same prompts (`run_decomposition`), and its
summary with cluster-bootstrap intervals over number pairs (`summarise`). The procedure and the
settings themselves: bugscope.patching.original_method.
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np
import polars as pl

from bugscope.data.prompts import ALL, BUG_PAIR_KIND
from bugscope.patching.head_sets import HeadSet
from bugscope.patching.original_method import (
    Setting,
    decomposition_pairs,
    generate_patched,
    generate_plain,
    is_seed_prompt,
    judge,
    settings,
)
from bugscope.patching.pairs import PatchPair
from bugscope.stats import cluster_bootstrap_mean_ci_columns, clustered_proportion_columns

log = logging.getLogger("bugscope")


# --- the summary -----------------------------------------------------------------------------------


SETTING_COLUMNS = ["setting", "step", "chain", "changed", "reference", "site", "positions", "decode_patch", "input",
                   "metric", "pairs"]
PER_PROMPT_COLUMNS = [*SETTING_COLUMNS, "layer", "head_set", "heads", "prompt_id", "source_prompt_id", "question_id",
                      "pair_id", "pair_kind", "order", "correct", "wrong", "generated", "logit_diff", "judged",
                      "baseline_judged", "source_judged"]


def setting_columns(s: Setting) -> dict:
    return {"setting": s.name, "step": s.step, "chain": s.step >= 0, "changed": s.changed, "reference": s.reference,
            "site": s.site, "positions": s.positions, "decode_patch": s.decode_patch if s.generates else None,
            "input": s.input, "metric": s.metric, "pairs": s.pairs}


def summarise(per_prompt: pl.DataFrame, *, n_resamples: int, confidence: float, seed: int) -> pl.DataFrame:
    """One row per (setting, layer, head set):
    - n_prompts / n_pairs: the targets judged (one for the seed pair);
    - success_rate: among the eligible targets (n_eligible: the source judged right and the target
      judged wrong unpatched, by the setting's own metric), the fraction judged right after the patch;
    - original_success: among all targets, the fraction judged right after the patch (the original's
      own measure, which counts targets no source can fix);
    - baseline_success / source_success: the unpatched targets / sources judged right;
    - delta_original_success: original_success minus the reference setting's, on the same targets
      (paired within each resample; for the seed pair against many pairs, the reference's single
      value is subtracted from this interval).
    Intervals: the success rate's is exact over number pairs (`stats.clustered_proportion_columns`),
    the others a percentile cluster bootstrap over number pairs (pair_id), the same draws for every row.
    """
    keys = ["setting", "layer", "head_set"]
    groups = per_prompt.select(*SETTING_COLUMNS, "layer", "head_set", "heads").unique(keys, maintain_order=True)
    targets = per_prompt.select("prompt_id", "pair_id").unique("prompt_id").sort("prompt_id")
    index = {p: i for i, p in enumerate(targets["prompt_id"].to_list())}
    pairs = targets["pair_id"].to_numpy()
    n, m = targets.height, groups.height
    judged, base, src = (np.full((n, m), np.nan) for _ in range(3))
    gidx = {k: j for j, k in enumerate(groups.select(keys).iter_rows())}
    for r in per_prompt.select(*keys, "prompt_id", "judged", "baseline_judged", "source_judged").iter_rows():
        j, i = gidx[r[:3]], index[r[3]]
        judged[i, j], base[i, j], src[i, j] = float(r[4]), float(r[5]), float(r[6])
    eligible = (base == 0) & (src == 1)
    boot = {"n_resamples": n_resamples, "confidence": confidence, "seed": seed}
    exact = clustered_proportion_columns(np.where(eligible, judged, np.nan), pairs, confidence)
    succ = exact["rate"], exact["low"], exact["high"]
    orig = cluster_bootstrap_mean_ci_columns(judged, pairs, **boot)
    # the reference's value on the same targets (NaN where it did not judge them)
    ref = np.full((n, m), np.nan)
    ref_scalar = np.full(m, np.nan)
    names = groups["reference"].to_list()
    for j, (_, layer, hs) in enumerate(groups.select(keys).iter_rows()):
        if names[j] is None or (names[j], layer, hs) not in gidx:
            continue
        k = gidx[(names[j], layer, hs)]
        here, there = ~np.isnan(judged[:, j]), ~np.isnan(judged[:, k])
        if (here <= there).all():
            ref[:, j] = np.where(here, judged[:, k], np.nan)
        else:  # the reference judged fewer targets (the seed pair): subtract its mean
            ref_scalar[j] = np.nanmean(judged[:, k])
    paired = ~np.isnan(ref).all(axis=0)
    diff = np.where(paired[None], judged - ref, judged - np.nan_to_num(ref_scalar)[None])
    delta = cluster_bootstrap_mean_ci_columns(diff, pairs, **boot)
    no_ref = ~paired & np.isnan(ref_scalar)
    delta = [np.where(no_ref, np.nan, v) for v in delta]
    with np.errstate(invalid="ignore"):
        counts = (~np.isnan(judged)).sum(0)
        n_pairs = [len(np.unique(pairs[~np.isnan(judged[:, j])])) for j in range(m)]
        base_rate = np.nanmean(base, axis=0)
        src_rate = np.nanmean(src, axis=0)
    return groups.with_columns(
        pl.lit(BUG_PAIR_KIND).alias("pair_kind"), pl.lit(ALL).alias("order"),
        pl.Series("n_prompts", counts, dtype=pl.Int64), pl.Series("n_pairs", n_pairs, dtype=pl.Int64),
        pl.Series("n_eligible", eligible.sum(0), dtype=pl.Int64),
        pl.Series("n_eligible_pairs", exact["n_clusters"], dtype=pl.Int64),
        pl.Series("success_rate", succ[0]), pl.Series("success_low", succ[1]), pl.Series("success_high", succ[2]),
        pl.Series("original_success", orig[0]), pl.Series("original_success_low", orig[1]),
        pl.Series("original_success_high", orig[2]),
        pl.Series("baseline_success", base_rate), pl.Series("source_success", src_rate),
        pl.Series("delta_original_success", delta[0]), pl.Series("delta_low", delta[1]),
        pl.Series("delta_high", delta[2]), pl.lit(confidence).alias("confidence"),
    ).sort("layer", "head_set", pl.col("step").replace(-1, 1000), "setting")


# --- the whole stage -------------------------------------------------------------------------------


def run_decomposition(model, tokenizer, patcher, prompts: pl.DataFrame, layers: Sequence[int],
                      head_sets: Sequence[HeadSet], *, target_format: str, source_format: str, direction: str,
                      positions: str, n_pairs: int, max_new_tokens: int, add_special_tokens: bool,
                      batch_rows: int) -> pl.DataFrame:
    """The per-prompt table of every setting (PER_PROMPT_COLUMNS) at `layers`: generation runs are
    shared between settings that differ in metric or pairs only; logit settings use `patcher`
    (a `bugscope.patching.HeadPatcher`)."""
    from bugscope.patching.pairs import PatchSpec
    from bugscope.patching.study import run_study_sweep

    pairs = decomposition_pairs(prompts, target_format, source_format, n_pairs)
    if not pairs:
        raise ValueError(f"the decomposition has no {BUG_PAIR_KIND} question in both {target_format!r} and "
                         f"{source_format!r}; check prompts.n_pairs and patching.original_generation.n_pairs")
    meta = {p.target["prompt_id"]: p for p in pairs}
    plan = settings(positions)
    none = HeadSet("none", "none", (), "all")
    gkw = {"max_new_tokens": max_new_tokens, "add_special_tokens": add_special_tokens, "batch_rows": batch_rows}
    # the sources' own answers and the unpatched targets, per input
    plain = {}
    for kind in sorted({s.input for s in plan if s.generates}):
        t0 = time.time()
        src = generate_plain(model, tokenizer, [p.source for p in pairs], input_kind=kind, **gkw)
        log.info("the sources' own answers (%s input): %d in %.1f s", kind, src.height, time.time() - t0)
        plain[kind] = dict(zip(src["prompt_id"].to_list(), src["generated"].to_list()))
    runs: dict[tuple, pl.DataFrame] = {}
    for s in plan:
        if not s.generates or (s.run_key, layers[0]) in runs:
            continue
        for layer in layers:
            with_base = [*head_sets, none] if ("base", s.input, layer) not in runs else list(head_sets)
            t0 = time.time()
            got = generate_patched(model, tokenizer, pairs, layer, with_base, site=s.site, positions=s.positions,
                                   decode_patch=s.decode_patch, input_kind=s.input, **gkw)
            log.info("generation for %s at layer %d: %d rows in %.1f s", s.name, layer, got.height, time.time() - t0)
            if none in with_base:
                runs[("base", s.input, layer)] = got.filter(pl.col("head_set") == "none")
            runs[(s.run_key, layer)] = got.filter(pl.col("head_set") != "none")
    logit = {}
    sets = {layer: list(head_sets) for layer in layers}
    sub = prompts.filter(pl.col("question_id").is_in([p.target["question_id"] for p in pairs]))
    for s in plan:
        if s.generates or (s.site, s.positions) in logit:
            continue
        t0 = time.time()
        spec = PatchSpec(site=s.site, positions=s.positions, operation="patch")
        logit[(s.site, s.positions)] = run_study_sweep(patcher, sub, sets, spec, target_format=target_format,
                                                       source_format=source_format, direction=direction,
                                                       desc=f"decomposition {s.name}")
        log.info("decision logits for %s: %.1f s", s.name, time.time() - t0)
    heads = {hs.name: list(hs.heads) for hs in head_sets}
    rows = []
    for s in plan:
        for layer in layers:
            if s.generates:
                got = runs[(s.run_key, layer)]
                base = dict(runs[("base", s.input, layer)].select("prompt_id", "generated").iter_rows())
                for hs, pid, text in got.select("head_set", "prompt_id", "generated").iter_rows():
                    p = meta[pid]
                    if s.pairs == "seed" and not is_seed_prompt(p.target):
                        continue
                    c, w = p.target["correct"], p.target["wrong"]
                    rows.append({**_row(s, layer, hs, heads, p), "generated": text, "logit_diff": None,
                                 "judged": judge(text, c, w, s.metric),
                                 "baseline_judged": judge(base[pid], c, w, s.metric),
                                 "source_judged": judge(plain[s.input][p.source["prompt_id"]], c, w, s.metric)})
            else:
                table = logit[(s.site, s.positions)].filter(pl.col("layer") == layer)
                for r in table.iter_rows(named=True):
                    p = meta[r["prompt_id"]]
                    if s.pairs == "seed" and not is_seed_prompt(p.target):
                        continue
                    rows.append({**_row(s, layer, r["head_set"], heads, p), "generated": None,
                                 "logit_diff": r["logit_diff"], "judged": r["logit_diff"] > 0,
                                 "baseline_judged": r["baseline_logit_diff"] > 0,
                                 "source_judged": r["source_logit_diff"] > 0})
    return pl.DataFrame(rows, schema=PER_PROMPT_SCHEMA).select(PER_PROMPT_COLUMNS)


def _row(s: Setting, layer: int, head_set: str, heads: dict, p: PatchPair) -> dict:
    t = p.target
    return {**setting_columns(s), "layer": layer, "head_set": head_set, "heads": heads[head_set],
            "prompt_id": t["prompt_id"], "source_prompt_id": p.source["prompt_id"], "question_id": t["question_id"],
            "pair_id": t["pair_id"], "pair_kind": t["pair_kind"], "order": t["order"], "correct": t["correct"],
            "wrong": t["wrong"]}


PER_PROMPT_SCHEMA = {
    "setting": pl.String, "step": pl.Int32, "chain": pl.Boolean, "changed": pl.String, "reference": pl.String,
    "site": pl.String, "positions": pl.String, "decode_patch": pl.Boolean, "input": pl.String, "metric": pl.String,
    "pairs": pl.String, "layer": pl.Int32, "head_set": pl.String, "heads": pl.List(pl.Int32), "prompt_id": pl.Int32,
    "source_prompt_id": pl.Int32, "question_id": pl.Int32, "pair_id": pl.Int32, "pair_kind": pl.String,
    "order": pl.String, "correct": pl.String, "wrong": pl.String, "generated": pl.String, "logit_diff": pl.Float64,
    "judged": pl.Boolean, "baseline_judged": pl.Boolean, "source_judged": pl.Boolean,
}
