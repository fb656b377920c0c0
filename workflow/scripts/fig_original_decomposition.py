from bugscope import tables
from bugscope.figures.original import original_decomposition
from bugscope.figures.style import FIGURE_EXTS, Labels, save_chart
from bugscope.run.script import run


def main(smk):
    table = tables.frame(tables.PATCHING_ORIGINAL_DECOMPOSITION, smk.config, smk.input.decomposition)
    chart = original_decomposition(table, Labels.from_config(smk.config))
    save_chart(chart, {ext: smk.output[ext] for ext in FIGURE_EXTS}, png_scale=smk.params.png_scale)


run(snakemake, main)  # noqa: F821
