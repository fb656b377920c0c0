"""Per-prompt SAE feature values: prompt pairs, position weights, values, top-k sets, dense matrices.

Inputs are the sparse feature tables of the SAE stage (`results/sae/features/{hook}.parquet`: one row
per (prompt_id, position, feature_id) with a non-zero activation) and the prompt table. A *prompt
pair* is the buggy-format row and the correct-format row of one `question_id`; every statistic
"over pairs" resamples these pairs.

Value of a feature in a prompt (`features.position`): its activation at the decision position
("decision"), at the prompt's last token before the answer prefix ("prompt_last": the ":" of
"A:", the original study's position), or its mean over the aligned positions ("aligned_mean": the
sum over the aligned positions divided by their number, absent = 0).

Top-k set of a prompt: its k features of largest value, among features with value > 0 (ties
broken by the smaller feature id); it holds fewer than k features when fewer are active.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from bugscope.data.prompts import SINK_POSITION

POSITION_MODES = ("decision", "aligned_mean", "prompt_last")


def prompt_pairs(prompts: pl.DataFrame, buggy_format: str, correct_format: str) -> pl.DataFrame:
    """One row per question that has both formats: question_id, pair_id, (order,) prompt_id_buggy,
    prompt_id_correct."""
    order = ["order"] if "order" in prompts.columns else []
    sel = prompts.select("prompt_id", "question_id", "pair_id", *order, "format")
    buggy = sel.filter(pl.col("format") == buggy_format).select(
        "question_id", "pair_id", *order, pl.col("prompt_id").alias("prompt_id_buggy"))
    correct = sel.filter(pl.col("format") == correct_format).select(
        "question_id", pl.col("prompt_id").alias("prompt_id_correct"))
    pairs = buggy.join(correct, on="question_id", how="inner").sort("question_id")
    if pairs.height == 0:
        raise ValueError(
            f"The prompt table has no question in both formats {buggy_format!r} and {correct_format!r}: "
            "check prompts.buggy_format, prompts.correct_format and prompts.formats."
        )
    return pairs


def position_weights(prompts: pl.DataFrame, mode: str) -> pl.DataFrame:
    """prompt_id, position, weight: the positions whose weighted sum is a prompt's feature value."""
    if mode in ("decision", "prompt_last"):
        column = "decision_pos" if mode == "decision" else "prompt_last_pos"
        return prompts.select("prompt_id", pl.col(column).alias("position"), pl.lit(1.0).alias("weight"))
    if mode == "aligned_mean":
        # Position 0 is an attention sink whose SAE code is junk (research notes 3). An aligned
        # index is dropped for every format of a question when it is position 0 in any of them,
        # so the formats still average over the same tokens.
        long = (prompts.select("prompt_id", "question_id", pl.col("aligned_positions").alias("position"))
                .with_columns(pl.int_ranges(pl.col("position").list.len()).alias("index"))
                .explode("position", "index"))
        sink = long.filter(pl.col("position") == SINK_POSITION).select("question_id", "index").unique()
        kept = long.join(sink, on=["question_id", "index"], how="anti")
        return (kept.with_columns((1.0 / pl.len().over("prompt_id")).alias("weight"))
                .select("prompt_id", "position", "weight").sort("prompt_id", "position"))
    raise ValueError(f"features.position is {mode!r}; expected one of {', '.join(POSITION_MODES)}")


def prompt_values(features: pl.DataFrame, weights: pl.DataFrame) -> pl.DataFrame:
    """prompt_id, feature_id, value (> 0 only): the per-prompt feature value of `position_weights`.

    Raises when a required position is missing from the feature table for every prompt, which
    means the cache holds fewer positions than the mode needs.
    """
    weights = weights.with_columns(pl.col("prompt_id").cast(pl.Int32), pl.col("position").cast(pl.Int32))
    cached = features.select("prompt_id", "position").unique()
    needed = weights.select("prompt_id", "position")
    if cached.height and needed.join(cached, on=["prompt_id", "position"], how="semi").height == 0:
        raise ValueError(
            "None of the positions this analysis needs are in the feature table. With "
            "features.position: aligned_mean the cache must hold the aligned positions "
            "(cache.positions: aligned or all)."
        )
    # sorted and order-keeping, so every float sum is taken in the same order on every run
    return (features.join(weights, on=["prompt_id", "position"], how="inner")
            .sort("prompt_id", "feature_id", "position")
            .group_by("prompt_id", "feature_id", maintain_order=True)
            .agg((pl.col("activation").cast(pl.Float64) * pl.col("weight")).sum().alias("value"))
            .filter(pl.col("value") > 0))


def top_k(values: pl.DataFrame, k: int, by: str = "prompt_id") -> pl.DataFrame:
    """The k largest positive values per `by` group (ties: smaller feature id first)."""
    return (values.filter(pl.col("value") > 0)
            .sort([by, "value", "feature_id"], descending=[False, True, False])
            .with_columns(pl.int_range(pl.len()).over(by).alias("rank"))
            .filter(pl.col("rank") < k))


def dense_matrix(values: pl.DataFrame, prompt_ids: np.ndarray, feature_ids: np.ndarray) -> np.ndarray:
    """[len(prompt_ids), len(feature_ids)] values (absent = 0), filled by one vectorised scatter."""
    out = np.zeros((len(prompt_ids), len(feature_ids)), dtype=np.float64)
    if values.height == 0 or len(feature_ids) == 0:
        return out
    row_of = pl.DataFrame({"prompt_id": prompt_ids.astype(np.int32), "row": np.arange(len(prompt_ids))})
    col_of = pl.DataFrame({"feature_id": feature_ids.astype(np.int32), "col": np.arange(len(feature_ids))})
    hit = (values.with_columns(pl.col("prompt_id").cast(pl.Int32), pl.col("feature_id").cast(pl.Int32))
           .join(row_of, on="prompt_id").join(col_of, on="feature_id"))
    out[hit["row"].to_numpy(), hit["col"].to_numpy()] = hit["value"].to_numpy()
    return out
