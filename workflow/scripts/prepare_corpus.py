import polars as pl

from bugscope import tables
from bugscope.data.corpus import build_corpus_table
from bugscope.model.load import ModelManifest, load_tokenizer
from bugscope.run.script import log, run


def main(smk):
    cfg = smk.config
    manifest = ModelManifest.load(smk.input.manifest)
    prompts = tables.read(tables.PROMPTS, smk.config, smk.input.prompts)[0]
    tokenizer = load_tokenizer(manifest)
    table, meta = build_corpus_table(cfg["sae"]["corpus"], prompts, tokenizer, seed=cfg["seed"],
                                     include_train=any(s["source"] == "train" for s in cfg["sae"]["sets"]))
    tables.write(tables.CORPUS, table, smk.output.corpus, {"config_hash": smk.params.config_hash,
                                                           "seed": cfg["seed"], **meta, **manifest.provenance()})
    summary = pl.from_arrow(table).group_by("source", "split").agg(pl.len().alias("rows"), pl.col("n_tokens").sum())
    log.info("corpus:\n%s\nheld-out pairs: %s", summary.sort("source"), meta["heldout_pair_ids"])


run(snakemake, main)  # noqa: F821
