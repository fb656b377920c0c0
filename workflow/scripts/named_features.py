from bugscope import tables
from bugscope.features import run_named
from bugscope.script import log, run


def main(smk):
    table, meta = run_named(smk.config, smk.input.prompts, dict(zip(smk.params.layers, smk.input.features)))
    tables.write(tables.NAMED_FEATURES, table, smk.output.named, {
        "config_hash": smk.params.config_hash, "seed": smk.config["seed"],
        "model": smk.config["model"]["name"], **meta})
    log.info("named features:\n%s", table)


run(snakemake, main)  # noqa: F821
