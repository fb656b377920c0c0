import polars as pl

from bugscope import tables
from bugscope.figures.patching import head_subsets
from bugscope.figures.style import FIGURE_EXTS, Labels, save_chart
from bugscope.run.script import log, run


def main(smk):
    table, meta = tables.read(tables.PATCHING_SUMMARY, smk.config, smk.input.summary)
    summary = pl.from_arrow(table)
    # the focus layers the patching stage resolved (and drew its subsets at)
    focus = sorted(meta.get("focus_layers") or summary.filter(pl.col("family") == "subset")["layer"].unique().to_list())
    if not focus:
        raise ValueError(f"{smk.input.summary} records no focus layers and has no head subsets to draw.")
    log.info("focus layers: %s (from %s)", focus, meta.get("focus_layer_source"))
    chart = head_subsets(summary, Labels.from_config(smk.config), focus)
    save_chart(chart, {ext: smk.output[ext] for ext in FIGURE_EXTS}, png_scale=smk.params.png_scale)


run(snakemake, main)  # noqa: F821
