from bugscope import tables
from bugscope.figures.experiments import residual_map
from bugscope.figures.style import FIGURE_EXTS, Labels, save_chart
from bugscope.run.script import run


def main(smk):
    summary = tables.frame(tables.PATCHING_RESIDUAL_MAP, smk.config, smk.input.summary)
    chart = residual_map(summary, Labels.from_config(smk.config))
    save_chart(chart, {ext: smk.output[ext] for ext in FIGURE_EXTS}, png_scale=smk.params.png_scale)


run(snakemake, main)  # noqa: F821
