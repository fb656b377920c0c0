import contextlib

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from bugscope.cache import ACTIVATIONS_KIND
from bugscope.config import stage_hash
from bugscope.corpus import CORPUS_KIND
from bugscope.io import atomic_path, check_table, encode_metadata, read_table
from bugscope.model import ModelManifest, load_model
from bugscope.sae import ActivationSource, check_sae_fits, iter_activations, load_sae, sae_provenance_meta
from bugscope.sae_quality import QUALITY_KIND, QUALITY_SCHEMA, ReconstructionStats, quality_row, spliced_logit_diffs
from bugscope.script import log, run
from bugscope.sites import hook_name


def main(smk):
    cfg = smk.config
    site = cfg["cache"]["site"]
    manifest = ModelManifest.load(smk.input.manifest)
    prompts = pl.from_arrow(read_table(smk.input.prompts, kind="prompts", config_hash=stage_hash(smk.config, "prompts"))[0])
    corpus, corpus_meta = read_table(smk.input.corpus, kind=CORPUS_KIND, config_hash=smk.params.config_hash,
                                     columns=["prompt_id", "split"])
    held_pairs = corpus_meta["heldout_pair_ids"]
    held_prompts = prompts.filter(pl.col("pair_id").is_in(held_pairs)) if held_pairs else prompts
    held_prompt_ids = frozenset(held_prompts["prompt_id"].to_list())
    held_corpus_ids = frozenset(pl.from_arrow(corpus).filter(pl.col("split") == "heldout")["prompt_id"].to_list())
    model, tokenizer = load_model(manifest, cfg["device"])
    device = next(model.parameters()).device
    # The spliced forward passes run on the held-out prompts of the two contrasted formats only: one
    # pass per layer over every token is the stage's largest cost.
    contrast = [cfg["prompts"]["buggy_format"], cfg["prompts"]["correct_format"]]
    rows = held_prompts.filter(pl.col("format").is_in(contrast)).to_dicts()
    meta = {"kind": QUALITY_KIND, "config_hash": smk.params.config_hash, "heldout_pair_ids": held_pairs,
            "prompts_heldout": bool(held_pairs), "excluded_positions": [0], "corpus": corpus_meta["corpus"],
            "ev_definition": "1 - sum|x - x_hat|^2 / sum|x - mean(x)|^2 over held-out tokens",
            "dead_definition": "features never active on the held-out prompt and corpus tokens",
            "logit_diff_prompts": "held-out pairs, formats " + " and ".join(contrast),
            **manifest.provenance()}
    for path in smk.input.prompt_activations:
        check_table(path, kind=ACTIVATIONS_KIND, config_hash=stage_hash(cfg, "activations"))
    for path in smk.input.corpus_activations:
        check_table(path, kind=ACTIVATIONS_KIND, config_hash=smk.params.config_hash)
    saes = {}
    for layer, sae_dir in zip(smk.params.layers, smk.input.saes):
        saes[layer] = load_sae(sae_dir, device=str(device))
        check_sae_fits(saes[layer][0], expected_hook=hook_name(layer, site), d_model=manifest.d_model, where=str(sae_dir))
    clean, spliced = spliced_logit_diffs(model, {layer: sae for layer, (sae, _) in saes.items()}, rows, site=site,
                                  batch_size=cfg["cache"]["batch_size"], pad_token_id=tokenizer.pad_token_id)
    with contextlib.ExitStack() as stack:  # all outputs of the group are renamed into place together
        for layer, p_acts, c_acts, out in zip(smk.params.layers, smk.input.prompt_activations,
                                              smk.input.corpus_activations, smk.output.quality):
            hook = hook_name(layer, site)
            sae, provenance = saes[layer]
            stats = {}
            fired = None
            for name, source in (("prompts", ActivationSource(p_acts, prompt_ids=held_prompt_ids)),
                                 ("corpus", ActivationSource(c_acts, prompt_ids=held_corpus_ids))):
                acc = ReconstructionStats(sae.cfg.d_in, sae.cfg.d_sae)
                for _, _, x in iter_activations([source]):
                    for start in range(0, x.shape[0], cfg["sae"]["encode_batch_size"]):
                        acc.update(sae, x[start:start + cfg["sae"]["encode_batch_size"]])
                stats[name] = acc.result()
                fired = acc.fired if fired is None else fired | acc.fired
            row = quality_row(layer=layer, hook=hook, sae=sae, provenance=provenance, prompt_stats=stats["prompts"],
                              corpus_stats=stats["corpus"], fired=fired, clean=clean, spliced=spliced[layer])
            log.info("layer %d: EV prompts %s, EV corpus %s, L0 %s, dead %.3f, logit diff %.3f -> %.3f", layer,
                     row["ev_prompts"], row["ev_corpus"], row["l0_corpus"], row["dead_fraction"],
                     row["logit_diff_clean"] or float("nan"), row["logit_diff_sae"] or float("nan"))
            table = pa.Table.from_pylist([row], schema=QUALITY_SCHEMA)
            layer_meta = {**meta, "layer": layer, "hook_name": hook, **sae_provenance_meta(provenance)}
            tmp = stack.enter_context(atomic_path(out))
            pq.write_table(table.replace_schema_metadata(encode_metadata(layer_meta)), tmp, compression="zstd")

run(snakemake, main)  # noqa: F821
