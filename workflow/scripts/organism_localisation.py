import json

import polars as pl

from bugscope import tables
from bugscope.claims.report import table_html
from bugscope.io import atomic_path
from bugscope.organism.localise import behaviour_change, localisation
from bugscope.organism.study import study_config
from bugscope.run.script import log, run


def main(smk):
    # the manifest as JSON, not ModelManifest.load: bugscope.model.load imports torch, which a light job never does
    planted = json.loads(open(smk.input.manifest).read())["planted"]
    study = study_config(smk.config)
    heads = tables.frame(tables.PATCHING_SUMMARY, study, smk.input.heads)
    residual_map = tables.frame(tables.PATCHING_RESIDUAL_MAP, study, smk.input.residual_map)
    scores = localisation(heads, residual_map, planted["layer"], planted["heads"], study["patching"]["positions"])
    p, boot = smk.config["prompts"], smk.config["bootstrap"]
    change = behaviour_change(tables.frame(tables.BASELINE_SCORES, smk.config, smk.input.unedited_scores),
                              tables.frame(tables.BASELINE_SCORES, study, smk.input.planted_scores),
                              formats=[p["buggy_format"], p["correct_format"]], n_resamples=boot["n_resamples"],
                              confidence=boot["confidence"], seed=smk.config["seed"])
    scores = pl.concat([scores, change])
    meta = {"config_hash": smk.params.config_hash, "planted_layer": planted["layer"], "planted_heads": planted["heads"]}
    tables.write(tables.ORGANISM_LOCALISATION, scores, smk.output.scores, meta)
    with atomic_path(smk.output.html) as tmp:
        tmp.write_text(table_html(scores, "Localisation of the planted bug",
                                  f"planted at layer {planted['layer']}, heads {planted['heads']}"))
    log.info("localisation:\n%s", scores)


run(snakemake, main)  # noqa: F821
