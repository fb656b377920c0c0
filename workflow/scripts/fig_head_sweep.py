
from bugscope import figures, tables
from bugscope.script import run


def main(smk):
    summary = tables.frame(tables.PATCHING_SUMMARY, smk.config, smk.input.summary)
    chart = figures.head_sweep(summary, figures.Labels.from_config(smk.config), smk.config["model"]["num_heads"])
    figures.save_chart(chart, {ext: smk.output[ext] for ext in figures.FIGURE_EXTS}, png_scale=smk.params.png_scale)


run(snakemake, main)  # noqa: F821
