import json

from bugscope import tables
from bugscope.figures.organism import organism_comparison
from bugscope.figures.style import FIGURE_EXTS, Labels, save_chart
from bugscope.organism.study import study_config
from bugscope.run.script import run


def main(smk):
    study = study_config(smk.config)
    configs = {"unedited": smk.config, "planted": study}
    accuracy = {m: tables.frame(tables.BASELINE_ACCURACY, configs[m], smk.input[f"{m}_accuracy"]) for m in configs}
    heads = {m: tables.frame(tables.PATCHING_SUMMARY, configs[m], smk.input[f"{m}_heads"]) for m in configs}
    lens = {m: tables.frame(tables.LENS, configs[m], smk.input[f"{m}_lens"]) for m in configs}
    residual_map = {m: tables.frame(tables.PATCHING_RESIDUAL_MAP, configs[m], smk.input[f"{m}_residual_map"])
                    for m in configs if f"{m}_residual_map" in smk.input.keys()}
    # the manifest as JSON, not ModelManifest.load: bugscope.model.load imports torch, which a light job never does
    layer = json.loads(open(smk.input.manifest).read())["planted"]["layer"]
    chart = organism_comparison(accuracy, heads, Labels.from_config(smk.config), layer,
                                {m: c["patching"]["positions"] for m, c in configs.items()}, lens, residual_map)
    save_chart(chart, {ext: smk.output[ext] for ext in FIGURE_EXTS}, png_scale=smk.params.png_scale)


run(snakemake, main)  # noqa: F821
