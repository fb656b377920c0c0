"""Rule head_patching_summary: gather the sweep groups and the subsets; one row per (layer, head set)."""

import polars as pl
import polars.selectors as cs
import pyarrow as pa

from bugscope import tables
from bugscope.patching.summary import HEAD_SET_COLUMNS, SUMMARY_KEYS, bug_kind_rows, concat_summaries, summary_table
from bugscope.run.script import log, run

# What the summary reads of the per-prompt rows, one input at a time (bugscope.patching.summary): at
# 8B sizes (2.8M rows) the whole table and the summary's work on it would not fit in 2 GB together
# (tests/test_memory.py). Its strings are read as categoricals (4 bytes a row, cheap to group by);
# the whole table is read again to be written.
SUMMARY_INPUT = [*SUMMARY_KEYS, *HEAD_SET_COLUMNS, "prompt_id", "pair_id", "logit_diff",
                 "baseline_logit_diff", "source_logit_diff"]


def inputs(smk):
    return [(tables.PATCHING_SWEEP_GROUP, path) for path in smk.input.sweep] + [
        (tables.PATCHING_SUBSETS_PROMPTS, smk.input.subsets)]


def main(smk):
    cfg = smk.config
    boot = cfg["bootstrap"]
    scores = tables.frame(tables.BASELINE_SCORES, smk.config, smk.input.scores).select("prompt_id", "logit_diff")
    summaries, metas, check = [], [], 0.0
    for declared, path in inputs(smk):
        table, meta = tables.read(declared, smk.config, path, columns=SUMMARY_INPUT)
        part = pl.from_arrow(table).with_columns(cs.string().cast(pl.Categorical))
        # The unpatched run inside the patching engine must agree with the baseline stage.
        check = max(check, part.unique("prompt_id").join(scores, on="prompt_id", suffix="_scores").select(
            (pl.col("baseline_logit_diff") - pl.col("logit_diff_scores")).abs().max()).item())
        summaries.append(summary_table(
            part, n_resamples=boot["n_resamples"], confidence=boot["confidence"], seed=cfg["seed"],
            n_heads=cfg["model"]["num_heads"]).with_columns(cs.categorical().cast(pl.String)))
        metas.append(meta)
        del part, table
    log.info("unpatched logit difference vs baseline stage: max |difference| %.2e", check)
    summary = concat_summaries(summaries)
    focus = next((m for m in metas if "focus_layers" in m), {})
    meta = {k: v for k, v in metas[0].items() if k not in ("layers", "mode", "kind")}
    meta.update(config_hash=smk.params.config_hash, focus_layers=focus.get("focus_layers"),
                focus_layer_source=focus.get("focus_layer_source"), subset_seed=focus.get("subset_seed"),
                baseline_max_abs_difference=check, n_resamples=boot["n_resamples"], confidence=boot["confidence"])
    with tables.written_together() as put:
        # Arrow's concatenation keeps the inputs' buffers: one copy of the rows in memory.
        per_prompt = pa.concat_tables([tables.read(declared, cfg, path)[0] for declared, path in inputs(smk)])
        put(tables.PATCHING_PROMPTS, per_prompt, smk.output.prompts, meta)
        del per_prompt
        put(tables.PATCHING_SUMMARY, summary, smk.output.summary, meta)
    top = bug_kind_rows(summary).filter(pl.col("family") != "subset").sort("recovery", descending=True)
    log.info("top head sets by recovery:\n%s", top.head(10).select(
        "layer", "head_set", "n_eligible", "success_rate", "recovery", "recovery_low", "recovery_high", "broken_rate"))


run(snakemake, main)  # noqa: F821
