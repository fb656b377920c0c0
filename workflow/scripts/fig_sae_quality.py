
import polars as pl

from bugscope import figures, tables
from bugscope.config import primary_sae_set
from bugscope.script import run


def main(smk):
    # The primary SAE set's quality; the table holds every set's (results/sae/quality.parquet).
    quality = tables.frame(tables.SAE_QUALITY, smk.config, smk.input.quality)
    quality = quality.filter(pl.col("sae_set") == primary_sae_set(smk.config))
    chart = figures.sae_quality(quality, figures.Labels.from_config(smk.config))
    figures.save_chart(chart, {ext: smk.output[ext] for ext in figures.FIGURE_EXTS}, png_scale=smk.params.png_scale)


run(snakemake, main)  # noqa: F821
