import polars as pl

from bugscope import tables
from bugscope.config import with_sae_set
from bugscope.features.stages import run_discriminative
from bugscope.run.script import log, run


def main(smk):
    cfg = with_sae_set(smk.config, smk.params.sae_set)
    table, meta = run_discriminative(cfg, smk.input.prompts, smk.input.scores,
                                     dict(zip(smk.params.layers, smk.input.features)))
    tables.write(tables.DISCRIMINATIVE_FEATURES, table, smk.output.discriminative, {
        "config_hash": smk.params.config_hash, "seed": cfg["seed"], "model": cfg["model"]["name"],
        "sae_set": smk.params.sae_set, **meta})
    log.info("significant features per layer and comparison:\n%s",
             table.group_by("layer", "comparison", "direction").agg(pl.col("significant").sum()).sort("layer"))


run(snakemake, main)  # noqa: F821
