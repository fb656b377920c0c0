from bugscope import tables
from bugscope.data.corpus import cache_rows
from bugscope.model.cache import cache_activations
from bugscope.model.load import ModelManifest, load_model
from bugscope.run.script import log, run


def main(smk):
    cfg = smk.config
    manifest = ModelManifest.load(smk.input.manifest)
    corpus, corpus_meta = tables.read(tables.CORPUS, cfg, smk.input.corpus)
    model, tokenizer = load_model(manifest, cfg["device"])
    # The same caching code as the analysis prompts; position 0 (the attention sink) is not cached.
    n = cache_activations(
        model, cache_rows(corpus), hooks=smk.params.hooks,
        dtype=cfg["sae"]["corpus"]["dtype"], out_paths=dict(zip(smk.params.hooks, smk.output.activations)),
        meta={"dataset": "corpus", "config_hash": smk.params.config_hash, "positions": "all_but_first",
              "corpus": corpus_meta["corpus"], **manifest.provenance()},
        batch_size=cfg["cache"]["batch_size"], pad_token_id=tokenizer.pad_token_id, desc="caching corpus",
    )
    log.info("cached %d corpus tokens per hook for %d hooks", n, len(smk.params.hooks))


run(snakemake, main)  # noqa: F821
