import polars as pl

from bugscope import tables
from bugscope.figures.interventions import interventions
from bugscope.figures.style import FIGURE_EXTS, Labels, save_chart
from bugscope.run.script import run


def main(smk):
    summary = tables.frame(tables.INTERVENTIONS, smk.config, smk.input.summary)
    primary = smk.config["sae"]["sets"][0]["name"]
    chart = interventions(summary.filter(pl.col("sae_set") == primary), Labels.from_config(smk.config))
    save_chart(chart, {ext: smk.output[ext] for ext in FIGURE_EXTS}, png_scale=smk.params.png_scale)


run(snakemake, main)  # noqa: F821
