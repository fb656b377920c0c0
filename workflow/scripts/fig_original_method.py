
from bugscope import figures, tables
from bugscope.script import run


def main(smk):
    comparison = tables.frame(tables.PATCHING_ORIGINAL_METHOD, smk.config, smk.input.comparison)
    chart = figures.original_method(comparison, figures.Labels.from_config(smk.config), smk.config["model"]["num_heads"])
    figures.save_chart(chart, {ext: smk.output[ext] for ext in figures.FIGURE_EXTS}, png_scale=smk.params.png_scale)


run(snakemake, main)  # noqa: F821
