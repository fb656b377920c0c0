import polars as pl

from bugscope import tables
from bugscope.config import with_sae_set
from bugscope.features.pages import run_pages
from bugscope.io import atomic_path
from bugscope.model.load import ModelManifest, load_tokenizer, pick_device
from bugscope.run.script import log, run


def main(smk):
    cfg = with_sae_set(smk.config, smk.params.sae_set)
    layers = smk.params.layers
    overlap = tables.frame(tables.FEATURE_OVERLAP, cfg, smk.input.overlap) if "overlap" in smk.input.keys() else None
    tokenizer = load_tokenizer(ModelManifest.load(smk.input.manifest))
    tokens, contexts, pages, meta = run_pages(
        cfg, tokenizer, prompts_path=smk.input.prompts, corpus_path=smk.input.corpus,
        discriminative_path=smk.input.discriminative, overlap=overlap,
        feature_paths=dict(zip(layers, smk.input.features)), corpus_paths=dict(zip(layers, smk.input.activations)),
        sae_dirs=dict(zip(layers, smk.input.saes)), device=str(pick_device(cfg["device"])))
    meta = {"config_hash": smk.params.config_hash, "seed": cfg["seed"], "model": cfg["model"]["name"],
            "sae_set": smk.params.sae_set, **meta}
    with tables.written_together() as put:
        put(tables.FEATURE_TOKENS, tokens, smk.output.tokens, meta)
        put(tables.FEATURE_CONTEXTS, contexts, smk.output.contexts, meta)
        with atomic_path(smk.output.pages, is_dir=True) as tmp:
            tmp.chmod(0o755)  # a folder of pages to read, not mkdtemp's private 0700
            for name, text in pages.items():
                (tmp / name).write_text(text)
    log.info("feature pages of set %s at layers %s: %d features\n%s", smk.params.sae_set, meta["page_layers"],
             contexts["feature_id"].n_unique(),
             tokens.filter(pl.col("level") == "role", pl.col("pairs") == "all").group_by("layer", "format", "role")
             .agg(pl.col("mean_activation").mean()).sort("layer", "format", "role"))


run(snakemake, main)  # noqa: F821
