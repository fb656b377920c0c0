from bugscope import tables
from bugscope.figures.reading import reading_steering
from bugscope.figures.style import FIGURE_EXTS, Labels, save_chart
from bugscope.run.script import run


def main(smk):
    steering = tables.frame(tables.READING_STEERING, smk.config, smk.input.steering)
    save_chart(reading_steering(steering, Labels.from_config(smk.config)),
               {ext: smk.output[ext] for ext in FIGURE_EXTS}, png_scale=smk.params.png_scale)


run(snakemake, main)  # noqa: F821
