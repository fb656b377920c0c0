"""Rule head_set_features: the critical SAE features each even-head set turns on at the focus layers.

Writes the per-prompt counts and their summary (bugscope.interventions.head_set_features).
"""

import polars as pl

from bugscope import tables
from bugscope.config import sae_sets
from bugscope.focus import choice_layers
from bugscope.interventions import head_set_features
from bugscope.model.load import ModelManifest, load_model
from bugscope.model.sites import hook_name
from bugscope.patching.study import logit_diffs_by_prompt, patcher_from_config
from bugscope.run.script import log, run
from bugscope.sae.store import load_sae, sae_folders


def main(smk):
    cfg = smk.config
    manifest = ModelManifest.load(smk.input.manifest)
    prompts = tables.frame(tables.PROMPTS, cfg, smk.input.prompts)
    overlap = tables.frame(tables.FEATURE_OVERLAP, cfg, smk.input.overlap) if "overlap" in smk.input.keys() else None
    focus, focus_source = choice_layers(cfg, overlap)  # a focus-only stage: the layers the choice picks
    unpatched = logit_diffs_by_prompt(tables.frame(tables.BASELINE_SCORES, cfg, smk.input.scores))
    model, tokenizer = load_model(manifest, cfg["device"])
    device = str(next(model.parameters()).device)
    by_name = {s["name"]: s for s in sae_sets(cfg)}
    saes, feature_sets = {}, {}
    for name, disc_path in zip(smk.params.sae_sets, smk.input.discriminative):
        disc = tables.frame(tables.DISCRIMINATIVE_FEATURES, cfg, disc_path)
        for layer in [layer for layer in focus if layer in smk.params.set_layers[name]]:
            sets = head_set_features.critical_sets(disc, by_name[name]["named"], layer)
            log.info("SAE set %s, layer %d: critical features %s", name, layer, sets)
            feature_sets[(name, layer)] = sets
            saes[(name, layer)] = load_sae(sae_folders(smk.input.saes)[(name, hook_name(layer, by_name[name]["site"]))],
                                           device=device)[0]
    patcher = patcher_from_config(model, cfg, tokenizer.pad_token_id)
    per_prompt, summary = head_set_features.head_set_features(patcher, prompts, focus, cfg, saes=saes,
                                                              sites={n: by_name[n]["site"] for n in smk.params.sae_sets},
                                                              feature_sets=feature_sets, unpatched=unpatched)
    meta = {"config_hash": smk.params.config_hash, "seed": cfg["seed"], "focus_layers": focus,
            "focus_layer_source": focus_source, "top_n": head_set_features.CRITICAL_TOP_N,
            "feature_sets": {f"{s}:{layer}": {k: list(v) for k, v in fs.items()} for (s, layer), fs in feature_sets.items()},
            **manifest.provenance()}
    with tables.written_together() as put:
        put(tables.HEAD_SET_FEATURES_PROMPTS, per_prompt, smk.output.prompts, meta)
        put(tables.HEAD_SET_FEATURES, summary, smk.output.summary, meta)
    log.info("critical features active by head-set size (all pairs; mean and min over sets):\n%s",
             summary.filter(pl.col("pairs") == "all").group_by("sae_set", "layer", "feature_set", "k").agg(
                 n_sets=pl.len(), mean_active=pl.col("mean_active").mean(),
                 min_active=pl.col("mean_active").min()).sort("sae_set", "layer", "feature_set", "k"))


run(snakemake, main)  # noqa: F821
