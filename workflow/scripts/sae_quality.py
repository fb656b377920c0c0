
import polars as pl
import pyarrow as pa

from bugscope import tables
from bugscope.config import with_sae_set
from bugscope.data.corpus import split_ids
from bugscope.data.prompts import BUG_PAIR_KIND, SINK_POSITION
from bugscope.model.load import ModelManifest, load_model
from bugscope.model.sites import hook_name
from bugscope.run.script import log, run
from bugscope.sae.activations import ActivationSource
from bugscope.sae.quality import QUALITY_SCHEMA, quality_row, reconstruction_stats, spliced_logit_diffs
from bugscope.sae.store import check_sae_fits, load_sae, sae_provenance_meta


def main(smk):
    cfg = with_sae_set(smk.config, smk.params.sae_set)
    site = cfg["sae_set"]["site"]
    manifest = ModelManifest.load(smk.input.manifest)
    prompts = tables.frame(tables.PROMPTS, smk.config, smk.input.prompts)
    corpus, corpus_meta = tables.read(tables.CORPUS, cfg, smk.input.corpus, columns=["prompt_id", "split"])
    held_pairs = corpus_meta["heldout_pair_ids"]
    held_prompts = prompts.filter(pl.col("pair_id").is_in(held_pairs)) if held_pairs else prompts
    held_prompt_ids = frozenset(held_prompts["prompt_id"].to_list())
    held_corpus_ids = split_ids(corpus, "heldout")
    model, tokenizer = load_model(manifest, cfg["device"])
    device = next(model.parameters()).device
    # The spliced forward passes run on the held-out prompts of the bug's kind in the two contrasted
    # formats only: one pass per layer over every token is the stage's largest cost, and it grows with
    # the held-out pairs (half of them since SAE training holds out the odd pairs).
    contrast = [cfg["prompts"]["buggy_format"], cfg["prompts"]["correct_format"]]
    rows = held_prompts.filter(pl.col("format").is_in(contrast) & (pl.col("pair_kind") == BUG_PAIR_KIND)).to_dicts()
    meta = {"config_hash": smk.params.config_hash, "heldout_pair_ids": held_pairs,
            "prompts_heldout": bool(held_pairs), "excluded_positions": [SINK_POSITION], "corpus": corpus_meta["corpus"],
            "ev_definition": "1 - sum|x - x_hat|^2 / sum|x - mean(x)|^2 over held-out tokens",
            "dead_definition": "features never active on the held-out prompt and corpus tokens",
            "logit_diff_prompts": f"held-out pairs of kind {BUG_PAIR_KIND}, formats " + " and ".join(contrast),
            **manifest.provenance()}
    for path in smk.input.prompt_activations:
        tables.check(tables.PROMPT_ACTIVATIONS, cfg, path)
    for path in smk.input.corpus_activations:
        tables.check(tables.CORPUS_ACTIVATIONS, cfg, path)
    saes = {}
    for layer, sae_dir in zip(smk.params.layers, smk.input.saes):
        saes[layer] = load_sae(sae_dir, device=str(device))
        check_sae_fits(saes[layer][0], expected_hook=hook_name(layer, site), d_model=manifest.d_model, where=str(sae_dir))
    clean, spliced = spliced_logit_diffs(model, {layer: sae for layer, (sae, _) in saes.items()}, rows, site=site,
                                  batch_size=cfg["cache"]["batch_size"], pad_token_id=tokenizer.pad_token_id)
    with tables.written_together() as put:
        for layer, p_acts, c_acts, out in zip(smk.params.layers, smk.input.prompt_activations,
                                              smk.input.corpus_activations, smk.output.quality):
            hook = hook_name(layer, site)
            sae, provenance = saes[layer]
            stats = {}
            fired = None
            for name, source in (("prompts", ActivationSource(p_acts, prompt_ids=held_prompt_ids)),
                                 ("corpus", ActivationSource(c_acts, prompt_ids=held_corpus_ids))):
                acc = reconstruction_stats(sae, source, cfg["sae"]["encode_batch_size"])
                stats[name] = acc.result()
                fired = acc.fired if fired is None else fired | acc.fired
            row = quality_row(layer=layer, hook=hook, sae=sae, provenance=provenance, prompt_stats=stats["prompts"],
                              corpus_stats=stats["corpus"], fired=fired, clean=clean, spliced=spliced[layer],
                              model_checkpoint=cfg["model"]["checkpoint"])
            log.info("layer %d: EV prompts %s, EV corpus %s, L0 %s, dead %.3f, logit diff %.3f -> %.3f", layer,
                     row["ev_prompts"], row["ev_corpus"], row["l0_corpus"], row["dead_fraction"],
                     row["logit_diff_clean"] or float("nan"), row["logit_diff_sae"] or float("nan"))
            table = pa.Table.from_pylist([row], schema=QUALITY_SCHEMA)
            layer_meta = {**meta, "layer": layer, "hook_name": hook, "sae_set": cfg["sae_set"]["name"],
                          **sae_provenance_meta(provenance)}
            put(tables.SAE_QUALITY_LAYER, table, out, layer_meta)

run(snakemake, main)  # noqa: F821
