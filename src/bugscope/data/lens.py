"""The logit lens and the direct logit attribution of the unpatched model (research notes section 11):
where, layer by layer, each format's decision turns right or wrong.

Per prompt and layer (`lens_rows`): the logit lens (the final norm and the unembedding applied to
the residual stream after the layer, at the decision position: the correct-minus-wrong logit
difference the model would give if it stopped there) and the direct attribution of the layer's
attention and MLP writes to the final logit difference (bugscope.model.capture.decision_lens).
Summarised (`lens_summary`) per format, pair kind, order and layer with CIs over number pairs, and
the paired format gap (the correct format minus the buggy one, per question).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from bugscope.data.prompts import kind_order_splits
from bugscope.stats import cluster_bootstrap_mean_ci_columns

# The format value of the gap rows: the correct format minus the buggy format, per question.
FORMAT_GAP = "gap"
# (summary column, per-prompt column): the lens' accuracy is the share of prompts it reads right.
QUANTITIES = {"lens_logit_diff": "lens_logit_diff", "lens_accuracy": "lens_is_correct",
              "attn_attribution": "attn_attribution", "mlp_attribution": "mlp_attribution"}
PROMPT_KEYS = ("prompt_id", "question_id", "pair_id", "pair_kind", "order", "format")


def lens_rows(lens, prompts: pl.DataFrame) -> pl.DataFrame:
    """One row per (prompt, layer) of a `DecisionLens`, with the prompt's identifiers."""
    n, n_layers = lens.lens.shape
    frame = pl.DataFrame({
        "prompt_id": np.repeat(lens.prompt_ids, n_layers).astype("int32"),
        "layer": np.tile(np.arange(n_layers), n).astype("int32"),
        "lens_logit_diff": lens.lens.reshape(-1),
        "attn_attribution": lens.attn_attribution.reshape(-1),
        "mlp_attribution": lens.mlp_attribution.reshape(-1),
        "embedding_attribution": np.repeat(lens.embedding_attribution, n_layers),
    }).with_columns(lens_is_correct=pl.col("lens_logit_diff") > 0)
    meta = prompts.select(pl.col("prompt_id").cast(pl.Int32), *PROMPT_KEYS[1:])
    return meta.join(frame, on="prompt_id").sort("prompt_id", "layer")


def _summarise(per_prompt: pl.DataFrame, fmt: str, *, n_resamples: int, confidence: float, seed: int) -> list[dict]:
    """Rows per (pair kind, order, layer) of one format's (or the gap's) per-prompt lens rows: every
    prompt has every layer, so sorted by (prompt, layer) each column is a [prompts, layers] matrix."""
    ordered = per_prompt.sort("prompt_id", "layer")
    layers = sorted(ordered["layer"].unique().to_list())
    prompts = ordered.filter(pl.col("layer") == layers[0])  # one row per prompt, in the matrices' order
    matrix = np.concatenate([ordered[c].cast(pl.Float64).to_numpy().reshape(-1, len(layers))
                             for c in QUANTITIES.values()], axis=1)
    out = []
    for kind, order, mask in kind_order_splits(prompts["pair_kind"].to_list(), prompts["order"].to_list()):
        pairs = prompts["pair_id"].to_numpy()[mask]
        point, low, high = cluster_bootstrap_mean_ci_columns(matrix[mask], pairs, n_resamples=n_resamples,
                                                             confidence=confidence, seed=seed)
        for i, layer in enumerate(layers):
            row = {"format": fmt, "pair_kind": kind, "order": order, "layer": layer, "n_prompts": int(mask.sum()),
                   "n_pairs": len(np.unique(pairs))}
            for j, name in enumerate(QUANTITIES):
                k = j * len(layers) + i
                row |= {name: point[k], f"{name}_low": low[k], f"{name}_high": high[k]}
            out.append(row | {"confidence": confidence})
    return out


def lens_summary(per_prompt: pl.DataFrame, *, buggy_format: str, correct_format: str, n_resamples: int,
                 confidence: float, seed: int) -> pl.DataFrame:
    """Mean lens logit difference, lens accuracy and attributions per (format, pair kind, order,
    layer), each kind and order also pooled ("all"), with CIs over number pairs (every row of a
    drawn pair comes along). The `gap` rows: the correct format minus the buggy one, paired per
    question (prompts asked in both formats only)."""
    boot = dict(n_resamples=n_resamples, confidence=confidence, seed=seed)
    rows = []
    for fmt in sorted(per_prompt["format"].unique().to_list()):
        rows += _summarise(per_prompt.filter(pl.col("format") == fmt), fmt, **boot)
    keys = ["question_id", "pair_id", "pair_kind", "order", "layer"]
    values = [*QUANTITIES.values()]
    correct = per_prompt.filter(pl.col("format") == correct_format).select(*keys, "prompt_id", *values)
    buggy = per_prompt.filter(pl.col("format") == buggy_format).select(*keys, *values)
    paired = correct.join(buggy, on=keys, suffix="_buggy").with_columns(
        [(pl.col(c).cast(pl.Float64) - pl.col(f"{c}_buggy").cast(pl.Float64)).alias(c) for c in values])
    rows += _summarise(paired.select(*keys, "prompt_id", *values), FORMAT_GAP, **boot)
    return pl.DataFrame(rows)
