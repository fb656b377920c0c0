"""The logit lens tables (bugscope.data.lens) on made-up per-prompt rows, and the lens of the real
embedded model against its own scores."""

import numpy as np
import polars as pl
import pytest

from bugscope.data.lens import FORMAT_GAP, lens_rows, lens_summary
from bugscope.data.prompts import ALL
from bugscope.model.capture import DecisionLens

BOOT = dict(n_resamples=400, confidence=0.95, seed=0)


def _made_up(n_pairs=20, n_layers=3, right_from=1):
    """Two formats of each question (2 orders x n_pairs, one kind): the correct format reads right
    from layer `right_from` on, the buggy one never; attributions are fixed numbers."""
    prompts, ids = [], 0
    for pair in range(n_pairs):
        for order in ("correct_first", "wrong_first"):
            for fmt in ("qa", "simple"):
                prompts.append({"prompt_id": ids, "question_id": 2 * pair + (order == "wrong_first"), "pair_id": pair,
                                "pair_kind": "shorter_bigger", "order": order, "format": fmt})
                ids += 1
    prompts = pl.DataFrame(prompts)
    layer = np.arange(n_layers)
    fmt = np.array([p == "simple" for p in prompts["format"]])
    lens = np.where(fmt[:, None] & (layer[None] >= right_from), 1.0, -1.0) + 0.01 * prompts["pair_id"].to_numpy()[:, None]
    attn = np.full((len(prompts), n_layers), 0.5)
    mlp = np.where(fmt[:, None], 0.25, -0.25) * np.ones(n_layers)
    return prompts, DecisionLens(prompts["prompt_id"].to_numpy(), lens[:, -1], lens, np.zeros(len(prompts)), attn, mlp)


def test_the_summary_reads_where_each_format_turns_and_the_paired_gap():
    prompts, lens = _made_up()
    per_prompt = lens_rows(lens, prompts)
    assert per_prompt.height == prompts.height * 3
    summary = lens_summary(per_prompt, buggy_format="qa", correct_format="simple", **BOOT)
    pooled = summary.filter(pl.col("pair_kind") == ALL, pl.col("order") == ALL).sort("format", "layer")
    simple = pooled.filter(pl.col("format") == "simple")
    assert simple["lens_accuracy"].to_list() == [0.0, 1.0, 1.0]
    assert pooled.filter(pl.col("format") == "qa")["lens_accuracy"].to_list() == [0.0, 0.0, 0.0]
    gap = pooled.filter(pl.col("format") == FORMAT_GAP)
    assert gap["lens_logit_diff"].to_list() == pytest.approx([0.0, 2.0, 2.0])
    assert gap["mlp_attribution"].to_list() == pytest.approx([0.5] * 3)
    assert (gap["n_pairs"] == 20).all() and (gap["n_prompts"] == 40).all()
    # the pair offset makes the lens vary over pairs: a real interval around the mean
    one = simple.filter(pl.col("layer") == 1).row(0, named=True)
    assert one["lens_logit_diff_low"] < one["lens_logit_diff"] < one["lens_logit_diff_high"]
    assert set(summary["order"].unique()) == {ALL, "correct_first", "wrong_first"}


def test_the_lens_scores_in_the_same_forward_as_score_prompts_bit_for_bit(embedded, prompts):
    """The baseline's scores come from the lens' forward: the same batches, the same model call."""
    from bugscope.data.baseline import score_prompts, scores_frame
    from bugscope.model.capture import decision_lens

    model, tokenizer = embedded
    rows = prompts.head(40).to_dicts()  # every format: batches of several lengths
    lens = decision_lens(model, rows, batch_size=16, pad_token_id=tokenizer.pad_token_id)
    mine = scores_frame(lens.prompt_ids, lens.logit_diff).sort("prompt_id")
    theirs = score_prompts(model, rows, batch_size=16, pad_token_id=tokenizer.pad_token_id).sort("prompt_id")
    assert mine.equals(theirs)
    assert lens.lens.shape == (40, model.config.num_hidden_layers)


def test_the_ci_runs_lens_ends_at_the_models_own_scores(ci_workflow, ci_config, embedded, prompts):
    """On the real run: a lens row for every prompt and layer, its last layer is the baseline's logit
    difference (the model's own forward) to float32 rounding, and the attributions add up to it."""
    from bugscope import layout, tables
    from bugscope.model.forward import decision_logits, make_batch
    from tests.numerics import forward_tolerance, max_abs

    model, tokenizer = embedded
    per_prompt = tables.frame(tables.LENS_PROMPTS, ci_config, ci_workflow / layout.LENS_PROMPTS)
    scores = tables.frame(tables.BASELINE_SCORES, ci_config, ci_workflow / layout.BASELINE_SCORES)
    n_layers = model.config.num_hidden_layers
    assert per_prompt.height == scores.height * n_layers
    last = per_prompt.filter(pl.col("layer") == n_layers - 1).join(scores.select("prompt_id", "logit_diff"),
                                                                   on="prompt_id")
    # the rounding of a logit difference is that of the logits it subtracts
    tol = forward_tolerance(model, scale=max_abs(decision_logits(model, make_batch(
        prompts.head(32).to_dicts(), tokenizer.pad_token_id, "cpu"))))
    assert (last["lens_logit_diff"] - last["logit_diff"]).abs().max() <= tol
    total = per_prompt.group_by("prompt_id").agg(
        pl.col("attn_attribution").sum() + pl.col("mlp_attribution").sum() + pl.col("embedding_attribution").first())
    both = total.join(last.select("prompt_id", "lens_logit_diff"), on="prompt_id")
    assert (both["attn_attribution"] - both["lens_logit_diff"]).abs().max() <= tol
    summary = tables.frame(tables.LENS, ci_config, ci_workflow / layout.LENS)
    assert set(summary["format"]) == {*ci_config["prompts"]["formats"], FORMAT_GAP}
    assert set(summary["layer"]) == set(range(n_layers))


def test_the_lens_figure_draws_each_format_and_block_once_per_layer(tmp_path):
    from bugscope.figures.behaviour import lens as lens_chart
    from tests.figure_tables import LABELS
    from tests.helpers import EXPECTED, check_saved, encoded_fields, titles

    prompts, lens = _made_up()
    summary = lens_summary(lens_rows(lens, prompts), buggy_format="qa", correct_format="simple", **BOOT)
    spec = check_saved(tmp_path, "lens", lens_chart(summary, LABELS))
    assert EXPECTED["lens"] <= encoded_fields(spec)
    assert LABELS.model in titles(spec) and "number pairs: 20" in titles(spec)
    data = [r for d in spec["datasets"].values() for r in d]
    lines = [(r["format_role"], r["layer"]) for r in data if "format_role" in r]
    assert sorted(lines) == sorted({(f, layer) for f in ("qa (buggy)", "simple (correct)") for layer in range(3)})
    bars = [(r["block"], r["layer"]) for r in data if "block" in r]
    assert sorted(bars) == sorted({(b, layer) for b in ("attn", "mlp") for layer in range(3)})
