from bugscope import tables
from bugscope.config import with_sae_set
from bugscope.features.stages import run_named
from bugscope.run.script import log, run


def main(smk):
    cfg = with_sae_set(smk.config, smk.params.sae_set)
    table, meta = run_named(cfg, smk.input.prompts, dict(zip(smk.params.layers, smk.input.features)),
                            smk.input.discriminative)
    tables.write(tables.NAMED_FEATURES, table, smk.output.named, {
        "config_hash": smk.params.config_hash, "seed": cfg["seed"], "model": cfg["model"]["name"],
        "sae_set": smk.params.sae_set, **meta})
    log.info("named features:\n%s", table)


run(snakemake, main)  # noqa: F821
