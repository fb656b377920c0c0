import polars as pl

from bugscope.config import stage_hash
from bugscope.corpus import CORPUS_KIND, build_corpus_table
from bugscope.io import read_table, write_table
from bugscope.model import ModelManifest, load_tokenizer
from bugscope.script import log, run


def main(smk):
    cfg = smk.config
    manifest = ModelManifest.load(smk.input.manifest)
    prompts = read_table(smk.input.prompts, kind="prompts", config_hash=stage_hash(smk.config, "prompts"))[0]
    tokenizer = load_tokenizer(manifest)
    table, meta = build_corpus_table(cfg["sae"]["corpus"], prompts, tokenizer, seed=cfg["seed"],
                                     include_train=cfg["sae"]["source"] == "train")
    write_table(table, smk.output.corpus, {"kind": CORPUS_KIND, "config_hash": smk.params.config_hash,
                                           "seed": cfg["seed"], **meta, **manifest.provenance()})
    summary = pl.from_arrow(table).group_by("source", "split").agg(pl.len().alias("rows"), pl.col("n_tokens").sum())
    log.info("corpus:\n%s\nheld-out pairs: %s", summary.sort("source"), meta["heldout_pair_ids"])


run(snakemake, main)  # noqa: F821
