from bugscope import figures, tables
from bugscope.figures_original import original_decomposition
from bugscope.script import run


def main(smk):
    table = tables.frame(tables.PATCHING_ORIGINAL_DECOMPOSITION, smk.config, smk.input.decomposition)
    chart = original_decomposition(table, figures.Labels.from_config(smk.config))
    figures.save_chart(chart, {ext: smk.output[ext] for ext in figures.FIGURE_EXTS}, png_scale=smk.params.png_scale)


run(snakemake, main)  # noqa: F821
