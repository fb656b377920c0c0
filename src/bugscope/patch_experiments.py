"""The paper's patching claims as experiments at the focus layers, each a table of its own:

- replacement fraction: a * source + (1 - a) * target in the patched heads (`replacement`);
- every head set of every size, by composition: even, odd, mixed (`exhaustive`);
- the residual stream patched at one (layer, matched position) at a time (`residual_map`), the
  ceiling of every head-level patch at that layer and position;
- both directions, fix and break, and the result on each number pair the config lists
  (`bidirectional`, `listed_pairs`).

Every rate is read on the eligible targets (`patching.is_eligible`), with cluster-bootstrap
intervals over number pairs (`bugscope.patch_summary`). The exhaustive sets and the residual map
patch only the eligible targets: success and recovery are all they report, and their n is the
eligible targets anyway.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import polars as pl

from bugscope import patch_summary, patching
from bugscope.head_sets import exhaustive_head_sets, head_composition, named_head_sets, pool_heads
from bugscope.prompts import kind_order_splits

ORIGINAL_SETS = ("all", "even", "odd")  # the seed's and the paper's head sets


def _boot(config: dict) -> dict:
    b = config["bootstrap"]
    return {"n_resamples": b["n_resamples"], "confidence": b["confidence"], "seed": config["seed"]}


def _formats(config: dict, direction: str) -> dict:
    target, source = patching.direction_formats(config["prompts"], direction)
    return {"target_format": target, "source_format": source, "direction": direction}


def _sets(n_heads: int, layers: Sequence[int], names: Sequence[str] = ORIGINAL_SETS) -> dict[int, list]:
    return {layer: [s for s in named_head_sets(n_heads) if s.name in names] for layer in layers}


def replacement(patcher, prompts: pl.DataFrame, layers: Sequence[int], config: dict) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(per prompt, summary) of the all / even / odd head sets at each replacement fraction, under
    per-head patching (configured positions) and the original method (post-o_proj slices, [:min_len])."""
    spec, *_ = patching.spec_from_config(config)
    fractions = sorted(float(a) for a in config["patching"]["replacement"]["fractions"])
    specs = [spec, patching.ORIGINAL_METHOD]
    per_prompt = pl.concat([
        patching.run_study_sweep(patcher, prompts, _sets(patcher.n_heads, layers), s, fractions=fractions,
                                 desc=f"replacement ({s.method})", **_formats(config, config["patching"]["direction"]))
        for s in specs])
    summary = patch_summary.summary_table(per_prompt, extra_keys=["fraction"], **_boot(config))
    return per_prompt, summary


def exhaustive(patcher, prompts: pl.DataFrame, layers: Sequence[int], config: dict) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(per prompt, summary) of every head set of `patching.exhaustive` on the eligible targets."""
    ex = config["patching"]["exhaustive"]
    spec, *_ = patching.spec_from_config(config)
    sets = {}
    for layer in layers:
        drawn = exhaustive_head_sets(patcher.n_heads, pools=ex["pools"], budget=ex["budget"], samples=ex["samples"],
                                     seed=config["seed"], layer=layer)
        sets[layer] = [s for s in drawn if ex["sizes"] is None or s.k in ex["sizes"]]
    per_prompt = patching.run_study_sweep(patcher, prompts, sets, spec, desc="exhaustive head sets",
                                          only_eligible=True, **_formats(config, config["patching"]["direction"]))
    summary = patch_summary.summary_table(per_prompt, **_boot(config))
    n_even = len(pool_heads("even", patcher.n_heads))
    comp = [head_composition(h) for h in summary["heads"].to_list()]
    summary = summary.with_columns(
        n_even=pl.Series([c[0] for c in comp], dtype=pl.Int32), n_odd=pl.Series([c[1] for c in comp], dtype=pl.Int32),
        composition=pl.Series([c[2] for c in comp], dtype=pl.String),
        k_of_even_pool=pl.col("k") / n_even)
    return per_prompt, summary


def subset_distribution(summary: pl.DataFrame) -> pl.DataFrame:
    """Success over head sets per (layer, composition, k): min, quartiles, max and the count of
    sets, on the bug's pair kind with both orders pooled (for the figure and the report)."""
    rows = patch_summary.bug_kind_rows(summary)
    return (rows.group_by("layer", "composition", "k").agg(
        n_sets=pl.len(), success_min=pl.col("success_rate").min(),
        success_q1=pl.col("success_rate").quantile(0.25, "linear"),
        success_median=pl.col("success_rate").median(),
        success_q3=pl.col("success_rate").quantile(0.75, "linear"), success_max=pl.col("success_rate").max(),
        n_eligible=pl.col("n_eligible").first())
        .sort("layer", "composition", "k"))


def residual_map(patcher, prompts: pl.DataFrame, layers: Sequence[int], config: dict) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(per prompt, summary per pair kind, order, layer and rank) of the residual stream patched at
    one matched (aligned) position, on the eligible targets of the configured direction."""
    fmt = _formats(config, config["patching"]["direction"])
    pairs = patching.make_pairs(prompts, fmt["target_format"], fmt["source_format"], "aligned")
    pairs = patching.eligible_pairs(patcher, pairs, fmt["direction"])
    if not pairs:
        raise patching.PatchingConfigError("No eligible target for the residual map: see the baseline accuracy.")
    rows = patching.residual_map(patcher, pairs, layers)
    source_ld = patcher.unpatched_logit_diffs([p.source for p in pairs])
    link = pl.DataFrame({"prompt_id": [p.target["prompt_id"] for p in pairs],
                         "source_logit_diff": [source_ld[p.source["prompt_id"]] for p in pairs]},
                        schema={"prompt_id": pl.Int32, "source_logit_diff": pl.Float64})
    meta = prompts.select(pl.col("prompt_id").cast(pl.Int32), "pair_id", "pair_kind", "order")
    per_prompt = rows.join(link, on="prompt_id").join(meta, on="prompt_id").sort("layer", "rank", "prompt_id")
    parts = []
    for kind, order, mask in kind_order_splits(per_prompt["pair_kind"].cast(pl.String).to_list(),
                                               per_prompt["order"].cast(pl.String).to_list()):
        part = per_prompt.filter(pl.Series(mask))
        # A rank that some targets lack is summarised over the targets that have it.
        for (rank,), sub in part.group_by(["rank"], maintain_order=True):
            s = patch_summary.summarise(sub, keys=["layer"], direction=fmt["direction"], **_boot(config))
            parts.append(s.with_columns(pl.lit(kind).alias("pair_kind"), pl.lit(order).alias("order"),
                                        pl.lit(rank, dtype=pl.Int32).alias("rank")))
    first = ["pair_kind", "order", "layer", "rank"]
    out = pl.concat(parts)
    return per_prompt, out.select(*first, *[c for c in out.columns if c not in first]).sort(*first)


def bidirectional(patcher, prompts: pl.DataFrame, layers: Sequence[int], config: dict
                  ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(per prompt, summary) of the all / even / odd and single-head sets at the focus layers in
    both directions: fix (correct-format heads into the buggy format) and break (the reverse)."""
    spec, *_ = patching.spec_from_config(config)
    sets = {layer: named_head_sets(patcher.n_heads) for layer in layers}
    per_prompt = pl.concat([
        patching.run_study_sweep(patcher, prompts, sets, spec, desc=f"bidirectional ({d})", **_formats(config, d))
        for d in patching.DIRECTIONS])
    return per_prompt, patch_summary.summary_table(per_prompt, **_boot(config))


def listed_pairs(per_prompt: pl.DataFrame, prompts: pl.DataFrame, listed: Sequence[Sequence[str]]) -> pl.DataFrame:
    """One row per (direction, layer, head set, listed number pair): over the pair's two orders, the
    eligible targets and how many the patch moved to the source's answer."""
    wanted = pl.DataFrame({"correct": [str(p[0]) for p in listed], "wrong": [str(p[1]) for p in listed]})
    pair_of = prompts.select(pl.col("prompt_id").cast(pl.Int32), pl.col("correct").cast(pl.String),
                             pl.col("wrong").cast(pl.String))
    rows = per_prompt.join(pair_of, on="prompt_id").join(wanted, on=["correct", "wrong"])
    eligible = patching.is_eligible(rows["baseline_logit_diff"].to_numpy(), rows["source_logit_diff"].to_numpy(),
                                    "fix")
    eligible_break = patching.is_eligible(rows["baseline_logit_diff"].to_numpy(), rows["source_logit_diff"].to_numpy(),
                                          "break")
    is_fix = (rows["direction"] == "fix").to_numpy()
    elig = np.where(is_fix, eligible, eligible_break)
    right = rows["logit_diff"].to_numpy() > 0
    took = np.where(is_fix, right, ~right) & elig
    rows = rows.with_columns(eligible=pl.Series(elig), took_source=pl.Series(took))
    return (rows.group_by("direction", "layer", "head_set", "family", "correct", "wrong").agg(
        n_prompts=pl.len(), n_eligible=pl.col("eligible").sum().cast(pl.Int32),
        n_success=pl.col("took_source").sum().cast(pl.Int32))
        .with_columns(success_rate=pl.when(pl.col("n_eligible") > 0)
                      .then(pl.col("n_success") / pl.col("n_eligible")).otherwise(None),
                      works=pl.when(pl.col("n_eligible") > 0)
                      .then(pl.col("n_success") == pl.col("n_eligible")).otherwise(None))
        .sort("direction", "layer", "family", "head_set", "correct", "wrong"))
