import polars as pl

from bugscope import figures
from bugscope.config import stage_hash
from bugscope.features import focus_layers
from bugscope.io import read_table
from bugscope.script import log, run


def main(smk):
    discriminative = pl.from_arrow(read_table(smk.input.discriminative, kind="discriminative_features", config_hash=stage_hash(smk.config, "features"))[0])
    named = pl.from_arrow(read_table(smk.input.named, kind="named_features", config_hash=stage_hash(smk.config, "features"))[0])
    overlap = pl.from_arrow(read_table(smk.input.overlap, kind="feature_overlap", config_hash=stage_hash(smk.config, "features"))[0]) if "overlap" in smk.input.keys() else None
    focus = focus_layers(smk.config, overlap)
    log.info("focus layers: %s", focus)
    chart = figures.format_features(discriminative, named, figures.Labels.from_config(smk.config), focus)
    figures.save_chart(chart, {ext: smk.output[ext] for ext in figures.FIGURE_EXTS}, png_scale=smk.params.png_scale)


run(snakemake, main)  # noqa: F821
