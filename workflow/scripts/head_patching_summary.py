"""Rule head_patching_summary: gather the sweep groups and the subsets; one row per (layer, head set)."""

import polars as pl

from bugscope import patch_summary, tables
from bugscope.script import log, run


def main(smk):
    cfg = smk.config
    parts, metas = [], []
    inputs = [(tables.PATCHING_SWEEP_GROUP, path) for path in smk.input.sweep]
    inputs.append((tables.PATCHING_SUBSETS_PROMPTS, smk.input.subsets))
    for declared, path in inputs:
        table, meta = tables.read(declared, cfg, path)
        parts.append(pl.from_arrow(table))
        metas.append(meta)
    per_prompt = pl.concat(parts)
    scores = tables.frame(tables.BASELINE_SCORES, smk.config, smk.input.scores)

    # The unpatched run inside the patching engine must agree with the baseline stage.
    check = (per_prompt.unique("prompt_id").join(scores.select("prompt_id", "logit_diff"), on="prompt_id", suffix="_scores")
             .select((pl.col("baseline_logit_diff") - pl.col("logit_diff_scores")).abs().max()).item())
    log.info("unpatched logit difference vs baseline stage: max |difference| %.2e", check)

    boot = cfg["bootstrap"]
    summary = patch_summary.summary_table(per_prompt, n_resamples=boot["n_resamples"], confidence=boot["confidence"],
                                          seed=cfg["seed"], n_heads=cfg["model"]["num_heads"])
    focus = next((m for m in metas if "focus_layers" in m), {})
    meta = {k: v for k, v in metas[0].items() if k not in ("layers", "mode", "kind")}
    meta.update(config_hash=smk.params.config_hash, focus_layers=focus.get("focus_layers"),
                focus_layer_source=focus.get("focus_layer_source"), subset_seed=focus.get("subset_seed"),
                baseline_max_abs_difference=check, n_resamples=boot["n_resamples"], confidence=boot["confidence"])
    with tables.written_together() as put:
        put(tables.PATCHING_PROMPTS, per_prompt, smk.output.prompts, meta)
        put(tables.PATCHING_SUMMARY, summary, smk.output.summary, meta)
    top = patch_summary.bug_kind_rows(summary).filter(pl.col("family") != "subset").sort("recovery", descending=True)
    log.info("top head sets by recovery:\n%s", top.head(10).select(
        "layer", "head_set", "n_eligible", "success_rate", "recovery", "recovery_low", "recovery_high", "broken_rate"))


run(snakemake, main)  # noqa: F821
