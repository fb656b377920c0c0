"""Rule feature_interventions: SAE features ablated, clamped and steered at the intervention layers.

Writes the per-prompt table (every condition x buggy-format prompt) and its summary (bugscope.interventions).
"""

import polars as pl

from bugscope import tables
from bugscope.config import sae_sets
from bugscope.focus import choice_layers
from bugscope.interventions.sae_features import (
    FeatureIntervener,
    bug_kind_rows,
    intervention_layers,
    run_interventions,
    summarise,
)
from bugscope.model.load import ModelManifest, load_model
from bugscope.model.sites import hook_name
from bugscope.run.script import log, run
from bugscope.sae.store import load_sae, sae_folders


def main(smk):
    cfg = smk.config
    icfg = cfg["interventions"]
    manifest = ModelManifest.load(smk.input.manifest)
    prompts = tables.frame(tables.PROMPTS, cfg, smk.input.prompts)
    overlap = tables.frame(tables.FEATURE_OVERLAP, cfg, smk.input.overlap) if "overlap" in smk.input.keys() else None
    focus, _ = choice_layers(cfg, overlap)  # a focus-only stage: the layers the choice picks
    model, tokenizer = load_model(manifest, cfg["device"])
    device = next(model.parameters()).device
    by_name = {s["name"]: s for s in sae_sets(cfg)}
    discriminative = dict(zip(smk.params.sae_sets, smk.input.discriminative))
    per_prompt, meta_sets = [], {}
    for name in smk.params.sae_sets:
        s = by_name[name]
        layers = intervention_layers(cfg, focus, smk.params.set_layers[name])
        log.info("SAE set %s (%s): layers %s (focus layers %s)", name, s["site"], layers, focus)
        saes = {layer: load_sae(sae_folders(smk.input.saes)[(name, hook_name(layer, s["site"]))], device=str(device))[0]
                for layer in layers}
        intervener = FeatureIntervener(model, pad_token_id=tokenizer.pad_token_id, site=s["site"],
                                                     max_prompts=icfg["max_prompts"], rows_per_forward=icfg["batch_rows"])
        disc = tables.frame(tables.DISCRIMINATIVE_FEATURES, cfg, discriminative[name])
        table, meta = run_interventions(intervener, prompts, cfg, sae_set=name, saes=saes,
                                                      discriminative=disc, named_cfg=s["named"], log=log)
        per_prompt.append(table)
        meta_sets[name] = {"layers": layers, "site": s["site"], **meta}
        del saes
    table = pl.concat(per_prompt)
    boot = cfg["bootstrap"]
    summary = summarise(table, n_resamples=boot["n_resamples"], confidence=boot["confidence"],
                                      seed=cfg["seed"])
    meta = {"config_hash": smk.params.config_hash, "seed": cfg["seed"], "focus_layers": focus,
            "positions": icfg["positions"], "steering": "additive: f + scale * mean correct-format activation",
            "sae_sets": meta_sets, **manifest.provenance()}
    with tables.written_together() as put:
        put(tables.INTERVENTIONS_PROMPTS, table, smk.output.prompts, meta)
        put(tables.INTERVENTIONS, summary, smk.output.summary, meta)
    shown = bug_kind_rows(summary).select(
        "sae_set", "layer", "feature_set", "family", "sample", "intervention", "scale", "n_eligible", "success_rate",
        "success_low", "success_high", "recovery", "accuracy", "baseline_accuracy")
    log.info("interventions (bug pair kind, all pairs):\n%s", shown)


run(snakemake, main)  # noqa: F821
