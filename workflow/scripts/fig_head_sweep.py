
from bugscope import tables
from bugscope.figures.patching import head_sweep
from bugscope.figures.style import FIGURE_EXTS, Labels, save_chart
from bugscope.run.script import run


def main(smk):
    summary = tables.frame(tables.PATCHING_SUMMARY, smk.config, smk.input.summary)
    chart = head_sweep(summary, Labels.from_config(smk.config), smk.config["model"]["num_heads"])
    save_chart(chart, {ext: smk.output[ext] for ext in FIGURE_EXTS}, png_scale=smk.params.png_scale)


run(snakemake, main)  # noqa: F821
