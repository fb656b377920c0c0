from bugscope.features import run_named
from bugscope.io import write_table
from bugscope.script import log, run


def main(smk):
    table, meta = run_named(smk.config, smk.input.prompts, dict(zip(smk.params.layers, smk.input.features)))
    write_table(table.to_arrow(), smk.output.named, {
        "kind": "named_features", "config_hash": smk.params.config_hash, "seed": smk.config["seed"],
        "model": smk.config["model"]["name"], **meta})
    log.info("named features:\n%s", table)


run(snakemake, main)  # noqa: F821
