"""Synthetic input tables of the light (login-node) steps at the 8B study's sizes (config/llama31_8b.yaml).

Every table has the schema its real writer gives it: the same columns, dtypes, kinds and config
hashes (bugscope.tables), built with the producers' own code where that code needs no model
(`head_set_table`, `summary_table`, `accuracy_by_format`, `summarise_attribution`, `parity_rows`).
The values are random; the sizes are the study's:

- 256 bug pairs and 128 control pairs (config/llama31_8b.yaml) x 2 orders, in 3 formats: 2,304 prompts, 768 target prompts;
- 32 layers; the sweep's 35 head sets (all, even, odd, 32 single heads) at every layer plus 40
  random subsets per layer (75 a layer), and the config's 1,207 subsets at the focus layer;
- per-feature tables from 32,768-latent SAEs: 64 active latents at each of 12 cached (aligned)
  positions of every prompt, spread over all 32,768 ids (so every latent is tested somewhere);
- 2,000 bootstrap resamples (the config's).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import torch

from bugscope import layout, tables
from bugscope.config import analysed_layers, layer_groups
from bugscope.data.baseline import accuracy_by_format, format_contrast
from bugscope.data.lens import lens_rows, lens_summary
from bugscope.data.prompts import PROMPT_SCHEMA
from bugscope.features.attribution import COMPONENTS, parity_rows, summarise_attribution
from bugscope.features.named import named_feature_ids
from bugscope.io import vectors_to_arrow
from bugscope.model.capture import DecisionLens
from bugscope.model.sites import hook_name
from bugscope.patching import original_decomposition, original_method
from bugscope.patching.head_sets import (
    HeadSet,
    exhaustive_head_sets,
    head_set_table,
    named_head_sets,
    subset_head_sets,
)
from bugscope.patching.study import PROMPT_COLUMNS, exhaustive_summary, listed_pairs, residual_map_summary
from bugscope.patching.summary import summary_table
from bugscope.sae.encode import FEATURE_SCHEMA
from bugscope.sae.quality import QUALITY_SCHEMA

D_SAE = 32_768
L0 = 64  # active latents per position (Llama Scope's L0 is 50-150)
N_TOKENS = 40
N_ALIGNED = 12  # cached positions per prompt (cache.positions: aligned)
PROBE_LAYERS = (0, 1)  # the prompt activations written for the probes
NUMBERS_POS = N_TOKENS - 5  # the last token of the second number: an aligned position
EXTRA_SUBSETS = 40  # random subsets per layer beyond the sweep's 35 head sets
EXHAUSTIVE_SETS = 500  # of the exhaustive head sets (the 8B config has 24,570): the ledger reads one row per set


def _meta(spec: tables.Table, config: dict, **extra) -> dict:
    return {"config_hash": spec.config_hash(config), "seed": config["seed"], "model": config["model"]["name"], **extra}


def prompt_table(config: dict) -> pl.DataFrame:
    p = config["prompts"]
    kinds = ["shorter_bigger"] * (p["n_pairs"] + len(p["extra_pairs"]))
    for kind, n in p["control_pairs"].items():
        kinds += [kind] * n
    formats = list(p["formats"])
    rows = []
    for pair, kind in enumerate(kinds):
        for o, order in enumerate(("correct_first", "wrong_first")):
            for fmt in formats:
                aligned = [0, *range(N_TOKENS - N_ALIGNED + 1, N_TOKENS)]
                rows.append({"question_id": 2 * pair + o, "pair_id": pair, "pair_kind": kind, "order": order,
                             "format": fmt, "first_token": "<|begin_of_text|>",
                             "text": f"{fmt}: which is bigger, {pair}.{o + 1} or {pair}.{o + 11}?",
                             "correct": f"{pair}.{o + 1}", "wrong": f"{pair}.{o + 11}",
                             "input_ids": list(range(1000, 1000 + N_TOKENS)), "n_tokens": N_TOKENS,
                             "decision_pos": N_TOKENS - 1, "correct_token": 17, "wrong_token": 18,
                             "aligned_positions": aligned, "prompt_last_pos": N_TOKENS - 3,
                             "family": "decimal", "wording": "analysis", "numbers_pos": NUMBERS_POS})
    for i, row in enumerate(rows):
        row["prompt_id"] = i
    return pl.from_arrow(pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA))


def reading_table(config: dict, analysis: pl.DataFrame) -> pl.DataFrame:
    """The reading families' prompts (bugscope.data.reading's sizes: families x pairs x 2 orders x 2
    wordings x 2 formats), ids continuing the analysis table's."""
    p, r = config["prompts"], config["reading"]
    rows, pair = [], int(analysis["pair_id"].max()) + 1
    aligned = [0, *range(N_TOKENS - N_ALIGNED + 1, N_TOKENS)]
    for family in r["families"]:
        for _ in range(r["n_pairs"]):
            for wording in ("train", "test"):
                for o, order in enumerate(("correct_first", "wrong_first")):
                    for fmt in (p["buggy_format"], p["correct_format"]):
                        rows.append({"question_id": 0, "pair_id": pair, "pair_kind": "shorter_bigger", "order": order,
                                     "format": fmt, "family": family, "wording": wording,
                                     "first_token": "<|begin_of_text|>", "text": f"{family} {pair}",
                                     "correct": f"{pair}.{o + 11}", "wrong": f"{pair}.{o + 1}",
                                     "input_ids": list(range(1000, 1000 + N_TOKENS)), "n_tokens": N_TOKENS,
                                     "decision_pos": N_TOKENS - 1, "correct_token": 17, "wrong_token": 18,
                                     "aligned_positions": aligned, "prompt_last_pos": N_TOKENS - 3,
                                     "numbers_pos": NUMBERS_POS})
            pair += 1
    first = int(analysis["prompt_id"].max()) + 1
    for i, row in enumerate(rows):
        row["prompt_id"], row["question_id"] = first + i, first + i // 2
    return pl.from_arrow(pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA))


def reading_scores(config: dict, analysis: pl.DataFrame, reading: pl.DataFrame, rng) -> pl.DataFrame:
    """bugscope.data.reading's scores: unsteered for every family prompt and the buggy-format analysis
    prompts, and under the reading and every random direction for the test wording and those prompts."""
    buggy = analysis.filter(pl.col("format") == config["prompts"]["buggy_format"])["prompt_id"]
    steered = pl.concat([reading.filter(pl.col("wording") == "test")["prompt_id"], buggy])
    parts = [pl.DataFrame({"prompt_id": pl.concat([reading["prompt_id"], buggy]), "condition": "none", "draw": 0})]
    parts.append(pl.DataFrame({"prompt_id": steered, "condition": "reading", "draw": 0}))
    for draw in range(config["reading"]["steer"]["random_directions"]):
        parts.append(pl.DataFrame({"prompt_id": steered, "condition": "random", "draw": draw}))
    out = pl.concat(parts).with_columns(pl.col("prompt_id").cast(pl.Int32), pl.col("draw").cast(pl.Int32))
    return out.with_columns(logit_diff=pl.Series(rng.normal(0.2, 2.0, size=out.height)))


def feature_table(prompts: pl.DataFrame, layer: int, rng: np.random.Generator) -> pa.Table:
    """One layer's sparse codes: L0 distinct latents per (prompt, aligned position), float32 values."""
    pos = prompts.select("prompt_id", "aligned_positions").explode("aligned_positions")
    pid, position = pos["prompt_id"].to_numpy(), pos["aligned_positions"].to_numpy()
    n = len(pid)
    # start + i * odd stride (mod 2^15) gives L0 distinct ids per position, spread over every latent.
    start = rng.integers(0, D_SAE, size=n)[:, None]
    stride = (2 * rng.integers(0, D_SAE // 2, size=n) + 1)[:, None]
    fid = ((start + np.arange(L0)[None, :] * stride) % D_SAE).astype(np.int32)
    act = rng.exponential(1.0, size=(n, L0)).astype(np.float32)
    return pa.Table.from_arrays([pa.array(np.repeat(pid, L0).astype(np.int32)),
                                 pa.array(np.repeat(position, L0).astype(np.int32)),
                                 pa.array(fid.ravel()), pa.array(act.ravel())], schema=FEATURE_SCHEMA)


def scores_table(prompts: pl.DataFrame, rng: np.random.Generator) -> pl.DataFrame:
    diff = rng.normal(0.3, 2.0, size=prompts.height)
    return prompts.select("prompt_id", "question_id", "pair_id", "pair_kind", "order", "format").with_columns(
        logit_diff=pl.Series(diff), is_correct=pl.Series(diff > 0))


def patch_rows(prompts: pl.DataFrame, scores: pl.DataFrame, layer_sets: dict[int, list[HeadSet]], config: dict, *,
               method: str, positions: str, rng: np.random.Generator) -> pl.DataFrame:
    """A per-prompt patching table (bugscope.patching.study.run_study_sweep's schema) with random logit differences."""
    pc, pr = config["patching"], config["prompts"]
    target, source = pr["buggy_format"], pr["correct_format"]
    sets = head_set_table(layer_sets)
    tgt = (prompts.filter(pl.col("format") == target).select("prompt_id", "question_id", "pair_id", "pair_kind", "order")
           .join(scores.select("prompt_id", pl.col("logit_diff").alias("baseline_logit_diff")), on="prompt_id")
           .join(prompts.filter(pl.col("format") == source).select("question_id", pl.col("prompt_id")
                                                                   .alias("source_prompt_id")), on="question_id")
           .join(scores.select(pl.col("prompt_id").alias("source_prompt_id"),
                               pl.col("logit_diff").alias("source_logit_diff")), on="source_prompt_id"))
    out = sets.join(tgt, how="cross").with_columns(
        pl.lit(method).alias("method"), pl.lit(positions).alias("positions"), pl.lit(pc["operation"]).alias("operation"),
        pl.lit(pc["direction"]).alias("direction"), pl.lit(target).alias("target_format"),
        pl.lit(source).alias("source_format"), pl.lit(N_ALIGNED, pl.Int32).alias("n_patched_positions"))
    out = out.with_columns(logit_diff=pl.col("baseline_logit_diff") + pl.Series(rng.normal(0, 1.0, size=out.height)))
    return out.with_columns((pl.col("logit_diff") > 0).alias("is_correct"),
                            (pl.col("baseline_logit_diff") > 0).alias("baseline_correct")).select(PROMPT_COLUMNS).sort(
        "method", "positions", "layer", "head_set", "prompt_id")


def attribution_tables(prompts: pl.DataFrame, discriminative: pl.DataFrame, config: dict,
                       rng: np.random.Generator) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(attribution, parity) of every analysed layer: the real summarise/parity code on random direct attributions."""
    from bugscope.features.attribution import attribution_features

    pr, fcfg = config["prompts"], config["features"]
    n_heads = config["model"]["num_heads"]
    sel = prompts.filter(pl.col("format").is_in([pr["buggy_format"], pr["correct_format"]]))
    formats = sel["format"].to_numpy()
    n = sel.height
    named = named_feature_ids(config["sae"]["sets"][0]["named"])
    per_layer, parity = [], []
    for layer in analysed_layers(config):
        n_top = fcfg["attribution"]["n_features"]
        feats, sources = attribution_features(discriminative, named, layer, n_top)
        # Random codes rarely give significant features: take the study's count (n_features per direction).
        filler = [i for i in range(1, 4 * n_top) if i not in feats][:max(0, 2 * n_top + 15 - len(feats))]
        feats, sources = [*feats, *filler], [*sources, *["discriminative_synthetic"] * len(filler)]
        f = len(feats)

        def t(*shape):
            return torch.from_numpy(rng.normal(size=shape).astype(np.float32))
        res = {"heads": t(n_heads, n, f), **{c: t(n, f) for c in COMPONENTS}, "pre": t(n, f), "act": t(n, f),
               **{f"{m}_{w}": t(n_heads, n, f) for m in ("zero", "mean") for w in ("pre", "act")}}
        table = summarise_attribution(res, layer=layer, feature_ids=feats, sources=sources, formats=formats)
        per_layer.append(table)
        parity.append(parity_rows(table, layer=layer, buggy_format=pr["buggy_format"],
                                  correct_format=pr["correct_format"],
                                  n_permutations=fcfg["attribution"]["n_permutations"], seed=config["seed"]))
    return pl.concat(per_layer), pl.concat(parity)


def build_inputs(config: dict, root: Path) -> None:
    """Write, under `root`, the tables the light steps read (the layout's paths; results/ inside `root`)."""
    rng = np.random.default_rng(0)
    put = lambda spec, data, path, **extra: _write(root, spec, data, path, _meta(spec, config, **extra))  # noqa: E731
    layers = analysed_layers(config)
    focus = list(config["focus_layers"])
    n_heads = config["model"]["num_heads"]
    boot = config["bootstrap"]

    prompts = prompt_table(config)
    put(tables.PROMPTS, prompts, layout.PROMPTS)
    scores = scores_table(prompts, rng)
    put(tables.BASELINE_SCORES, scores, layout.BASELINE_SCORES)
    put(tables.BASELINE_ACCURACY, accuracy_by_format(scores, n_resamples=boot["n_resamples"],
                                                     confidence=boot["confidence"], seed=config["seed"]),
        layout.BASELINE_ACCURACY)
    pr = config["prompts"]
    put(tables.BASELINE_CONTRAST, format_contrast(scores, buggy_format=pr["buggy_format"],
                                                  correct_format=pr["correct_format"], n_resamples=boot["n_resamples"],
                                                  confidence=boot["confidence"], seed=config["seed"]),
        layout.BASELINE_CONTRAST)
    n_layers = config["model"]["num_layers"]
    n = prompts.height
    lens = DecisionLens(prompts["prompt_id"].to_numpy(), rng.normal(size=n), rng.normal(size=(n, n_layers)),
                        rng.normal(size=n), rng.normal(size=(n, n_layers)), rng.normal(size=(n, n_layers)))
    put(tables.LENS, lens_summary(lens_rows(lens, prompts), buggy_format=pr["buggy_format"],
                                  correct_format=pr["correct_format"], n_resamples=boot["n_resamples"],
                                  confidence=boot["confidence"], seed=config["seed"]), layout.LENS)
    # the prompt activations the probes read, at 2 layers (the probe job holds one layer at a time)
    d_model = config["resources"]["d_model"] or 4096
    for layer in PROBE_LAYERS:
        pos = prompts.select("prompt_id", "aligned_positions").explode("aligned_positions")
        x = torch.from_numpy(rng.normal(size=(pos.height, d_model)).astype(np.float32))
        table = pa.Table.from_arrays([pa.array(pos["prompt_id"].to_numpy().astype(np.int32)),
                                      pa.array(pos["aligned_positions"].to_numpy().astype(np.int32)),
                                      vectors_to_arrow(x, "bfloat16")], names=["prompt_id", "position", "activation"])
        hook = hook_name(layer)
        put(tables.PROMPT_ACTIVATIONS, table, layout.activations("prompts", hook), dataset="prompts", layer=layer,
            site="resid_post", hook_name=hook, dtype="bfloat16", d_model=d_model, positions="aligned")
    # the reading families: their prompts, scores and activations at the numbers and the decision
    reading = reading_table(config, prompts)
    put(tables.READING_PROMPTS, reading, layout.READING_PROMPTS)
    put(tables.READING_SCORES, reading_scores(config, prompts, reading, rng), layout.READING_SCORES)
    # the reading features: top_n per analysed layer, their summed activation per family prompt
    top_n = config["reading"]["features"]["top_n"]
    put(tables.READING_FEATURES, pl.DataFrame(
        {"layer": np.repeat(layers, top_n), "role": "reading_features", "draw": 0,
         "feature_id": rng.integers(0, D_SAE, size=len(layers) * top_n), "score": rng.random(len(layers) * top_n)}),
        layout.READING_FEATURES)
    put(tables.READING_FEATURE_PROMPTS, pl.DataFrame(
        {"layer": np.repeat(layers, reading.height), "prompt_id": np.tile(reading["prompt_id"].to_numpy(), len(layers)),
         "activation": rng.exponential(1.0, size=len(layers) * reading.height)}), layout.READING_FEATURE_PROMPTS)
    for layer in PROBE_LAYERS:
        ids = np.repeat(reading["prompt_id"].to_numpy(), 2).astype(np.int32)
        positions = np.tile([NUMBERS_POS, N_TOKENS - 1], reading.height).astype(np.int32)
        x = torch.from_numpy(rng.normal(size=(len(ids), d_model)).astype(np.float32))
        table = pa.Table.from_arrays([pa.array(ids), pa.array(positions), vectors_to_arrow(x, "bfloat16")],
                                     names=["prompt_id", "position", "activation"])
        hook = hook_name(layer)
        put(tables.READING_ACTIVATIONS, table, layout.activations("reading", hook), dataset="reading", layer=layer,
            site="resid_post", hook_name=hook, dtype="bfloat16", d_model=d_model, positions="numbers, decision")

    sae_set = config["sae"]["sets"][0]  # the primary set's tables: every light step reads one set's
    for layer in layers:
        hook = hook_name(layer, sae_set["site"])
        put(tables.FEATURES, feature_table(prompts, layer, rng), layout.per_set(layout.FEATURES, sae_set["name"], hook=hook),
            sae_set=sae_set["name"], layer=layer,
            hook_name=hook, d_sae=D_SAE, positions="aligned")
        quality = {f.name: None for f in QUALITY_SCHEMA}
        quality.update(layer=layer, hook_name=hook, source="pretrained", d_sae=D_SAE, n_prompts=prompts.height,
                       **{c: float(rng.random()) for c in ("ev_prompts", "mse_prompts", "l0_prompts", "ev_corpus",
                                                           "mse_corpus", "l0_corpus", "dead_fraction",
                                                           "logit_diff_clean", "logit_diff_sae", "delta_logit_diff",
                                                           "accuracy_clean", "accuracy_sae")},
                       n_tokens_prompts=prompts.height * N_ALIGNED, n_tokens_corpus=20_000)
        put(tables.SAE_QUALITY_LAYER, pa.Table.from_pylist([quality], schema=QUALITY_SCHEMA),
            layout.per_set(layout.SAE_QUALITY_LAYER, sae_set["name"], hook=hook), sae_set=sae_set["name"], layer=layer, hook_name=hook)

    sweep_sets = {}
    for layer in layers:
        extra = subset_head_sets(n_heads, pools=["even", "odd"], sizes=[2, 4], samples=EXTRA_SUBSETS // 4,
                                 seed=config["seed"], layer=layer)
        # The focus layer's subsets come from the subsets rule (the same names): no extra ones there.
        sweep_sets[layer] = named_head_sets(n_heads) + ([] if layer in focus else extra)
    for group, group_layers in layer_groups(layers, config["resources"]["layers_per_job"]).items():
        rows = patch_rows(prompts, scores, {layer: sweep_sets[layer] for layer in group_layers}, config,
                          method="per_head", positions=config["patching"]["positions"], rng=rng)
        put(tables.PATCHING_SWEEP_GROUP, rows, layout.PATCHING_SWEEP_GROUP.format(group=group), mode="sweep",
            layers=group_layers)
    sub = config["patching"]["subsets"]
    subsets = {layer: subset_head_sets(n_heads, pools=sub["pools"], sizes=sub["sizes"], samples=sub["samples"],
                                       seed=config["seed"], layer=layer) for layer in focus}
    put(tables.PATCHING_SUBSETS_PROMPTS, patch_rows(prompts, scores, subsets, config, method="per_head",
                                                    positions=config["patching"]["positions"], rng=rng),
        layout.PATCHING_SUBSETS_PROMPTS, mode="subsets", focus_layers=focus, focus_layer_source="config",
        subset_seed=config["seed"])

    original_sets = {layer: [s for s in named_head_sets(n_heads) if s.family != "single"] for layer in focus}
    original = pl.concat([patch_rows(prompts, scores, original_sets, config, method=m, positions=p, rng=rng)
                          for m, p in (("per_head", config["patching"]["positions"]), ("original", "original"))])
    put(tables.PATCHING_ORIGINAL_METHOD_PROMPTS, original, layout.PATCHING_ORIGINAL_METHOD_PROMPTS,
        mode="original_method", focus_layers=focus)
    put(tables.PATCHING_ORIGINAL_METHOD, summary_table(original, n_resamples=boot["n_resamples"],
                                                       confidence=boot["confidence"], seed=config["seed"]),
        layout.PATCHING_ORIGINAL_METHOD, mode="original_method", focus_layers=focus)
    if config["patching"]["original_generation"]["enabled"]:
        per_prompt = decomposition_rows(prompts, config, focus, original_sets[focus[0]], rng)
        put(tables.PATCHING_ORIGINAL_DECOMPOSITION_PROMPTS, per_prompt, layout.PATCHING_ORIGINAL_DECOMPOSITION_PROMPTS,
            focus_layers=focus)
        put(tables.PATCHING_ORIGINAL_DECOMPOSITION,
            original_decomposition.summarise(per_prompt, n_resamples=boot["n_resamples"], confidence=boot["confidence"],
                                      seed=config["seed"]),
            layout.PATCHING_ORIGINAL_DECOMPOSITION, focus_layers=focus)
    experiment_tables(config, prompts, scores, put, rng)


def experiment_tables(config: dict, prompts: pl.DataFrame, scores: pl.DataFrame, put, rng) -> None:
    """The focus-layer experiments' tables (bugscope.patching.study) at 8B sizes: every fraction and
    direction of the config, and EXHAUSTIVE_SETS of its exhaustive head sets."""
    focus, n_heads, pc = list(config["focus_layers"]), config["model"]["num_heads"], config["patching"]
    boot = {"n_resamples": config["bootstrap"]["n_resamples"], "confidence": config["bootstrap"]["confidence"],
            "seed": config["seed"]}
    named = {layer: [s for s in named_head_sets(n_heads) if s.family != "single"] for layer in focus}
    fractions = pl.DataFrame({"fraction": [float(a) for a in pc["replacement"]["fractions"]]})
    rep = pl.concat([patch_rows(prompts, scores, named, config, method=m, positions=p, rng=rng)
                     for m, p in (("per_head", pc["positions"]), ("original", "original"))]).join(fractions, how="cross")
    rep = rep.with_columns(logit_diff=pl.col("logit_diff") * pl.col("fraction"))
    put(tables.PATCHING_REPLACEMENT, summary_table(rep, extra_keys=["fraction"], **boot), layout.PATCHING_REPLACEMENT,
        mode="replacement", focus_layers=focus)
    ex = pc["exhaustive"]
    sets = {layer: exhaustive_head_sets(n_heads, pools=ex["pools"], budget=ex["budget"], samples=ex["samples"],
                                        seed=config["seed"], layer=layer, sizes=ex["sizes"])[:EXHAUSTIVE_SETS]
            for layer in focus}
    put(tables.PATCHING_EXHAUSTIVE, exhaustive_summary(
        patch_rows(prompts, scores, sets, config, method="per_head", positions=pc["positions"], rng=rng),
        n_heads, config), layout.PATCHING_EXHAUSTIVE, mode="exhaustive", focus_layers=focus)
    rows = patch_rows(prompts, scores, {layer: named[focus[0]][:1] for layer in analysed_layers(config)}, config,
                      method="per_head", positions=pc["positions"], rng=rng)
    rmap = pl.concat([rows.with_columns(rank=pl.lit(r, pl.Int32)) for r in range(N_ALIGNED)])
    put(tables.PATCHING_RESIDUAL_MAP, residual_map_summary(rmap, pc["direction"], config), layout.PATCHING_RESIDUAL_MAP,
        mode="residual_map")
    both = pl.concat([patch_rows(prompts, scores, {layer: named_head_sets(n_heads) for layer in focus}, config,
                                 method="per_head", positions=pc["positions"], rng=rng).with_columns(
        direction=pl.lit(d)) for d in ("fix", "break")])
    put(tables.PATCHING_BIDIRECTIONAL, summary_table(both, **boot), layout.PATCHING_BIDIRECTIONAL,
        mode="bidirectional", focus_layers=focus)
    put(tables.PATCHING_LISTED_PAIRS, listed_pairs(both, prompts, config["prompts"]["extra_pairs"]),
        layout.PATCHING_LISTED_PAIRS, mode="bidirectional", focus_layers=focus)
    feature_stage_tables(config, prompts, scores, put, rng)


def feature_stage_tables(config: dict, prompts: pl.DataFrame, scores: pl.DataFrame, put, rng) -> None:
    """The interventions summary (bugscope.interventions.summarise, on every target prompt for each
    of 9 conditions) and the feature-token table (bugscope.features.pages: every named feature, role,
    format and pair split) at 8B row counts, with random values."""
    from bugscope.interventions import sae_features as iv

    focus, n_heads, pc = list(config["focus_layers"]), config["model"]["num_heads"], config["patching"]
    sae_set = config["sae"]["sets"][0]
    one = {focus[0]: [s for s in named_head_sets(n_heads) if s.name == "all"]}
    base = patch_rows(prompts, scores, one, config, method="per_head", positions=pc["positions"], rng=rng).select(
        "prompt_id", "pair_id", "pair_kind", "order", "baseline_logit_diff", "source_logit_diff")
    conds = pl.DataFrame({
        "feature_set": ["none", *["top"] * 8], "family": ["none", *["tested", "random_control"] * 4],
        "intervention": ["none", "ablate", "ablate", "clamp", "clamp", "steer", "steer", "steer", "steer"],
        "scale": [None, None, None, None, None, 4.0, 4.0, 8.0, 8.0]})
    per_prompt = base.join(conds, how="cross").with_columns(
        sae_set=pl.lit(sae_set["name"]), layer=pl.lit(focus[0], pl.Int32),
        sample=pl.when(pl.col("family") == "random_control").then(0).otherwise(-1),
        n_features=pl.when(pl.col("family") == "none").then(0).otherwise(5))
    per_prompt = per_prompt.with_columns(
        logit_diff=pl.col("baseline_logit_diff") + pl.Series(rng.normal(0, 1.0, size=per_prompt.height)))
    boot = config["bootstrap"]
    put(tables.INTERVENTIONS, iv.summarise(per_prompt, n_resamples=boot["n_resamples"], confidence=boot["confidence"],
                                           seed=config["seed"]), layout.INTERVENTIONS, focus_layers=focus)
    # head_set_features: every even-head set of patching.exhaustive (all 65,535 at 16 even heads) x pair subset
    from bugscope.interventions.head_set_features import SUMMARY_SCHEMA
    from bugscope.patching.head_sets import exhaustive_head_sets

    ex = pc["exhaustive"]
    sets = exhaustive_head_sets(n_heads, pools=["even"], budget=ex["budget"], samples=ex["samples"],
                                seed=config["seed"], layer=focus[0], sizes=ex["sizes"])
    n = 2 * len(sets)
    rand = {c: rng.random(n) * 5 for c in ("mean_active", "active_low", "active_high", "unpatched_active",
                                            "source_active", "mean_activation", "activation_low", "activation_high",
                                            "unpatched_activation", "source_activation")}
    put(tables.HEAD_SET_FEATURES, pl.DataFrame({
        "sae_set": [sae_set["name"]] * n, "layer": [focus[0]] * n, "feature_set": ["top"] * n, "n_features": [5] * n,
        "head_set": [s.name for s in sets] * 2, "pool": ["even"] * n, "k": [len(s.heads) for s in sets] * 2,
        "pairs": ["all"] * len(sets) + ["heldout"] * len(sets), **rand,
        "n_prompts": [64] * n, "n_pairs": [32] * n}, schema=SUMMARY_SCHEMA), layout.HEAD_SET_FEATURES, focus_layers=focus)
    rows = [{"layer": int(layer), "feature_id": int(fid), "selection": f"named/{cat}", "rank": rank, "pairs": pairs,
             "format": fmt, "level": "role", "role": role, "token": None, "n_tokens": 128, "n_prompts": 64,
             "n_pairs": 32, **{c: float(rng.random()) for c in (
                 "mean_activation", "mean_activation_low", "mean_activation_high", "firing_rate", "firing_rate_low",
                 "firing_rate_high", "activation_share")}}
            for layer, cats in sae_set["named"].items() for cat, ids in cats.items() for rank, fid in enumerate(ids)
            for pairs in ("all", "heldout") for fmt in ("qa", "simple", "chat")
            for role in ("number", "decimal_point", "comparison", "format", "answer", "other")]
    put(tables.FEATURE_TOKENS, pl.DataFrame(rows, schema_overrides={"token": pl.String}),
        layout.per_set(layout.FEATURE_TOKENS, sae_set["name"]), sae_set=sae_set["name"])

def decomposition_rows(prompts: pl.DataFrame, config: dict, focus: list[int], head_sets: list[HeadSet],
                       rng: np.random.Generator) -> pl.DataFrame:
    """Per-prompt rows of every decomposition setting (bugscope.patching.original_method) with random verdicts."""
    p = config["prompts"]
    pairs = original_method.decomposition_pairs(prompts, p["buggy_format"], p["correct_format"],
                                                config["patching"]["original_generation"]["n_pairs"])
    heads = {hs.name: list(hs.heads) for hs in head_sets}
    rows = []
    for s in original_method.settings(config["patching"]["positions"]):
        for layer in focus:
            for hs in head_sets:
                for pair in pairs:
                    if s.pairs == "seed" and not original_method.is_seed_prompt(pair.target):
                        continue
                    judged = rng.random(3) < 0.5
                    rows.append({**original_decomposition._row(s, layer, hs.name, heads, pair),
                                 "generated": "x" if s.generates else None,
                                 "logit_diff": None if s.generates else float(rng.normal()),
                                 "judged": bool(judged[0]), "baseline_judged": bool(judged[1]),
                                 "source_judged": bool(judged[2])})
    return pl.DataFrame(rows, schema=original_decomposition.PER_PROMPT_SCHEMA)


def build_attribution(config: dict, root: Path) -> None:
    """The head-attribution and parity tables, from the discriminative table a step wrote under `root`."""
    name = config["sae"]["sets"][0]["name"]
    discriminative = tables.frame(tables.DISCRIMINATIVE_FEATURES, config,
                                  root / layout.per_set(layout.DISCRIMINATIVE_FEATURES, name))
    prompts = tables.frame(tables.PROMPTS, config, root / layout.PROMPTS)
    attribution, parity = attribution_tables(prompts, discriminative, config, np.random.default_rng(1))
    _write(root, tables.HEAD_FEATURE_ATTRIBUTION, attribution, layout.per_set(layout.HEAD_FEATURE_ATTRIBUTION, name),
           _meta(tables.HEAD_FEATURE_ATTRIBUTION, config, position="decision"))
    _write(root, tables.HEAD_PARITY, parity, layout.per_set(layout.HEAD_PARITY, name), _meta(tables.HEAD_PARITY, config))


def _write(root: Path, spec: tables.Table, data, path: str, meta: dict) -> None:
    out = root / path
    out.parent.mkdir(parents=True, exist_ok=True)
    tables.write(spec, data, out, meta)
