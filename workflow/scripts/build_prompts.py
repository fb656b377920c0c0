from bugscope import tables
from bugscope.data.prompts import build_prompt_table
from bugscope.model.load import ModelManifest, load_tokenizer
from bugscope.run.script import log, run


def main(smk):
    manifest = ModelManifest.load(smk.input.manifest)
    tokenizer = load_tokenizer(manifest)
    table = build_prompt_table(smk.config, tokenizer)
    tables.write(tables.PROMPTS, table, smk.output.prompts, {
        "config_hash": smk.params.config_hash, "seed": smk.config["seed"], **manifest.provenance()})
    log.info("wrote %d prompts", table.num_rows)


run(snakemake, main)  # noqa: F821
