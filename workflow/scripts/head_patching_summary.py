"""Rule head_patching_summary: gather the sweep groups and the subsets; one row per (layer, head set)."""

import polars as pl
import polars.selectors as cs

from bugscope import patch_summary, tables
from bugscope.script import log, run

# What the summary reads of the per-prompt rows (bugscope.patch_summary). At 8B sizes (1.8M rows) the
# whole table and the summary's work on it would not fit in 2 GB together (tests/test_memory.py): the
# summary reads these columns, with its strings as categoricals (4 bytes a row, cheap to group by;
# they sort as strings), and the whole table is read again to be written.
SUMMARY_INPUT = [*patch_summary.SUMMARY_KEYS, *patch_summary.HEAD_SET_COLUMNS, "prompt_id", "pair_id", "logit_diff",
                 "baseline_logit_diff", "source_logit_diff"]


def read_per_prompt(smk, columns=None):
    """(the sweep groups and the subsets as one frame, their metadata); with `columns`, those only,
    strings as categoricals."""
    parts, metas = [], []
    inputs = [(tables.PATCHING_SWEEP_GROUP, path) for path in smk.input.sweep]
    inputs.append((tables.PATCHING_SUBSETS_PROMPTS, smk.input.subsets))
    for declared, path in inputs:
        table, meta = tables.read(declared, smk.config, path, columns=columns)
        part = pl.from_arrow(table)
        parts.append(part if columns is None else part.with_columns(cs.string().cast(pl.Categorical)))
        metas.append(meta)
    return pl.concat(parts), metas


def main(smk):
    cfg = smk.config
    per_prompt, metas = read_per_prompt(smk, SUMMARY_INPUT)
    scores = tables.frame(tables.BASELINE_SCORES, smk.config, smk.input.scores)

    # The unpatched run inside the patching engine must agree with the baseline stage.
    check = (per_prompt.unique("prompt_id").join(scores.select("prompt_id", "logit_diff"), on="prompt_id", suffix="_scores")
             .select((pl.col("baseline_logit_diff") - pl.col("logit_diff_scores")).abs().max()).item())
    log.info("unpatched logit difference vs baseline stage: max |difference| %.2e", check)

    boot = cfg["bootstrap"]
    summary = patch_summary.summary_table(per_prompt, n_resamples=boot["n_resamples"], confidence=boot["confidence"],
                                          seed=cfg["seed"], n_heads=cfg["model"]["num_heads"])
    summary = summary.with_columns(cs.categorical().cast(pl.String))
    del per_prompt
    focus = next((m for m in metas if "focus_layers" in m), {})
    meta = {k: v for k, v in metas[0].items() if k not in ("layers", "mode", "kind")}
    meta.update(config_hash=smk.params.config_hash, focus_layers=focus.get("focus_layers"),
                focus_layer_source=focus.get("focus_layer_source"), subset_seed=focus.get("subset_seed"),
                baseline_max_abs_difference=check, n_resamples=boot["n_resamples"], confidence=boot["confidence"])
    with tables.written_together() as put:
        put(tables.PATCHING_PROMPTS, read_per_prompt(smk)[0], smk.output.prompts, meta)
        put(tables.PATCHING_SUMMARY, summary, smk.output.summary, meta)
    top = patch_summary.bug_kind_rows(summary).filter(pl.col("family") != "subset").sort("recovery", descending=True)
    log.info("top head sets by recovery:\n%s", top.head(10).select(
        "layer", "head_set", "n_eligible", "success_rate", "recovery", "recovery_low", "recovery_high", "broken_rate"))


run(snakemake, main)  # noqa: F821
