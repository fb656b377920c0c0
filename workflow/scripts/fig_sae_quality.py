import polars as pl

from bugscope import figures
from bugscope.config import stage_hash
from bugscope.io import read_table
from bugscope.sae_quality import QUALITY_KIND
from bugscope.script import run


def main(smk):
    quality = pl.from_arrow(read_table(smk.input.quality, kind=QUALITY_KIND, config_hash=stage_hash(smk.config, "sae"))[0])
    chart = figures.sae_quality(quality, figures.Labels.from_config(smk.config))
    figures.save_chart(chart, {ext: smk.output[ext] for ext in figures.FIGURE_EXTS}, png_scale=smk.params.png_scale)


run(snakemake, main)  # noqa: F821
