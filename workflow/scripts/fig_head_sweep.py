
from bugscope import tables
from bugscope.figures.charts import FIGURE_EXTS, Labels, head_sweep, save_chart
from bugscope.run.script import run


def main(smk):
    summary = tables.frame(tables.PATCHING_SUMMARY, smk.config, smk.input.summary)
    chart = head_sweep(summary, Labels.from_config(smk.config), smk.config["model"]["num_heads"])
    save_chart(chart, {ext: smk.output[ext] for ext in FIGURE_EXTS}, png_scale=smk.params.png_scale)


run(snakemake, main)  # noqa: F821
