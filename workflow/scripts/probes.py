import polars as pl

from bugscope import tables
from bugscope.data.probes import position_vectors, probe_predictions, probe_summary
from bugscope.model.sites import parse_hook_name
from bugscope.run.script import log, run


def main(smk):
    cfg = smk.config
    prompts = tables.frame(tables.PROMPTS, cfg, smk.input.prompts).sort("prompt_id")
    scores = tables.frame(tables.BASELINE_SCORES, cfg, smk.input.scores)
    probes = cfg["probes"]
    train = probes["train_formats"] or [cfg["prompts"]["buggy_format"], cfg["prompts"]["correct_format"]]
    parts, layers = [], []
    for path in smk.input.activations:  # one layer's vectors in memory at a time (8B: 2,304 x 4,096 floats)
        meta = tables.check(tables.PROMPT_ACTIVATIONS, cfg, path)
        layer = parse_hook_name(meta["hook_name"])[0]
        vectors = {layer: position_vectors(path, meta["dtype"], prompts)}
        parts.append(probe_predictions(vectors, prompts, train_formats=train, folds=probes["folds"],
                                       alphas=probes["alphas"], seed=cfg["seed"]))
        layers.append(layer)
    predictions = pl.concat(parts)
    boot = cfg["bootstrap"]
    summary = probe_summary(predictions, scores, n_resamples=boot["n_resamples"], confidence=boot["confidence"],
                            seed=cfg["seed"])
    meta = {"config_hash": smk.params.config_hash, "seed": cfg["seed"], "layers": sorted(layers)}
    with tables.written_together() as put:
        put(tables.PROBE_PROMPTS, predictions, smk.output.predictions, meta)
        put(tables.PROBES, summary, smk.output.summary, meta)
    log.info("probes on layers %s, trained on %s", sorted(layers), train)


run(snakemake, main)  # noqa: F821
