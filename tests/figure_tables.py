"""Made-up tables with the producers' schemas, built by the producers' own code from random values,
for the figure and claim tests; `via_parquet` writes one with its declaration and reads it back as
the figure scripts do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from bugscope import tables
from bugscope.data.prompts import PAIR_KINDS
from bugscope.features.chance import baseline_couples, baseline_overlap
from bugscope.features.named import NAMED_SCHEMA
from bugscope.features.overlap import pair_overlap, pooled_overlap, summarise_overlap
from bugscope.figures.style import Labels

LABELS = Labels("SmolLM2-135M-Instruct", "qa", "simple", 0.95)


def overlap_table(layers=(0, 3, 5, 8, 10, 13), n_pairs=12, k=5, num_layers=14, seed=0) -> pl.DataFrame:
    """A feature_overlap table made by bugscope.features from random sparse feature values: n_pairs
    questions (n_pairs // 2 number pairs of two orders), with the same-format baselines."""
    rng = np.random.default_rng(seed)
    q = np.arange(n_pairs, dtype=np.int32)
    pairs = pl.DataFrame({"question_id": q, "pair_id": q // 2, "prompt_id_buggy": q * 2, "prompt_id_correct": q * 2 + 1,
                          "order": np.where(q % 2 == 0, "correct_first", "wrong_first")})
    couples = baseline_couples(pairs, "qa", "simple", seed=seed)
    per_pair, pooled, base = [], [], []
    for layer in layers:
        rows = [(p, f, float(rng.exponential())) for p in range(2 * n_pairs)
                for f in rng.choice(3 * k, size=2 * k, replace=False)]
        values = pl.DataFrame(rows, schema={"prompt_id": pl.Int32, "feature_id": pl.Int32, "value": pl.Float64}, orient="row")
        per_pair.append(pair_overlap(values, pairs, k).with_columns(pl.lit(layer).alias("layer")))
        pooled.append({"layer": layer, **pooled_overlap(values, pairs, k)})
        base.append(baseline_overlap(values, couples, k).with_columns(pl.lit(layer).alias("layer")))
    return summarise_overlap(pl.concat(per_pair), pl.DataFrame(pooled), k=k, num_layers=num_layers,
                             middle_fraction=[0.25, 0.75], n_resamples=200, confidence=0.95, seed=seed,
                             baselines=pl.concat(base))


def accuracy_table() -> pl.DataFrame:
    from bugscope.data.baseline import accuracy_by_format

    rng = np.random.default_rng(1)
    scores = pl.DataFrame({"format": ["qa"] * 20 + ["simple"] * 20 + ["chat"] * 20,
                           "pair_id": np.tile(np.arange(20) // 2, 3), "logit_diff": rng.normal(size=60),
                           "pair_kind": np.tile(np.array(PAIR_KINDS)[np.arange(20) // 2 % 3], 3),
                           "order": np.tile(["correct_first", "wrong_first"], 30)}).with_columns(
        (pl.col("logit_diff") > 0).alias("is_correct"))
    return accuracy_by_format(scores, n_resamples=200, confidence=0.95, seed=0)


def _heldout_columns() -> tuple[str, ...]:
    from bugscope.features.discriminative import HELDOUT_COLUMNS

    return tuple(HELDOUT_COLUMNS)


def discriminative_table(layer=8) -> pl.DataFrame:
    from bugscope.features.discriminative import DISCRIMINATIVE_COLUMNS

    rng = np.random.default_rng(2)
    rows = []
    for direction, sign in (("up", 1), ("down", -1)):
        for rank in range(3):
            a, b = rng.uniform(0.5, 3, size=2)
            a, b = (max(a, b), min(a, b)) if sign > 0 else (min(a, b), max(a, b))
            rows.append({"layer": layer, "comparison": "buggy_vs_correct", "direction": direction, "rank": rank,
                         "feature_id": 100 * rank + (1 if sign > 0 else 2), "effect_size": sign * 1.2, "mean_diff": a - b,
                         "mean_a": a, "mean_b": b, "firing_rate_a": 0.8, "firing_rate_b": 0.4, "p_value": 0.001,
                         "q_value": 0.01, "significant": True, "n_a": 12, "n_b": 12, "n_tested": 50,
                         "n_pairs": 6, "ratio": a / b, "ratio_low": 0.8 * a / b, "ratio_high": 1.2 * a / b,
                         **{c: None for c in _heldout_columns()}})
    held = {c: pl.Int64 if c == "n_heldout_pairs" else pl.Float64 for c in _heldout_columns()}
    return pl.DataFrame(rows, schema_overrides=held).with_columns(
        pl.col("layer", "rank", "feature_id").cast(pl.Int32)).select(DISCRIMINATIVE_COLUMNS)


def named_table(layer=8) -> pl.DataFrame:
    return pl.DataFrame({"layer": [layer], "category": ["format"], "feature_id": [777], "mean_buggy": [2.0],
                         "mean_correct": [1.25], "ratio": [1.6], "ratio_low": [1.3], "ratio_high": [1.9],
                         "firing_rate_buggy": [0.9], "firing_rate_correct": [0.6], "n_pairs": [12],
                         "mean_buggy_low": [1.8], "mean_buggy_high": [2.2], "mean_correct_low": [1.1],
                         "mean_correct_high": [1.4], "firing_rate_buggy_low": [0.6], "firing_rate_buggy_high": [1.0],
                         "firing_rate_correct_low": [0.3], "firing_rate_correct_high": [0.8]}, schema=NAMED_SCHEMA)


def attribution_table(layer=8, n_heads=9, feature_ids=(5, 17, 99)) -> pl.DataFrame:
    from bugscope.features.attribution import ATTRIBUTION_COLUMNS

    rng = np.random.default_rng(3)
    rows = []
    for fmt in ("qa", "simple"):
        for f in feature_ids:
            for comp, head in [*(("head", h) for h in range(n_heads)), ("resid_pre", None)]:
                rows.append({"layer": layer, "feature_id": f, "feature_source": "buggy_up", "format": fmt, "component": comp,
                             "head": head, "n_prompts": 12, "direct_attribution": float(rng.normal()),
                             "zero_ablation_delta_pre": 0.0, "zero_ablation_delta_act": 0.0,
                             "mean_ablation_delta_pre": 0.0, "mean_ablation_delta_act": 0.0,
                             "pre_activation": 1.0, "activation": 1.0})
    return pl.DataFrame(rows).with_columns(pl.col("layer", "feature_id", "head").cast(pl.Int32),
                                           pl.col("n_prompts").cast(pl.Int32)).select(ATTRIBUTION_COLUMNS)


def patching_summary(layers=(0, 5, 10), focus=(5,), n_heads=9, n_pairs=12, seed=4, method="per_head",
                     positions="decision", ceiling=True) -> pl.DataFrame:
    """A patching summary made by bugscope.patching from random per-prompt logit differences: the named
    head sets (and the ceiling) at every layer, random even/odd subsets of sizes 1 and 2 and the
    random-head control's all-head sets at the focus layers; number pairs of the three kinds, both orders."""
    from bugscope.patching import head_sets as patching
    from bugscope.patching import summary as patch_summary

    rng = np.random.default_rng(seed)
    sets = {layer: patching.named_head_sets(n_heads) + ([patching.CEILING] if ceiling else []) for layer in layers}
    for layer in focus:
        sets[layer] = sets[layer] + patching.subset_head_sets(n_heads, pools=["even", "odd"], sizes=[1, 2], samples=3,
                                                              seed=0, layer=layer) + patching.random_control_sets(
            n_heads, samples=3, seed=0, layer=layer)
    n_prompts = 2 * n_pairs
    rows = [{"layer": layer, "head_set": s.name, "prompt_id": p,
             "logit_diff": float(rng.normal() + 0.2 * s.k + 2.0 * (s.family == "ceiling"))}
            for layer, ss in sets.items() for s in ss for p in range(n_prompts)]
    pair_id = np.arange(n_prompts, dtype=np.int32) // 2
    per_prompt = (pl.DataFrame(rows).with_columns(pl.col("layer", "prompt_id").cast(pl.Int32))
                  .join(pl.DataFrame({"prompt_id": np.arange(n_prompts, dtype=np.int32), "pair_id": pair_id,
                                      "pair_kind": np.array(PAIR_KINDS)[pair_id % 3],
                                      "order": np.where(np.arange(n_prompts) % 2 == 0, "correct_first", "wrong_first"),
                                      "baseline_logit_diff": rng.normal(size=n_prompts),
                                      "source_logit_diff": rng.normal(1.0, 1.0, size=n_prompts)}), on="prompt_id")
                  .join(patching.head_set_table(sets), on=["layer", "head_set"])
                  .with_columns(pl.lit(method).alias("method"), pl.lit(positions).alias("positions"),
                                pl.lit("patch").alias("operation"), pl.lit("fix").alias("direction"),
                                pl.lit("qa").alias("target_format"), pl.lit("simple").alias("source_format")))
    return patch_summary.summary_table(per_prompt, n_resamples=200, confidence=0.95, seed=0, n_heads=n_heads)


def original_method_table(layer=5) -> pl.DataFrame:
    return pl.concat([patching_summary(layers=(layer,), focus=(), method=m, positions=p, seed=i, ceiling=False)
                      for i, (m, p) in enumerate([("original", "original"), ("per_head", "decision"), ("per_head", "aligned")])])


def sae_quality_table(layers=(0, 10, 29)) -> pl.DataFrame:
    """A table with bugscope.sae's QUALITY_SCHEMA."""
    from bugscope.sae.quality import QUALITY_SCHEMA

    n = len(layers)
    rows = [{"layer": layer, "hook_name": f"blocks.{layer}.hook_resid_post", "source": "train", "d_sae": 576,
             "ev_prompts": 0.9 - 0.01 * layer, "mse_prompts": 0.1, "l0_prompts": 16.0, "n_tokens_prompts": 300,
             "ev_corpus": 0.95 - 0.01 * layer, "mse_corpus": 0.1, "l0_corpus": 15.5, "n_tokens_corpus": 500,
             "dead_fraction": 0.1 * (i + 1) / n, "train_l0": 16.0, "train_dead_fraction": 0.05, "n_prompts": 8,
             "logit_diff_clean": 1.0, "logit_diff_sae": 0.8, "delta_logit_diff": -0.2, "accuracy_clean": 0.5,
             "accuracy_sae": 0.5} for i, layer in enumerate(layers)]
    return pl.from_arrow(pa.Table.from_pylist(rows, schema=QUALITY_SCHEMA))


def via_parquet(table: tables.Table, data: pl.DataFrame, path: Path, config: dict) -> pl.DataFrame:
    """`data` written with the table's declaration and read back as the figure scripts read it."""
    tables.write(table, data, path, {"config_hash": table.config_hash(config)})
    return tables.frame(table, config, path)
