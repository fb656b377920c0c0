from bugscope import tables
from bugscope.data.reading import build_reading_table
from bugscope.model.load import ModelManifest, load_tokenizer
from bugscope.run.script import log, run


def main(smk):
    manifest = ModelManifest.load(smk.input.manifest)
    analysis = tables.frame(tables.PROMPTS, smk.config, smk.input.prompts)
    table = build_reading_table(smk.config, load_tokenizer(manifest), analysis)
    tables.write(tables.READING_PROMPTS, table, smk.output.prompts, {
        "config_hash": smk.params.config_hash, "seed": smk.config["seed"], **manifest.provenance()})
    log.info("wrote %d reading-family prompts", table.num_rows)


run(snakemake, main)  # noqa: F821
