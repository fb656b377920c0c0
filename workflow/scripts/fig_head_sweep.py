import polars as pl

from bugscope import figures
from bugscope.config import stage_hash
from bugscope.io import read_table
from bugscope.patching import SUMMARY_KIND
from bugscope.script import run


def main(smk):
    summary = pl.from_arrow(read_table(smk.input.summary, kind=SUMMARY_KIND, config_hash=stage_hash(smk.config, "patching_summary"))[0])
    chart = figures.head_sweep(summary, figures.Labels.from_config(smk.config), smk.config["model"]["num_heads"])
    figures.save_chart(chart, {ext: smk.output[ext] for ext in figures.FIGURE_EXTS}, png_scale=smk.params.png_scale)


run(snakemake, main)  # noqa: F821
