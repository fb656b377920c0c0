
import polars as pl

from bugscope import tables
from bugscope.config import primary_sae_set
from bugscope.figures.features import sae_quality
from bugscope.figures.style import FIGURE_EXTS, Labels, save_chart
from bugscope.run.script import run


def main(smk):
    # The primary SAE set's quality; the table holds every set's (results/sae/quality.parquet).
    quality = tables.frame(tables.SAE_QUALITY, smk.config, smk.input.quality)
    quality = quality.filter(pl.col("sae_set") == primary_sae_set(smk.config))
    chart = sae_quality(quality, Labels.from_config(smk.config))
    save_chart(chart, {ext: smk.output[ext] for ext in FIGURE_EXTS}, png_scale=smk.params.png_scale)


run(snakemake, main)  # noqa: F821
