
from bugscope import tables
from bugscope.figures.features import format_features
from bugscope.figures.style import FIGURE_EXTS, Labels, save_chart
from bugscope.focus import focus_layers
from bugscope.run.script import log, run


def main(smk):
    discriminative = tables.frame(tables.DISCRIMINATIVE_FEATURES, smk.config, smk.input.discriminative)
    named = tables.frame(tables.NAMED_FEATURES, smk.config, smk.input.named)
    overlap = tables.frame(tables.FEATURE_OVERLAP, smk.config, smk.input.overlap) if "overlap" in smk.input.keys() else None
    focus = focus_layers(smk.config, overlap)
    log.info("focus layers: %s", focus)
    chart = format_features(discriminative, named, Labels.from_config(smk.config), focus)
    save_chart(chart, {ext: smk.output[ext] for ext in FIGURE_EXTS}, png_scale=smk.params.png_scale)


run(snakemake, main)  # noqa: F821
