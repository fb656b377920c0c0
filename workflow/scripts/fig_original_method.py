
from bugscope import tables
from bugscope.figures.patching import original_method
from bugscope.figures.style import FIGURE_EXTS, Labels, save_chart
from bugscope.run.script import run


def main(smk):
    comparison = tables.frame(tables.PATCHING_ORIGINAL_METHOD, smk.config, smk.input.comparison)
    chart = original_method(comparison, Labels.from_config(smk.config), smk.config["model"]["num_heads"])
    save_chart(chart, {ext: smk.output[ext] for ext in FIGURE_EXTS}, png_scale=smk.params.png_scale)


run(snakemake, main)  # noqa: F821
