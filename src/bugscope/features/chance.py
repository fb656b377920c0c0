"""Chance baselines of the top-k overlap: what overlap two prompts of the *same* format reach.

A cross-format overlap of 80 % means nothing alone: two different questions in one format share
most of their top-k features too, because their prompts share most of their tokens. Two
same-format comparisons, made at every layer from the prompt pairs of the overlap stage:

- `same_format_different_question`: each question is compared with the question of the same
  order of another number pair, in the same format. The partner pair is fixed by one seeded
  permutation of the pair ids (`derived_seed(seed, 3)`): pair perm[i] is compared with pair
  perm[i + 1], cyclically, so every pair is compared once as the first prompt and once as the
  second, and never with itself.
- `same_format_swapped_order`: the two question orders of one number pair (correct_first = a,
  wrong_first = b), in one format.

Each comparison row belongs to one number pair (`pair_id`: the first prompt's), which is the
cluster the bootstrap of `summarise_overlap` resamples; a different-question row also depends on
its partner pair, which the resampling does not follow (a slight understatement of that
baseline's interval). The statistics are those of the cross-format comparison, with a / b in
place of buggy / correct: the amplifications of a baseline are its value under the null of no
format effect (the geometric mean is about 1 there, the seed's mean of ratios is not).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from bugscope.features.overlap import COMPARISONS, compare_top_sets
from bugscope.features.values import top_k

ORDERS = ("correct_first", "wrong_first")


def baseline_couples(pairs: pl.DataFrame, buggy_format: str, correct_format: str, seed: int) -> pl.DataFrame:
    """The prompt couples of the two baselines: couple, comparison, format, pair_id, prompt_id_a, prompt_id_b.

    `pairs` holds the prompt pairs of the overlap stage (question_id, pair_id, order,
    prompt_id_buggy, prompt_id_correct); a comparison whose partner prompt does not exist (a pair
    with one order only, a single pair) has no row.
    """
    if "order" not in pairs.columns:
        raise ValueError("The overlap baselines need the prompt table's `order` column (correct_first / wrong_first) "
                         "in the prompt pairs: load it with the prompts (bugscope.features.stages.load_prompt_frame).")
    long = pl.concat([
        pairs.select("pair_id", "order", pl.lit(fmt).alias("format"), pl.col(col).alias("prompt_id"))
        for fmt, col in ((buggy_format, "prompt_id_buggy"), (correct_format, "prompt_id_correct"))])
    ids = np.array(sorted(pairs["pair_id"].unique().to_list()))
    parts = []
    if len(ids) >= 2:
        perm = ids[np.random.default_rng(seed).permutation(len(ids))]
        partner = pl.DataFrame({"pair_id": perm, "partner_id": np.roll(perm, -1)},
                               schema={"pair_id": pairs["pair_id"].dtype, "partner_id": pairs["pair_id"].dtype})
        a = long.join(partner, on="pair_id")
        parts.append(a.join(long, left_on=["partner_id", "order", "format"], right_on=["pair_id", "order", "format"],
                            suffix="_b")
                     .select(pl.lit(COMPARISONS[0]).alias("comparison"), "format", "pair_id", "order",
                             pl.col("prompt_id").alias("prompt_id_a"), pl.col("prompt_id_b")))
    first = long.filter(pl.col("order") == ORDERS[0])
    second = long.filter(pl.col("order") == ORDERS[1])
    parts.append(first.join(second, on=["pair_id", "format"], suffix="_b")
                 .select(pl.lit(COMPARISONS[1]).alias("comparison"), "format", "pair_id", "order",
                         pl.col("prompt_id").alias("prompt_id_a"), pl.col("prompt_id_b")))
    couples = pl.concat(parts).sort("comparison", "format", "pair_id", "order")
    return couples.with_row_index("couple").with_columns(pl.col("couple").cast(pl.Int64))


def baseline_overlap(values: pl.DataFrame, couples: pl.DataFrame, k: int) -> pl.DataFrame:
    """One layer's baseline statistics, one row per couple (the columns of `compare_top_sets`)."""
    stats = compare_top_sets(top_k(values, k), couples.select("couple", "prompt_id_a", "prompt_id_b"), "couple", k)
    return couples.select("couple", "comparison", "format", "pair_id").join(stats, on="couple", how="left")
