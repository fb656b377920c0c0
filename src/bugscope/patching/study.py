"""The study's patching runs: the tidy per-prompt table of a sweep (`run_study_sweep`), and the
paper's patching claims as experiments at the focus layers, each a table of its own:

- replacement fraction: a * source + (1 - a) * target in the patched heads (`replacement`);
- every head set of every size, by composition: even, odd, mixed (`exhaustive`);
- the residual stream patched at one (layer, matched position) at a time (`residual_map`), the
  ceiling of every head-level patch at that layer and position;
- both directions, fix and break, and the result on each number pair the config lists
  (`bidirectional`, `listed_pairs`).

Every rate is read on the eligible targets (`patch_summary.is_eligible`), with cluster-bootstrap
intervals over number pairs (`bugscope.patching.summary`). The exhaustive sets and the residual map
patch only the eligible targets: success and recovery are all they report, and their n is the
eligible targets anyway.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from bugscope.data.prompts import kind_order_splits
from bugscope.model.forward import make_batch
from bugscope.model.sites import HEAD_SITE
from bugscope.patching.engine import HeadPatcher
from bugscope.patching.head_sets import (
    exhaustive_head_sets,
    head_composition,
    head_set_table,
    named_head_sets,
    pool_heads,
)
from bugscope.patching.pairs import DIRECTIONS, ORIGINAL_METHOD, PatchPair, PatchSpec, direction_formats, make_pairs
from bugscope.patching.summary import bug_kind_rows, is_eligible, summarise, summary_table

log = logging.getLogger("bugscope")
ORIGINAL_SETS = ("all", "even", "odd")  # the seed's and the paper's head sets


# --- a sweep as a tidy per-prompt table ----------------------------------------------------------


def spec_from_config(config: dict) -> tuple[PatchSpec, str, str]:
    """(the per-head PatchSpec, target format, source format) of `config['patching']`."""
    pc = config["patching"]
    target, source = direction_formats(config["prompts"], pc["direction"])
    return PatchSpec(site=HEAD_SITE, positions=pc["positions"], operation=pc["operation"]), target, source


def patcher_from_config(model, config: dict, pad_token_id: int) -> HeadPatcher:
    pc = config["patching"]
    return HeadPatcher(model, pad_token_id=pad_token_id, batch_rows=pc["batch_rows"],
                       max_prompts=pc["max_prompts"], memory_fraction=pc["memory_fraction"])


def run_study_sweep(patcher: HeadPatcher, prompts: pl.DataFrame, layer_sets: dict[int, list],
                    spec: PatchSpec, *, target_format: str, source_format: str, direction: str,
                    desc: str, fractions: Sequence[float] | None = None,
                    eligible_by: dict[int, float] | None = None) -> pl.DataFrame:
    """The tidy per-prompt table of one sweep: one row per (layer, head set, target prompt), with
    the source prompt's unpatched logit difference (a target is only fixable when its source is right).

    fractions: replacement fractions (a `fraction` column follows `head_set`). eligible_by: the
    unpatched logit difference of every prompt (`logit_diffs_by_prompt`); given, only the targets a
    patch can move to the source's answer are patched (`eligible_pairs`): for sweeps whose only
    readout is success and recovery, whose n is the eligible targets anyway.
    """
    pairs = make_pairs(prompts, target_format, source_format, spec.positions)
    if eligible_by is not None:
        eligible = eligible_pairs(pairs, direction, eligible_by)
        if eligible:
            pairs = eligible
        else:  # the summary then says n_eligible = 0 (rates null), and the ledger "not testable"
            log.warning("no %s target is eligible (a source whose answer the target lacks): patching all %d "
                        "targets, whose success and recovery are undefined", direction, len(pairs))
    patched, baseline = patcher.sweep(pairs, layer_sets, spec, desc=desc, fractions=fractions)
    source_ld = patcher.unpatched_logit_diffs([p.source for p in pairs])
    link = pl.DataFrame({
        "prompt_id": [p.target["prompt_id"] for p in pairs],
        "source_prompt_id": [p.source["prompt_id"] for p in pairs],
        "n_patched_positions": [len(p.target_positions) for p in pairs],
        "source_logit_diff": [source_ld[p.source["prompt_id"]] for p in pairs],
    }, schema={"prompt_id": pl.Int32, "source_prompt_id": pl.Int32, "n_patched_positions": pl.Int32,
               "source_logit_diff": pl.Float64})
    meta = prompts.select("prompt_id", "question_id", "pair_id", "pair_kind", "order")
    out = (patched.with_columns(pl.col("prompt_id").cast(pl.Int32))
           .join(baseline.with_columns(pl.col("prompt_id").cast(pl.Int32)), on="prompt_id")
           .join(link, on="prompt_id").join(meta, on="prompt_id")
           .join(head_set_table(layer_sets), on=["layer", "head_set"]))
    out = out.with_columns(
        pl.lit(spec.method).alias("method"), pl.lit(spec.positions).alias("positions"),
        pl.lit(spec.operation).alias("operation"), pl.lit(direction).alias("direction"),
        pl.lit(target_format).alias("target_format"), pl.lit(source_format).alias("source_format"),
        (pl.col("logit_diff") > 0).alias("is_correct"), (pl.col("baseline_logit_diff") > 0).alias("baseline_correct"),
    )
    if fractions is None:
        return out.select(PROMPT_COLUMNS).sort("method", "positions", "layer", "head_set", "prompt_id")
    cols = [*PROMPT_COLUMNS[:PROMPT_COLUMNS.index("head_set") + 1], "fraction",
            *PROMPT_COLUMNS[PROMPT_COLUMNS.index("head_set") + 1:]]
    return out.select(cols).sort("method", "positions", "layer", "head_set", "fraction", "prompt_id")


def logit_diffs_by_prompt(scores: pl.DataFrame) -> dict[int, float]:
    """prompt_id -> unpatched decision logit difference, from the baseline stage's scores: the one
    unpatched run that decides which targets are eligible, so no experiment runs it again."""
    return dict(zip(scores["prompt_id"].to_list(), scores["logit_diff"].to_list()))


def eligible_pairs(pairs: Sequence[PatchPair], direction: str,
                   ld: dict[int, float]) -> list[PatchPair]:
    """The pairs whose target is eligible (`is_eligible`) by the unpatched logit differences `ld`."""
    return [p for p in pairs if bool(is_eligible(np.float64(ld[p.target["prompt_id"]]),
                                                 np.float64(ld[p.source["prompt_id"]]), direction))]


PROMPT_COLUMNS = ["method", "positions", "operation", "direction", "target_format", "source_format", "layer",
                  "head_set", "family", "pool", "k", "sample", "heads", "prompt_id", "source_prompt_id",
                  "question_id", "pair_id", "pair_kind", "order", "n_patched_positions", "logit_diff",
                  "baseline_logit_diff", "source_logit_diff", "is_correct", "baseline_correct"]


# --- the focus-layer experiments ------------------------------------------------------------------

def _boot(config: dict) -> dict:
    b = config["bootstrap"]
    return {"n_resamples": b["n_resamples"], "confidence": b["confidence"], "seed": config["seed"]}


def _formats(config: dict, direction: str) -> dict:
    target, source = direction_formats(config["prompts"], direction)
    return {"target_format": target, "source_format": source, "direction": direction}


def _sets(n_heads: int, layers: Sequence[int], names: Sequence[str] = ORIGINAL_SETS) -> dict[int, list]:
    return {layer: [s for s in named_head_sets(n_heads) if s.name in names] for layer in layers}


def replacement(patcher, prompts: pl.DataFrame, layers: Sequence[int], config: dict,
                unpatched: dict[int, float]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(per prompt, summary) on the eligible targets at each replacement fraction: the all / even /
    odd head sets under per-head patching (configured positions), and the whole attention output
    (all slices) under the original method (post-o_proj, [:min_len]), the paper's blend."""
    spec, *_ = spec_from_config(config)
    fractions = sorted(float(a) for a in config["patching"]["replacement"]["fractions"])
    runs = [(spec, _sets(patcher.n_heads, layers)), (ORIGINAL_METHOD, _sets(patcher.n_heads, layers, ["all"]))]
    with patcher.reusing_records():  # both methods patch the same targets
        per_prompt = pl.concat([
            run_study_sweep(patcher, prompts, sets, s, fractions=fractions, eligible_by=unpatched,
                            desc=f"replacement ({s.method})", **_formats(config, config["patching"]["direction"]))
            for s, sets in runs])
    summary = summary_table(per_prompt, extra_keys=["fraction"], **_boot(config))
    return per_prompt, summary


def exhaustive(patcher, prompts: pl.DataFrame, layers: Sequence[int], config: dict,
               unpatched: dict[int, float]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(per prompt, summary) of every head set of `patching.exhaustive` on the eligible targets."""
    ex = config["patching"]["exhaustive"]
    spec, *_ = spec_from_config(config)
    sets = {}
    for layer in layers:
        sets[layer] = exhaustive_head_sets(patcher.n_heads, pools=ex["pools"], budget=ex["budget"],
                                           samples=ex["samples"], seed=config["seed"], layer=layer, sizes=ex["sizes"])
    per_prompt = run_study_sweep(patcher, prompts, sets, spec, desc="exhaustive head sets",
                                 eligible_by=unpatched, **_formats(config, config["patching"]["direction"]))
    return per_prompt, exhaustive_summary(per_prompt, patcher.n_heads, config)


def exhaustive_summary(per_prompt: pl.DataFrame, n_heads: int, config: dict) -> pl.DataFrame:
    """The summary of the exhaustive sets with each set's composition and its size relative to the
    even pool and to all heads (the agnostic forms of the paper's head-count claims)."""
    summary = summary_table(per_prompt, **_boot(config))
    comp = [head_composition(h) for h in summary["heads"].to_list()]
    return summary.with_columns(
        n_even=pl.Series([c[0] for c in comp], dtype=pl.Int32), n_odd=pl.Series([c[1] for c in comp], dtype=pl.Int32),
        composition=pl.Series([c[2] for c in comp], dtype=pl.String),
        k_of_even_pool=pl.col("k") / len(pool_heads("even", n_heads)), k_of_heads=pl.col("k") / n_heads)


def subset_distribution(summary: pl.DataFrame) -> pl.DataFrame:
    """Success over head sets per (layer, composition, k): min, quartiles, max and the count of
    sets, on the bug's pair kind with both orders pooled (for the figure and the report)."""
    rows = bug_kind_rows(summary)
    return (rows.group_by("layer", "composition", "k").agg(
        n_sets=pl.len(), success_min=pl.col("success_rate").min(),
        success_q1=pl.col("success_rate").quantile(0.25, "linear"),
        success_median=pl.col("success_rate").median(),
        success_q3=pl.col("success_rate").quantile(0.75, "linear"), success_max=pl.col("success_rate").max(),
        n_eligible=pl.col("n_eligible").first())
        .sort("layer", "composition", "k"))


@torch.inference_mode()
def residual_map_rows(patcher, pairs: Sequence[PatchPair], layers: Sequence[int],
                 desc: str = "residual map") -> pl.DataFrame:
    """Rows (layer, rank, prompt_id, logit_diff, baseline_logit_diff): the residual stream after
    `layer` patched from the source prompt at one matched position, `rank` counted back from the
    last matched position (rank 0, the decision position), so that ranks line up across questions
    whose prompts differ in length. A pair without a position at that rank is left out of it."""
    runner, out = patcher.runner, []
    n_rank = max(len(p.target_positions) for p in pairs)
    step = max(1, patcher.max_prompts)
    bar = tqdm(total=math.ceil(len(pairs) / step) * len(layers) * n_rank, desc=desc, unit="forward",
               disable=not patcher.progress)
    for start in range(0, len(pairs), step):
        part = pairs[start:start + step]
        batch = make_batch([p.target for p in part], patcher.pad_token_id, patcher.device)
        run = runner.record(batch, layers)
        sbatch, source_run = patcher.capture([p.source for p in part], residual_layers=layers, score=True)
        source = source_run.residuals
        for layer in layers:
            for rank in range(n_rank):
                rows = [i for i, p in enumerate(part) if len(p.target_positions) > rank]
                mask = torch.zeros(batch.input_ids.shape, dtype=torch.bool, device=patcher.device)
                values = torch.zeros(*batch.input_ids.shape, patcher.d_model, dtype=patcher.dtype,
                                     device=patcher.device)
                for i in rows:
                    t = int(batch.pad[i]) + part[i].target_positions[-1 - rank]
                    mask[i, t] = True
                    values[i, t] = source[layer][i, int(sbatch.pad[i]) + part[i].source_positions[-1 - rank]]
                first = int(mask.any(0).nonzero().min()) if patcher.kv_reuse else 0
                diffs = runner.run_residual_written(run, layer, values, mask, start=first)
                out.append(pl.DataFrame({
                    "layer": [layer] * len(rows), "rank": [rank] * len(rows),
                    "prompt_id": [part[i].target["prompt_id"] for i in rows],
                    "logit_diff": diffs.double().numpy()[rows],
                    "baseline_logit_diff": run.baseline.double().numpy()[rows],
                }, schema={"layer": pl.Int32, "rank": pl.Int32, "prompt_id": pl.Int32, "logit_diff": pl.Float64,
                           "baseline_logit_diff": pl.Float64}))
                bar.update()
    bar.close()
    return pl.concat(out)


def residual_map(patcher, prompts: pl.DataFrame, layers: Sequence[int], config: dict,
                 unpatched: dict[int, float]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(per prompt, summary per pair kind, order, layer and rank) of the residual stream patched at
    one matched (aligned) position, on the eligible targets of the configured direction."""
    fmt = _formats(config, config["patching"]["direction"])
    pairs = make_pairs(prompts, fmt["target_format"], fmt["source_format"], "aligned")
    pairs = eligible_pairs(pairs, fmt["direction"], unpatched) or pairs  # none: n_eligible 0, rates null
    rows = residual_map_rows(patcher, pairs, layers)
    source_ld = patcher.unpatched_logit_diffs([p.source for p in pairs])
    link = pl.DataFrame({"prompt_id": [p.target["prompt_id"] for p in pairs],
                         "source_logit_diff": [source_ld[p.source["prompt_id"]] for p in pairs]},
                        schema={"prompt_id": pl.Int32, "source_logit_diff": pl.Float64})
    meta = prompts.select(pl.col("prompt_id").cast(pl.Int32), "pair_id", "pair_kind", "order")
    per_prompt = rows.join(link, on="prompt_id").join(meta, on="prompt_id").sort("layer", "rank", "prompt_id")
    return per_prompt, residual_map_summary(per_prompt, fmt["direction"], config)


def residual_map_summary(per_prompt: pl.DataFrame, direction: str, config: dict) -> pl.DataFrame:
    """One row per (pair kind, order, layer, rank) of the residual map's per-prompt rows."""
    parts = []
    for kind, order, mask in kind_order_splits(per_prompt["pair_kind"].cast(pl.String).to_list(),
                                               per_prompt["order"].cast(pl.String).to_list()):
        part = per_prompt.filter(pl.Series(mask))
        # A rank that some targets lack is summarised over the targets that have it.
        for (rank,), sub in part.group_by(["rank"], maintain_order=True):
            s = summarise(sub, keys=["layer"], direction=direction, **_boot(config))
            parts.append(s.with_columns(pl.lit(kind).alias("pair_kind"), pl.lit(order).alias("order"),
                                        pl.lit(rank, dtype=pl.Int32).alias("rank")))
    first = ["pair_kind", "order", "layer", "rank"]
    out = pl.concat(parts)
    return out.select(*first, *[c for c in out.columns if c not in first]).sort(*first)


def bidirectional(patcher, prompts: pl.DataFrame, layers: Sequence[int], config: dict
                  ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(per prompt, summary) of the all / even / odd head sets at the focus layers in both
    directions: fix (correct-format heads into the buggy format) and break (the reverse). Single
    heads in the fix direction are in the sweep."""
    spec, *_ = spec_from_config(config)
    sets = _sets(patcher.n_heads, layers)
    per_prompt = pl.concat([
        run_study_sweep(patcher, prompts, sets, spec, desc=f"bidirectional ({d})", **_formats(config, d))
        for d in DIRECTIONS])
    return per_prompt, summary_table(per_prompt, **_boot(config))


def listed_pairs(per_prompt: pl.DataFrame, prompts: pl.DataFrame, listed: Sequence[Sequence[str]]) -> pl.DataFrame:
    """One row per (direction, layer, head set, listed number pair): over the pair's two orders, the
    eligible targets and how many the patch moved to the source's answer."""
    wanted = pl.DataFrame({"correct": [str(p[0]) for p in listed], "wrong": [str(p[1]) for p in listed]})
    pair_of = prompts.select(pl.col("prompt_id").cast(pl.Int32), pl.col("correct").cast(pl.String),
                             pl.col("wrong").cast(pl.String))
    rows = per_prompt.join(pair_of, on="prompt_id").join(wanted, on=["correct", "wrong"])
    eligible = is_eligible(rows["baseline_logit_diff"].to_numpy(), rows["source_logit_diff"].to_numpy(),
                                    "fix")
    eligible_break = is_eligible(rows["baseline_logit_diff"].to_numpy(), rows["source_logit_diff"].to_numpy(),
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
