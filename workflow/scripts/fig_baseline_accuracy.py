
from bugscope import figures, tables
from bugscope.script import run


def main(smk):
    accuracy = tables.frame(tables.BASELINE_ACCURACY, smk.config, smk.input.accuracy)
    chart = figures.baseline_accuracy(accuracy, figures.Labels.from_config(smk.config))
    figures.save_chart(chart, {ext: smk.output[ext] for ext in figures.FIGURE_EXTS}, png_scale=smk.params.png_scale)


run(snakemake, main)  # noqa: F821
