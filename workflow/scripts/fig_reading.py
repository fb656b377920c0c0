from bugscope import tables
from bugscope.figures.reading import reading
from bugscope.figures.style import FIGURE_EXTS, Labels, save_chart
from bugscope.run.script import run


def main(smk):
    accuracy = tables.frame(tables.READING_ACCURACY, smk.config, smk.input.accuracy)
    closeness = tables.frame(tables.READING_CLOSENESS, smk.config, smk.input.closeness)
    save_chart(reading(accuracy, closeness, Labels.from_config(smk.config)),
               {ext: smk.output[ext] for ext in FIGURE_EXTS}, png_scale=smk.params.png_scale)


run(snakemake, main)  # noqa: F821
