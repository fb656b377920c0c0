import numpy as np
import polars as pl

from bugscope import tables
from bugscope.data.probes import position_vectors
from bugscope.data.reading import POSITIONS, closeness_predictions, closeness_summary, family_accuracy, steering_summary
from bugscope.model.sites import parse_hook_name
from bugscope.run.script import log, run


def main(smk):
    cfg = smk.config
    p = cfg["prompts"]
    formats = [p["buggy_format"], p["correct_format"]]
    analysis = tables.frame(tables.PROMPTS, cfg, smk.input.prompts).filter(pl.col("format").is_in(formats))
    reading = tables.frame(tables.READING_PROMPTS, cfg, smk.input.reading_prompts)
    scores = tables.frame(tables.READING_SCORES, cfg, smk.input.scores)
    meta = pl.concat([analysis, reading], how="diagonal_relaxed").sort("prompt_id")
    boot = dict(n_resamples=cfg["bootstrap"]["n_resamples"], confidence=cfg["bootstrap"]["confidence"], seed=cfg["seed"])

    unsteered = (scores.filter(pl.col("condition") == "none").join(meta, on="prompt_id")
                 .filter(pl.col("family").is_in(list(cfg["reading"]["families"])), pl.col("wording") != "analysis")
                 .with_columns(is_correct=pl.col("logit_diff") > 0))
    accuracy = family_accuracy(unsteered, **boot)

    parts = []
    in_analysis = meta["prompt_id"].is_in(analysis["prompt_id"].implode()).to_numpy()
    for prompt_path, reading_path in zip(smk.input.activations, smk.input.reading_activations):
        # one layer's vectors in memory at a time
        info = tables.check(tables.PROMPT_ACTIVATIONS, cfg, prompt_path)
        tables.check(tables.READING_ACTIVATIONS, cfg, reading_path)
        layer = parse_hook_name(info["hook_name"])[0]
        vectors = {}
        for name, column in POSITIONS.items():
            x = np.empty((meta.height, int(info["d_model"])), np.float32)
            x[in_analysis] = position_vectors(prompt_path, info["dtype"], meta.filter(pl.Series(in_analysis)), column)
            x[~in_analysis] = position_vectors(reading_path, info["dtype"], meta.filter(~pl.Series(in_analysis)), column)
            vectors[(layer, name)] = x
        parts.append(closeness_predictions(vectors, meta, alphas=cfg["probes"]["alphas"]))
    predictions = pl.concat(parts)
    closeness = closeness_summary(predictions, buggy_format=formats[0], correct_format=formats[1], **boot)
    baseline = tables.frame(tables.BASELINE_SCORES, cfg, smk.input.baseline)
    steering = steering_summary(scores, meta, baseline, buggy_format=formats[0], correct_format=formats[1], **boot)
    out = {"config_hash": smk.params.config_hash, "seed": cfg["seed"]}
    with tables.written_together() as put:
        put(tables.READING_ACCURACY, accuracy, smk.output.accuracy, out)
        put(tables.READING_CLOSENESS_PROMPTS, predictions, smk.output.closeness_prompts, out)
        put(tables.READING_CLOSENESS, closeness, smk.output.closeness, out)
        put(tables.READING_STEERING, steering, smk.output.steering, out)
    log.info("reading: %d family prompts scored, closeness at %d layers", unsteered.height, len(parts))


run(snakemake, main)  # noqa: F821
