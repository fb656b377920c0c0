"""The unpatched model's answers: decision logit differences, accuracy per format, greedy check."""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from bugscope.data.prompts import kind_order_splits
from bugscope.model.forward import decision_logits, iter_batches, logit_diff
from bugscope.model.generate import greedy_generate
from bugscope.stats import (
    cluster_bootstrap_mean_ci_columns,
    cluster_resample_weights,
    cluster_resampled_means,
    percentile_interval,
)

_NUMBER = re.compile(r"\d+\.\d+")


def score_prompts(model, rows: Sequence[dict], *, batch_size: int, pad_token_id: int) -> pl.DataFrame:
    """One row per prompt: prompt_id, logit_diff (correct minus wrong), is_correct."""
    device = next(model.parameters()).device
    ids, diffs = [], []
    for batch in tqdm(list(iter_batches(rows, batch_size, pad_token_id, device)), desc="scoring", unit="batch"):
        diffs.append(logit_diff(decision_logits(model, batch), batch))
        ids.append(batch.prompt_ids)
    return scores_frame(torch.cat(ids).numpy(), torch.cat(diffs).numpy())


def scores_frame(prompt_ids: np.ndarray, logit_diffs: np.ndarray) -> pl.DataFrame:
    """The scores table of `score_prompts` from prompt ids and float32 logit differences (also
    `bugscope.model.capture.decision_lens`'s, which scores in the same forward as the lens)."""
    return pl.DataFrame({"prompt_id": prompt_ids.astype("int32"), "logit_diff": logit_diffs.astype("float64"),
                         "is_correct": logit_diffs > 0})


def accuracy_by_format(scores: pl.DataFrame, *, n_resamples: int, confidence: float, seed: int) -> pl.DataFrame:
    """Accuracy and mean logit difference per (format, pair_kind, order), each also pooled ("all"),
    with bootstrap CIs over number pairs (`pair_id`: both orders of a pair are drawn together; they
    are not independent). The question orders matter: a model that names the number asked second
    is right on one order and wrong on the other."""
    out = []
    for fmt in sorted(scores["format"].unique().to_list()):
        in_format = scores.filter(pl.col("format") == fmt)
        for kind, order, mask in kind_order_splits(in_format["pair_kind"].to_list(), in_format["order"].to_list()):
            sub = in_format.filter(pl.Series(mask))
            values = np.stack([sub["is_correct"].cast(pl.Float64).to_numpy(), sub["logit_diff"].to_numpy()], axis=1)
            (acc, ld), (acc_lo, ld_lo), (acc_hi, ld_hi) = cluster_bootstrap_mean_ci_columns(
                values, sub["pair_id"].to_numpy(), n_resamples=n_resamples, confidence=confidence, seed=seed)
            out.append({"format": fmt, "pair_kind": kind, "order": order, "n_prompts": sub.height,
                        "n_pairs": sub["pair_id"].n_unique(), "accuracy": acc, "accuracy_low": acc_lo,
                        "accuracy_high": acc_hi, "mean_logit_diff": ld, "logit_diff_low": ld_lo,
                        "logit_diff_high": ld_hi, "confidence": confidence})
    return pl.DataFrame(out)


LENGTH_CONTROL = "shorter_bigger+longer_bigger"  # the gap on the bug's kind plus the gap on its mirror


def format_contrast(scores: pl.DataFrame, *, buggy_format: str, correct_format: str, n_resamples: int,
                    confidence: float, seed: int) -> pl.DataFrame:
    """The format effect per pair kind: accuracy_gap = accuracy(correct format) - accuracy(buggy
    format) over the questions asked in both, with a CI over number pairs (one draw for every row).

    The row `shorter_bigger+longer_bigger` adds the gaps of the two kinds. A model that only picks
    the shorter number in the buggy format (a length heuristic) is worse there on shorter_bigger
    and better by as much on longer_bigger, so this sum is ~0; a format effect that is not a length
    heuristic leaves it above 0.
    """
    wide = (scores.filter(pl.col("format").is_in([buggy_format, correct_format]))
            .pivot(on="format", index=["question_id", "pair_id", "pair_kind"], values="is_correct")
            .drop_nulls().sort("question_id"))
    gap = (wide[correct_format].cast(pl.Float64) - wide[buggy_format].cast(pl.Float64)).to_numpy()
    kinds = sorted(wide["pair_kind"].unique().to_list())
    kind = wide["pair_kind"].to_numpy()
    labels, cluster = np.unique(wide["pair_id"].to_numpy(), return_inverse=True)
    columns = np.stack([np.where(kind == k, gap, np.nan) for k in kinds], axis=1)
    weights = cluster_resample_weights(len(labels), n_resamples=n_resamples, seed=seed)
    resampled = cluster_resampled_means(columns, cluster, weights)  # [n_resamples, kinds]
    point = np.array([gap[kind == k].mean() for k in kinds])
    n_pairs = [int(wide.filter(pl.col("pair_kind") == k)["pair_id"].n_unique()) for k in kinds]
    if {"shorter_bigger", "longer_bigger"} <= set(kinds):
        i, j = kinds.index("shorter_bigger"), kinds.index("longer_bigger")
        resampled = np.column_stack([resampled, resampled[:, i] + resampled[:, j]])
        point = np.append(point, point[i] + point[j])
        kinds, n_pairs = [*kinds, LENGTH_CONTROL], [*n_pairs, n_pairs[i] + n_pairs[j]]
    low, high = percentile_interval(resampled, confidence)
    return pl.DataFrame({"pair_kind": kinds, "buggy_format": buggy_format, "correct_format": correct_format,
                         "n_pairs": n_pairs, "accuracy_gap": point, "accuracy_gap_low": low,
                         "accuracy_gap_high": high, "confidence": confidence})


def parse_answer(generated: str, correct: str, wrong: str) -> str:
    """'correct', 'wrong' or 'other': the first decimal number in the generated text."""
    m = _NUMBER.search(generated)
    if not m:
        return "other"
    return {correct: "correct", wrong: "wrong"}.get(m.group(0), "other")


@torch.inference_mode()
def greedy_check(model, tokenizer, rows: Sequence[dict], *, max_new_tokens: int, batch_size: int,
                 add_special_tokens: bool = True) -> pl.DataFrame:
    """Greedy continuation of each prompt text; one row per prompt with the parsed answer.

    `generate` derives position_ids from the left-padded attention mask itself. Texts rendered by
    a chat template carry their special tokens already: pass add_special_tokens=False for them.
    """
    device = next(model.parameters()).device
    out = []
    for start in tqdm(range(0, len(rows), batch_size), desc="greedy check", unit="batch"):
        chunk = rows[start:start + batch_size]
        enc = tokenizer([r["text"] for r in chunk], return_tensors="pt", padding=True,
                        add_special_tokens=add_special_tokens).to(device)
        gen = greedy_generate(model, enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for r, text in zip(chunk, texts):
            out.append({"prompt_id": r["prompt_id"], "generated": text,
                        "generated_answer": parse_answer(text, r["correct"], r["wrong"])})
    return pl.DataFrame(out, schema={"prompt_id": pl.Int32, "generated": pl.String, "generated_answer": pl.String})
