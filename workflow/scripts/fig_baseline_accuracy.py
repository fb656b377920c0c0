
from bugscope import tables
from bugscope.figures.behaviour import baseline_accuracy
from bugscope.figures.style import FIGURE_EXTS, Labels, save_chart
from bugscope.run.script import run


def main(smk):
    accuracy = tables.frame(tables.BASELINE_ACCURACY, smk.config, smk.input.accuracy)
    chart = baseline_accuracy(accuracy, Labels.from_config(smk.config))
    save_chart(chart, {ext: smk.output[ext] for ext in FIGURE_EXTS}, png_scale=smk.params.png_scale)


run(snakemake, main)  # noqa: F821
