
from bugscope import figures, tables
from bugscope.script import run


def main(smk):
    quality = tables.frame(tables.SAE_QUALITY, smk.config, smk.input.quality)
    chart = figures.sae_quality(quality, figures.Labels.from_config(smk.config))
    figures.save_chart(chart, {ext: smk.output[ext] for ext in figures.FIGURE_EXTS}, png_scale=smk.params.png_scale)


run(snakemake, main)  # noqa: F821
