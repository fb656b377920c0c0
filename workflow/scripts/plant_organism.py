from bugscope import tables
from bugscope.model.load import ModelManifest
from bugscope.organism.plant import plant_organism
from bugscope.run.script import log, run


def main(smk):
    prompts = tables.frame(tables.PROMPTS, smk.config, smk.input.prompts)
    analysis_pairs = set(prompts.select("correct", "wrong").unique().iter_rows())
    manifest = plant_organism(smk.config, ModelManifest.load(smk.input.manifest), analysis_pairs,
                              smk.output.checkpoint, smk.output.manifest)
    curve = manifest.planted["loss_curve"]
    log.info("planted at layer %d, heads %s: loss %.4f -> %.4f over %d steps", manifest.planted["layer"],
             manifest.planted["heads"], curve[0]["loss"], curve[-1]["loss"], len(curve))


run(snakemake, main)  # noqa: F821
