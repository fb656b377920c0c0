from bugscope import tables
from bugscope.figures.behaviour import probes
from bugscope.figures.style import FIGURE_EXTS, Labels, save_chart
from bugscope.run.script import run


def main(smk):
    summary = tables.frame(tables.PROBES, smk.config, smk.input.probes)
    save_chart(probes(summary, Labels.from_config(smk.config)), {ext: smk.output[ext] for ext in FIGURE_EXTS},
               png_scale=smk.params.png_scale)


run(snakemake, main)  # noqa: F821
