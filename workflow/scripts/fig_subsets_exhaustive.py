from bugscope import tables
from bugscope.figures.experiments import subsets_exhaustive
from bugscope.figures.style import FIGURE_EXTS, Labels, save_chart
from bugscope.run.script import run


def main(smk):
    summary = tables.frame(tables.PATCHING_EXHAUSTIVE, smk.config, smk.input.summary)
    chart = subsets_exhaustive(summary, Labels.from_config(smk.config))
    save_chart(chart, {ext: smk.output[ext] for ext in FIGURE_EXTS}, png_scale=smk.params.png_scale)


run(snakemake, main)  # noqa: F821
