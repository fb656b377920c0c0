
from bugscope import tables
from bugscope.figures.features import head_attribution
from bugscope.figures.style import FIGURE_EXTS, Labels, save_chart
from bugscope.focus import focus_layers
from bugscope.run.script import log, run


def main(smk):
    attribution = tables.frame(tables.HEAD_FEATURE_ATTRIBUTION, smk.config, smk.input.attribution)
    overlap = tables.frame(tables.FEATURE_OVERLAP, smk.config, smk.input.overlap) if "overlap" in smk.input.keys() else None
    focus = focus_layers(smk.config, overlap)
    attributed = sorted(attribution["layer"].unique().to_list())
    missing = [layer for layer in focus if layer not in attributed]
    if missing:
        raise ValueError(f"focus layer(s) {missing} have no head attribution (attributed layers: {attributed}); "
                         "add them to features.attribution.layers or set it to 'all'.")
    log.info("focus layers: %s", focus)
    chart = head_attribution(attribution, Labels.from_config(smk.config), focus)
    save_chart(chart, {ext: smk.output[ext] for ext in FIGURE_EXTS}, png_scale=smk.params.png_scale)


run(snakemake, main)  # noqa: F821
