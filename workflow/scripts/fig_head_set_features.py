from bugscope import figures, figures_experiments, tables
from bugscope.script import run


def main(smk):
    summary = tables.frame(tables.HEAD_SET_FEATURES, smk.config, smk.input.summary)
    chart = figures_experiments.head_set_features(summary, figures.Labels.from_config(smk.config))
    figures.save_chart(chart, {ext: smk.output[ext] for ext in figures.FIGURE_EXTS}, png_scale=smk.params.png_scale)


run(snakemake, main)  # noqa: F821
