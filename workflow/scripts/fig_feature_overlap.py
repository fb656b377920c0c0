
from bugscope import tables
from bugscope.figures.overlap import feature_overlap
from bugscope.figures.style import FIGURE_EXTS, Labels, save_chart
from bugscope.run.script import run


def main(smk):
    overlap = tables.frame(tables.FEATURE_OVERLAP, smk.config, smk.input.overlap)
    chart = feature_overlap(overlap, Labels.from_config(smk.config))
    save_chart(chart, {ext: smk.output[ext] for ext in FIGURE_EXTS}, png_scale=smk.params.png_scale)


run(snakemake, main)  # noqa: F821
