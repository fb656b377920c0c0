"""Rule original_decomposition: the original procedure in full (generation with the decode-time
hook, string criterion) and the gap to the per-head decision-logit method, one factor at a time, on
the same prompts, at the focus layers (bugscope.patching.original_method)."""

import time

from bugscope import tables
from bugscope.focus import resolve_focus_layers
from bugscope.model.load import ModelManifest, load_model
from bugscope.patching import original_decomposition
from bugscope.patching.head_sets import named_head_sets
from bugscope.patching.study import patcher_from_config, spec_from_config
from bugscope.run.script import log, run


def main(smk):
    start = time.time()
    cfg = smk.config
    pc, gc = cfg["patching"], cfg["patching"]["original_generation"]
    manifest = ModelManifest.load(smk.input.manifest)
    prompts = tables.frame(tables.PROMPTS, cfg, smk.input.prompts)
    _, target, source = spec_from_config(cfg)
    overlap = None
    if "overlap" in smk.input.keys():
        overlap = tables.frame(tables.FEATURE_OVERLAP, cfg, smk.input.overlap)
    layers, focus_source = resolve_focus_layers(cfg, overlap)
    log.info("focus layers %s (from %s)", layers, focus_source)
    model, tokenizer = load_model(manifest, cfg["device"])
    patcher = patcher_from_config(model, cfg, tokenizer.pad_token_id)
    patcher.progress = False
    sets = [s for s in named_head_sets(manifest.num_heads) if s.family != "single"]
    chat = cfg["prompts"]["formats"][target].get("chat_template", False)
    per_prompt = original_decomposition.run_decomposition(
        model, tokenizer, patcher, prompts, layers, sets, target_format=target, source_format=source,
        direction=pc["direction"], positions=pc["positions"], n_pairs=gc["n_pairs"],
        max_new_tokens=gc["max_new_tokens"], add_special_tokens=not chat, batch_rows=pc["max_prompts"])
    boot = cfg["bootstrap"]
    summary = original_decomposition.summarise(per_prompt, n_resamples=boot["n_resamples"], confidence=boot["confidence"],
                                        seed=cfg["seed"])
    log.info("decomposition:\n%s", summary.select("step", "setting", "layer", "head_set", "n_prompts", "n_eligible",
                                                  "success_rate", "original_success", "delta_original_success"))
    meta = {"config_hash": smk.params.config_hash, "seed": cfg["seed"], "focus_layers": layers,
            "focus_layer_source": focus_source, "n_pairs": gc["n_pairs"], "max_new_tokens": gc["max_new_tokens"],
            "target_format": target, "source_format": source, "direction": pc["direction"],
            "positions": pc["positions"], **manifest.provenance()}
    with tables.written_together() as put:
        put(tables.PATCHING_ORIGINAL_DECOMPOSITION, summary, smk.output.summary, meta)
        put(tables.PATCHING_ORIGINAL_DECOMPOSITION_PROMPTS, per_prompt, smk.output.prompts, meta)
    log.info("wrote %d summary rows, %d per-prompt rows in %.1f s", summary.height, per_prompt.height,
             time.time() - start)


run(snakemake, main)  # noqa: F821
