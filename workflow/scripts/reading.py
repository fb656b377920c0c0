import numpy as np
import polars as pl
import torch

from bugscope import tables
from bugscope.config import steer_layers
from bugscope.data.reading import (
    NONE,
    RANDOM,
    RANDOM_FEATURES,
    READING,
    READING_FEATURES,
    TRAIN,
    random_directions,
    reading_directions,
)
from bugscope.features.reading import select_reading_features
from bugscope.model.cache import write_activations
from bugscope.model.load import ModelManifest, load_model
from bugscope.model.sites import parse_hook_name
from bugscope.model.steering import Steer, reading_pass
from bugscope.run.script import log, run


def main(smk):
    cfg = smk.config
    rcfg = cfg["reading"]
    manifest = ModelManifest.load(smk.input.manifest)
    analysis = tables.frame(tables.PROMPTS, cfg, smk.input.prompts)
    reading = tables.frame(tables.READING_PROMPTS, cfg, smk.input.reading_prompts).sort("prompt_id")
    model, tokenizer = load_model(manifest, cfg["device"])
    batch = dict(batch_size=cfg["cache"]["batch_size"], pad_token_id=tokenizer.pad_token_id)
    layers = {parse_hook_name(h)[0]: h for h in smk.params.hooks}
    steered = steer_layers(cfg)
    saes = {}
    if smk.params.feature_layers:
        from bugscope.sae.store import load_sae

        device = next(model.parameters()).device
        saes = {layer: load_sae(path, device=str(device))[0] for layer, path in zip(smk.params.feature_layers,
                                                                                   smk.input.saes)}

    def family_rows(frame):  # the closeness probe reads the numbers and the decision
        return [{**r, "positions": sorted({r["numbers_pos"], r["decision_pos"]})} for r in frame.to_dicts()]

    # 1. the training wording, unsteered: the reading direction and features of each steered layer
    decision_of = dict(zip(reading["prompt_id"].to_list(), reading["decision_pos"].to_list()))
    family_of = dict(zip(reading["prompt_id"].to_list(), reading["family"].to_list()))

    def at_decision(captured):  # the captured rows at their prompt's decision position
        return np.array([decision_of[int(i)] == p for i, p in zip(captured.captured_ids, captured.captured_positions)])

    def feature_codes(sae, vectors):  # [n, d_sae] float32 on the host
        with torch.inference_mode():
            return sae.encode(vectors.to(sae.W_dec.device, sae.W_dec.dtype)).float().cpu()

    train = reading.filter(pl.col("wording") == TRAIN)
    first = reading_pass(model, family_rows(train), capture_layers=sorted({*layers, *steered}), conditions=[], **batch)
    first_decision = at_decision(first)
    families = np.array([family_of[int(i)] for i in first.captured_ids[first_decision]])
    directions = {layer: reading_directions(first.vectors[layer][first_decision].double().numpy(), families)
                  for layer in steered}
    controls = random_directions(model.config.hidden_size, steered, rcfg["steer"]["random_directions"], cfg["seed"])
    chosen, random_sets, feature_rows = {}, [{} for _ in range(rcfg["features"]["random_sets"])], []
    train_codes = {layer: feature_codes(sae, first.vectors[layer][first_decision]) for layer, sae in saes.items()}
    for layer in saes:
        ids, randoms, score = select_reading_features(train_codes[layer].numpy(), families, top_n=rcfg["features"]["top_n"],
                                                      random_sets=rcfg["features"]["random_sets"], seed=cfg["seed"],
                                                      layer=layer)
        chosen[layer] = ids
        feature_rows += [{"layer": layer, "role": READING_FEATURES, "draw": 0, "feature_id": i, "score": score[i]}
                         for i in ids]
        for draw, rand in enumerate(randoms):
            random_sets[draw][layer] = rand
            feature_rows += [{"layer": layer, "role": RANDOM_FEATURES, "draw": draw, "feature_id": i, "score": score[i]}
                             for i in rand]
    conditions = [Steer(directions=directions), *(Steer(directions=c) for c in controls)]
    names = [(READING, 0), *((RANDOM, k) for k in range(len(controls)))]
    if any(chosen.values()):
        conditions += [Steer(features=chosen), *(Steer(features=r) for r in random_sets)]
        names += [(READING_FEATURES, 0), *((RANDOM_FEATURES, k) for k in range(len(random_sets)))]

    # 2. the other wording and the analysis prompts of the buggy format, under every condition
    rest = reading.filter(pl.col("wording") != TRAIN)
    buggy = analysis.filter(pl.col("format") == cfg["prompts"]["buggy_format"])
    second = reading_pass(model, family_rows(rest) + [{**r, "positions": []} for r in buggy.to_dicts()],
                          capture_layers=sorted({*layers, *saes}), conditions=conditions, saes=saes, **batch)

    meta = {"dataset": "reading", "config_hash": smk.params.config_hash, "positions": "numbers, decision",
            **manifest.provenance()}
    for layer, hook in layers.items():
        write_activations(smk.output.activations[smk.params.hooks.index(hook)],
                          np.concatenate([first.captured_ids, second.captured_ids]),
                          np.concatenate([first.captured_positions, second.captured_positions]),
                          torch.cat([first.vectors[layer], second.vectors[layer]]),
                          hook=hook, dtype=cfg["cache"]["dtype"], meta=meta)
    # the reading features' summed activation at every family prompt's decision position (the training
    # wording's codes are the ones the features were chosen on)
    second_decision = at_decision(second)
    prompt_ids = np.concatenate([first.captured_ids[first_decision], second.captured_ids[second_decision]])
    prompt_rows = []
    for layer, sae in saes.items():
        codes = torch.cat([train_codes[layer], feature_codes(sae, second.vectors[layer][second_decision])])
        prompt_rows.append(pl.DataFrame({"layer": layer, "prompt_id": prompt_ids,
                                         "activation": codes[:, chosen[layer]].sum(1).double().numpy()}))
    feature_prompts = (pl.concat(prompt_rows) if prompt_rows else
                       pl.DataFrame(schema={"layer": pl.Int64, "prompt_id": pl.Int32, "activation": pl.Float64}))
    features = (pl.DataFrame(feature_rows) if feature_rows else
                pl.DataFrame(schema={"layer": pl.Int64, "role": pl.String, "draw": pl.Int64, "feature_id": pl.Int64,
                                     "score": pl.Float64}))

    parts = [pl.DataFrame({"prompt_id": first.prompt_ids, "condition": NONE, "draw": 0,
                           "logit_diff": first.logit_diff[:, 0]})]
    parts += [pl.DataFrame({"prompt_id": second.prompt_ids, "condition": name, "draw": draw,
                            "logit_diff": second.logit_diff[:, j]}) for j, (name, draw) in enumerate([(NONE, 0), *names])]
    scores = (pl.concat(parts).with_columns(pl.col("prompt_id").cast(pl.Int32), pl.col("draw").cast(pl.Int32))
              .sort("condition", "draw", "prompt_id"))
    out = {"config_hash": smk.params.config_hash, "seed": cfg["seed"], "steer_layers": steered,
           "feature_layers": sorted(saes), **manifest.provenance()}
    with tables.written_together() as put:
        put(tables.READING_SCORES, scores, smk.output.scores, out)
        put(tables.READING_FEATURES, features, smk.output.features, out)
        put(tables.READING_FEATURE_PROMPTS, feature_prompts, smk.output.feature_prompts, out)
    log.info("reading: %d family prompts, %d analysis prompts steered under %d conditions at layers %s "
             "(reading features at %s)", reading.height, buggy.height, len(conditions), steered, sorted(saes))


run(snakemake, main)  # noqa: F821
