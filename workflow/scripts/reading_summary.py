import numpy as np
import polars as pl

from bugscope import tables
from bugscope.data.probes import vectors_at
from bugscope.data.reading import (
    POSITIONS,
    READING_FEATURES,
    closeness_predictions,
    closeness_summary,
    family_accuracy,
    steering_summary,
)
from bugscope.features.reading import feature_summary
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
        columns = list(POSITIONS.values())
        cached = vectors_at(prompt_path, info["dtype"], meta.filter(pl.Series(in_analysis)), columns)
        families = vectors_at(reading_path, info["dtype"], meta.filter(~pl.Series(in_analysis)), columns)
        vectors = {}
        for name, column in POSITIONS.items():
            x = np.empty((meta.height, int(info["d_model"])), np.float32)
            x[in_analysis], x[~in_analysis] = cached[column], families[column]
            vectors[(layer, name)] = x
        parts.append(closeness_predictions(vectors, meta, alphas=cfg["probes"]["alphas"]))
    predictions = pl.concat(parts)
    closeness = closeness_summary(predictions, buggy_format=formats[0], correct_format=formats[1],
                                  min_accuracy=cfg["claims"]["verdicts"]["reading_probe_min_accuracy"], **boot)
    baseline = tables.frame(tables.BASELINE_SCORES, cfg, smk.input.baseline)
    steering = steering_summary(scores, meta, baseline, buggy_format=formats[0], correct_format=formats[1], **boot)
    features = feature_summary(*_feature_activations(smk, cfg, analysis, reading), buggy_format=formats[0],
                               correct_format=formats[1], test=cfg["features"]["discriminative"]["test"], **boot)
    out = {"config_hash": smk.params.config_hash, "seed": cfg["seed"]}
    with tables.written_together() as put:
        put(tables.READING_ACCURACY, accuracy, smk.output.accuracy, out)
        put(tables.READING_CLOSENESS_PROMPTS, predictions, smk.output.closeness_prompts, out)
        put(tables.READING_CLOSENESS, closeness, smk.output.closeness, out)
        put(tables.READING_STEERING, steering, smk.output.steering, out)
        put(tables.READING_FEATURE_SUMMARY, features, smk.output.feature_summary, out)
    log.info("reading: %d family prompts scored, closeness at %d layers", unsteered.height, len(parts))


def _feature_activations(smk, cfg, analysis, reading):
    """The reading features' summed activation at the decision position: per family prompt (the model
    job's), and per analysis prompt from the SAE codes of the features stage (0 where none fires)."""
    chosen = tables.frame(tables.READING_FEATURES, cfg, smk.input.features).filter(pl.col("role") == READING_FEATURES)
    per_family = (tables.frame(tables.READING_FEATURE_PROMPTS, cfg, smk.input.feature_prompts)
                  .join(reading.select("prompt_id", "pair_id", "order", "family", "wording"), on="prompt_id"))
    parts = []
    for path in smk.input.feature_codes:  # one layer's codes at a time
        info = tables.check(tables.FEATURES, cfg, path)
        layer = int(info["layer"])
        ids = chosen.filter(pl.col("layer") == layer)["feature_id"].to_list()
        codes = pl.read_parquet(path, columns=["prompt_id", "position", "feature_id", "activation"]).filter(
            pl.col("feature_id").is_in(ids))
        summed = (analysis.select("prompt_id", pl.col("decision_pos").alias("position"))
                  .join(codes, on=["prompt_id", "position"], how="left")
                  .group_by("prompt_id").agg(pl.col("activation").fill_null(0.0).sum()))
        parts.append(analysis.select("prompt_id", "question_id", "pair_id", "pair_kind", "format")
                     .join(summed, on="prompt_id").with_columns(layer=pl.lit(layer)))
    empty = pl.DataFrame(schema={"prompt_id": pl.Int32, "question_id": pl.Int32, "pair_id": pl.Int32,
                                 "pair_kind": pl.String, "format": pl.String, "activation": pl.Float64,
                                 "layer": pl.Int32})
    return per_family, (pl.concat(parts, how="vertical_relaxed") if parts else empty)


run(snakemake, main)  # noqa: F821
