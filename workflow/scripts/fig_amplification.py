import polars as pl

from bugscope import figures
from bugscope.config import stage_hash
from bugscope.io import read_table
from bugscope.script import run


def main(smk):
    overlap = pl.from_arrow(read_table(smk.input.overlap, kind="feature_overlap", config_hash=stage_hash(smk.config, "features"))[0])
    chart = figures.amplification(overlap, figures.Labels.from_config(smk.config))
    figures.save_chart(chart, {ext: smk.output[ext] for ext in figures.FIGURE_EXTS}, png_scale=smk.params.png_scale)


run(snakemake, main)  # noqa: F821
