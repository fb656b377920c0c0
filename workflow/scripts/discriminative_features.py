import polars as pl

from bugscope.features import run_discriminative
from bugscope.io import write_table
from bugscope.script import log, run


def main(smk):
    table, meta = run_discriminative(smk.config, smk.input.prompts, smk.input.scores,
                                     dict(zip(smk.params.layers, smk.input.features)))
    write_table(table.to_arrow(), smk.output.discriminative, {
        "kind": "discriminative_features", "config_hash": smk.params.config_hash, "seed": smk.config["seed"],
        "model": smk.config["model"]["name"], **meta})
    log.info("significant features per layer and comparison:\n%s",
             table.group_by("layer", "comparison", "direction").agg(pl.col("significant").sum()).sort("layer"))


run(snakemake, main)  # noqa: F821
