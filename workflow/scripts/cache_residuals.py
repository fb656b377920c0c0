
from bugscope import tables
from bugscope.model.cache import cache_activations, positions_for
from bugscope.model.load import ModelManifest, load_model
from bugscope.run.script import log, run


def main(smk):
    cfg = smk.config
    manifest = ModelManifest.load(smk.input.manifest)
    prompts = tables.frame(tables.PROMPTS, smk.config, smk.input.prompts)
    model, tokenizer = load_model(manifest, cfg["device"])
    rows = [{**r, "positions": positions_for(r, cfg["cache"]["positions"])} for r in prompts.to_dicts()]
    n = cache_activations(
        model, rows, hooks=smk.params.hooks, dtype=cfg["cache"]["dtype"],
        out_paths=dict(zip(smk.params.hooks, smk.output.activations)),
        meta={"dataset": "prompts", "config_hash": smk.params.config_hash, "positions": cfg["cache"]["positions"],
              **manifest.provenance()},
        batch_size=cfg["cache"]["batch_size"], pad_token_id=tokenizer.pad_token_id, desc="caching prompts",
    )
    log.info("cached %d rows per hook for %d hooks", n, len(smk.params.hooks))


run(snakemake, main)  # noqa: F821
