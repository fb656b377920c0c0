from bugscope.model.load import prepare_model
from bugscope.run.script import log, run


def main(smk):
    manifest = prepare_model(smk.params.model, smk.params.checkpoint_dir, smk.output.manifest)
    log.info("prepared %s", manifest)


run(snakemake, main)  # noqa: F821
