import polars as pl

from bugscope import figures, tables
from bugscope.figures_interventions import interventions
from bugscope.script import run


def main(smk):
    summary = tables.frame(tables.INTERVENTIONS, smk.config, smk.input.summary)
    primary = smk.config["sae"]["sets"][0]["name"]
    chart = interventions(summary.filter(pl.col("sae_set") == primary), figures.Labels.from_config(smk.config))
    figures.save_chart(chart, {ext: smk.output[ext] for ext in figures.FIGURE_EXTS}, png_scale=smk.params.png_scale)


run(snakemake, main)  # noqa: F821
