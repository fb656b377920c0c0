"""Rules head_replacement, head_subsets_exhaustive, residual_map and head_bidirectional: the focus-layer
patching experiments of bugscope.patching.study (params.mode), per prompt and summarised."""

from bugscope import tables
from bugscope.config import analysed_layers
from bugscope.focus import choice_layers, resolve_focus_layers
from bugscope.model.load import ModelManifest, load_model
from bugscope.patching import study
from bugscope.patching.study import listed_pairs, logit_diffs_by_prompt, patcher_from_config
from bugscope.run.script import log, run

DECLARED = {  # mode -> (per-prompt table, summary table)
    "replacement": (tables.PATCHING_REPLACEMENT_PROMPTS, tables.PATCHING_REPLACEMENT),
    "exhaustive": (tables.PATCHING_EXHAUSTIVE_PROMPTS, tables.PATCHING_EXHAUSTIVE),
    "residual_map": (tables.PATCHING_RESIDUAL_MAP_PROMPTS, tables.PATCHING_RESIDUAL_MAP),
    "bidirectional": (tables.PATCHING_BIDIRECTIONAL_PROMPTS, tables.PATCHING_BIDIRECTIONAL),
}


def main(smk):
    cfg = smk.config
    mode = smk.params.mode
    manifest = ModelManifest.load(smk.input.manifest)
    prompts = tables.frame(tables.PROMPTS, cfg, smk.input.prompts)
    meta = {"config_hash": smk.params.config_hash, "seed": cfg["seed"], "mode": mode, **manifest.provenance()}
    if mode == "residual_map":
        rm = cfg["patching"]["residual_map"]
        layers = analysed_layers(cfg) if rm["layers"] == "all" else sorted(rm["layers"])
        meta["layers"] = layers
    else:
        overlap = None
        if "overlap" in smk.input.keys():
            overlap = tables.frame(tables.FEATURE_OVERLAP, cfg, smk.input.overlap)
        # the exhaustive subsets are a focus-only stage: they run at the layers the choice picks
        resolve = choice_layers if mode == "exhaustive" else resolve_focus_layers
        layers, focus_source = resolve(cfg, overlap)
        meta.update(focus_layers=layers, focus_layer_source=focus_source)
        log.info("focus layers %s (from %s)", layers, focus_source)

    # The experiments on the eligible targets only read eligibility off the baseline stage's run.
    eligible_by = {}
    if "scores" in smk.input.keys():
        scores = tables.frame(tables.BASELINE_SCORES, cfg, smk.input.scores)
        eligible_by["unpatched"] = logit_diffs_by_prompt(scores)
    model, tokenizer = load_model(manifest, cfg["device"])
    patcher = patcher_from_config(model, cfg, tokenizer.pad_token_id)
    per_prompt, summary = getattr(study, mode)(patcher, prompts, layers, cfg, **eligible_by)
    prompt_table, summary_table = DECLARED[mode]
    with tables.written_together() as put:
        put(prompt_table, per_prompt, smk.output.prompts, meta)
        put(summary_table, summary, smk.output.summary, meta)
        if mode == "bidirectional":
            listed = listed_pairs(per_prompt, prompts, cfg["prompts"]["extra_pairs"])
            put(tables.PATCHING_LISTED_PAIRS, listed, smk.output.listed, meta)
    log.info("wrote %d per-prompt rows, %d summary rows", per_prompt.height, summary.height)


run(snakemake, main)  # noqa: F821
