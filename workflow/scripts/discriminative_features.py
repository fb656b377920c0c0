import polars as pl

from bugscope import tables
from bugscope.features import run_discriminative
from bugscope.script import log, run


def main(smk):
    table, meta = run_discriminative(smk.config, smk.input.prompts, smk.input.scores,
                                     dict(zip(smk.params.layers, smk.input.features)))
    tables.write(tables.DISCRIMINATIVE_FEATURES, table, smk.output.discriminative, {
        "config_hash": smk.params.config_hash, "seed": smk.config["seed"],
        "model": smk.config["model"]["name"], **meta})
    log.info("significant features per layer and comparison:\n%s",
             table.group_by("layer", "comparison", "direction").agg(pl.col("significant").sum()).sort("layer"))


run(snakemake, main)  # noqa: F821
