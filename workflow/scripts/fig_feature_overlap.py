
from bugscope import figures, figures_overlap, tables
from bugscope.script import run


def main(smk):
    overlap = tables.frame(tables.FEATURE_OVERLAP, smk.config, smk.input.overlap)
    chart = figures_overlap.feature_overlap(overlap, figures.Labels.from_config(smk.config))
    figures.save_chart(chart, {ext: smk.output[ext] for ext in figures.FIGURE_EXTS}, png_scale=smk.params.png_scale)


run(snakemake, main)  # noqa: F821
