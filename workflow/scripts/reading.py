import numpy as np
import polars as pl
import torch

from bugscope import tables
from bugscope.config import steer_layers
from bugscope.data.reading import NONE, RANDOM, READING, TRAIN, random_directions, reading_directions
from bugscope.model.cache import write_activations
from bugscope.model.load import ModelManifest, load_model
from bugscope.model.sites import parse_hook_name
from bugscope.model.steering import reading_pass
from bugscope.run.script import log, run


def main(smk):
    cfg = smk.config
    manifest = ModelManifest.load(smk.input.manifest)
    analysis = tables.frame(tables.PROMPTS, cfg, smk.input.prompts)
    reading = tables.frame(tables.READING_PROMPTS, cfg, smk.input.reading_prompts).sort("prompt_id")
    model, tokenizer = load_model(manifest, cfg["device"])
    batch = dict(batch_size=cfg["cache"]["batch_size"], pad_token_id=tokenizer.pad_token_id)
    layers = {parse_hook_name(h)[0]: h for h in smk.params.hooks}
    steered = steer_layers(cfg)

    def family_rows(frame):  # the closeness probe reads the numbers and the decision
        return [{**r, "positions": sorted({r["numbers_pos"], r["decision_pos"]})} for r in frame.to_dicts()]

    # 1. the training wording, unsteered: the reading direction of each steered layer (decision position)
    train = reading.filter(pl.col("wording") == TRAIN)
    first = reading_pass(model, family_rows(train), capture_layers=sorted({*layers, *steered}), conditions=[], **batch)
    decision = dict(zip(train["prompt_id"].to_list(), train["decision_pos"].to_list()))
    at_decision = np.array([decision[int(i)] == p for i, p in zip(first.captured_ids, first.captured_positions)])
    family = dict(zip(train["prompt_id"].to_list(), train["family"].to_list()))
    families = np.array([family[int(i)] for i in first.captured_ids[at_decision]])
    directions = {layer: reading_directions(first.vectors[layer][at_decision].double().numpy(), families)
                  for layer in steered}
    controls = random_directions(model.config.hidden_size, steered, cfg["reading"]["steer"]["random_directions"],
                                 cfg["seed"])
    conditions = [directions, *controls]

    # 2. the other wording and the analysis prompts of the buggy format, under every condition
    rest = reading.filter(pl.col("wording") != TRAIN)
    buggy = analysis.filter(pl.col("format") == cfg["prompts"]["buggy_format"])
    second = reading_pass(model, family_rows(rest) + [{**r, "positions": []} for r in buggy.to_dicts()],
                          capture_layers=sorted(layers), conditions=conditions, **batch)

    meta = {"dataset": "reading", "config_hash": smk.params.config_hash, "positions": "numbers, decision",
            **manifest.provenance()}
    for layer, hook in layers.items():
        write_activations(smk.output.activations[smk.params.hooks.index(hook)],
                          np.concatenate([first.captured_ids, second.captured_ids]),
                          np.concatenate([first.captured_positions, second.captured_positions]),
                          torch.cat([first.vectors[layer], second.vectors[layer]]),
                          hook=hook, dtype=cfg["cache"]["dtype"], meta=meta)
    names = [(NONE, 0), (READING, 0), *((RANDOM, k) for k in range(len(controls)))]
    parts = [pl.DataFrame({"prompt_id": first.prompt_ids, "condition": NONE, "draw": 0,
                           "logit_diff": first.logit_diff[:, 0]})]
    parts += [pl.DataFrame({"prompt_id": second.prompt_ids, "condition": name, "draw": draw,
                            "logit_diff": second.logit_diff[:, j]}) for j, (name, draw) in enumerate(names)]
    scores = (pl.concat(parts).with_columns(pl.col("prompt_id").cast(pl.Int32), pl.col("draw").cast(pl.Int32))
              .sort("condition", "draw", "prompt_id"))
    tables.write(tables.READING_SCORES, scores, smk.output.scores,
                 {"config_hash": smk.params.config_hash, "seed": cfg["seed"], "steer_layers": steered,
                  **manifest.provenance()})
    log.info("reading: %d family prompts, %d analysis prompts steered under %d conditions at layers %s",
             reading.height, buggy.height, len(conditions), steered)


run(snakemake, main)  # noqa: F821
