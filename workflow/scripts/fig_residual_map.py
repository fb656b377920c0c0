from bugscope import figures, figures_experiments, tables
from bugscope.script import run


def main(smk):
    summary = tables.frame(tables.PATCHING_RESIDUAL_MAP, smk.config, smk.input.summary)
    chart = figures_experiments.residual_map(summary, figures.Labels.from_config(smk.config))
    figures.save_chart(chart, {ext: smk.output[ext] for ext in figures.FIGURE_EXTS}, png_scale=smk.params.png_scale)


run(snakemake, main)  # noqa: F821
