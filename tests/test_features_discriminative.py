"""Discriminative and named features: a planted feature is found, a noise feature's held-out ratio
shrinks to one, the Benjamini-Hochberg q-values and the named ratios."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from bugscope.features.discriminative import bh_qvalues, discriminative_features
from bugscope.features.named import named_features
from bugscope.features.values import position_weights, prompt_pairs, prompt_values
from tests.helpers import pair_prompts, sparse_features

BOOT = {"n_resamples": 400, "confidence": 0.95, "seed": 0}


def test_discriminative_finds_planted_feature():
    rng = np.random.default_rng(3)
    n_q = 30
    prompts = pair_prompts(n_q)
    pairs = prompt_pairs(prompts, "qa", "simple")
    rows = []
    for q in range(n_q):
        for j in range(2):
            pid = 2 * q + j
            rows.append((pid, 5, 100, 3.0 + (2.0 if j == 0 else 0.0) + rng.normal(0, 0.3)))  # up in buggy
            rows.append((pid, 5, 200, 3.0 + (1.5 if j == 1 else 0.0) + rng.normal(0, 0.3)))  # down in buggy
            rows += [(pid, 5, f, float(rng.exponential())) for f in range(10) if rng.random() < 0.5]
    values = prompt_values(sparse_features(rows), position_weights(prompts, "decision"))
    # wrong and right answers in both question orders (the wrong-vs-right test is stratified by order)
    scores = pl.DataFrame({"prompt_id": np.arange(2 * n_q, dtype=np.int32), "is_correct": np.arange(2 * n_q) % 8 < 4})
    cfg = {"test": "wilcoxon", "min_firing_rate": 0.05, "fdr_alpha": 0.05, "top_n": 3, "min_group_size": 5}
    out = discriminative_features(values, pairs, scores, layer=7, cfg=cfg, boot=BOOT)
    bvc = out.filter(pl.col("comparison") == "buggy_vs_correct")
    up = bvc.filter(pl.col("direction") == "up", pl.col("rank") == 0).row(0, named=True)
    down = bvc.filter(pl.col("direction") == "down", pl.col("rank") == 0).row(0, named=True)
    assert up["feature_id"] == 100 and up["significant"] and up["q_value"] < 0.01 and up["effect_size"] > 2
    assert down["feature_id"] == 200 and down["significant"]
    assert bvc.filter(~pl.col("feature_id").is_in([100, 200]))["significant"].sum() == 0
    assert set(out["comparison"].unique()) == {"buggy_vs_correct", "buggy_vs_correct_heldout", "wrong_vs_right"}
    n_wrong = int((np.arange(0, 2 * n_q, 2) % 8 >= 4).sum())  # buggy-format prompts answered wrong
    assert out.filter(pl.col("comparison") == "wrong_vs_right")["n_a"].unique().to_list() == [n_wrong]
    # Held out: ranked on the even pair ids, measured on the odd ones. The planted feature stays on
    # top and keeps its ratio on pairs that did not rank it.
    held = out.filter(pl.col("comparison") == "buggy_vs_correct_heldout", pl.col("direction") == "up",
                      pl.col("rank") == 0).row(0, named=True)
    assert held["feature_id"] == 100 and held["n_a"] == len(range(0, n_q // 2, 2)) * 2
    assert held["heldout_mean_a"] / held["heldout_mean_b"] == pytest.approx(5 / 3, abs=0.25)
    assert held["heldout_firing_rate_a"] == held["heldout_firing_rate_b"] == 1.0  # about 5 and 3, never 0
    # intervals over the held-out number pairs: the ratio's excludes 1, the firing rates' are exact
    assert held["heldout_ratio"] == pytest.approx(held["heldout_mean_a"] / held["heldout_mean_b"])
    assert 1 < held["heldout_ratio_low"] <= held["heldout_ratio"] <= held["heldout_ratio_high"]
    assert held["heldout_firing_rate_a_low"] > 0.6 and held["heldout_firing_rate_a_high"] == 1.0
    assert held["n_heldout_pairs"] == len({int(p) for p in pairs["pair_id"].to_list() if p % 2})
    assert up["ratio_low"] > 1 and down["ratio_high"] < 1 and up["n_pairs"] == pairs["pair_id"].n_unique()


def test_heldout_ratio_of_a_noise_feature_shrinks_to_one():
    # No feature differs between formats: the top-ranked one has a ratio above 1 on the pairs that
    # ranked it, by selection alone, and about 1 on the held-out pairs.
    rng = np.random.default_rng(5)
    n_q = 80
    prompts = pair_prompts(n_q)
    pairs = prompt_pairs(prompts, "qa", "simple")
    rows = [(2 * q + j, 5, f, float(rng.exponential())) for q in range(n_q) for j in range(2) for f in range(300)]
    values = prompt_values(sparse_features(rows), position_weights(prompts, "decision"))
    scores = pl.DataFrame({"prompt_id": np.arange(2 * n_q, dtype=np.int32), "is_correct": np.arange(2 * n_q) % 4 < 2})
    cfg = {"test": "wilcoxon", "min_firing_rate": 0.05, "fdr_alpha": 0.05, "top_n": 1, "min_group_size": 5}
    top = discriminative_features(values, pairs, scores, layer=7, cfg=cfg, boot=BOOT).filter(
        pl.col("comparison") == "buggy_vs_correct_heldout", pl.col("direction") == "up").row(0, named=True)
    assert top["mean_a"] / top["mean_b"] > 1.25
    assert abs(top["heldout_mean_a"] / top["heldout_mean_b"] - 1) < abs(top["mean_a"] / top["mean_b"] - 1) / 2
    assert top["heldout_ratio_low"] < 1 < top["heldout_ratio_high"]  # the held-out interval contains no effect


def test_bh_matches_definition():
    p = np.array([0.01, 0.04, 0.03, 0.2, np.nan])
    q = bh_qvalues(p)
    # m = 5 (NaN counts as p = 1): sorted q = 0.01*5/1, min(0.03*5/2, 0.04*5/3), 0.04*5/3, 0.2*5/4, 1
    assert q == pytest.approx([0.05, 1 / 15, 1 / 15, 0.25, 1.0])


def test_named_ratio_and_zero_denominator():
    prompts = pair_prompts(3)
    pairs = prompt_pairs(prompts, "qa", "simple")
    rows = [(0, 5, 1, 3.0), (2, 5, 1, 3.0), (4, 5, 1, 3.0), (1, 5, 1, 2.0), (3, 5, 1, 2.0), (5, 5, 1, 2.0),
            (0, 5, 2, 1.0)]
    values = prompt_values(sparse_features(rows), position_weights(prompts, "decision"))
    out = named_features(values, pairs, layer=3, named={"fmt": [1, 2], "none": [3]}, n_resamples=200,
                           confidence=0.95, seed=0).sort("feature_id")
    r1, r2, r3 = out.rows(named=True)
    assert r1["ratio"] == pytest.approx(1.5) and r1["ratio_low"] == pytest.approx(1.5) and r1["firing_rate_buggy"] == 1.0
    assert r2["ratio"] is None and r2["mean_buggy"] == pytest.approx(1 / 3) and r2["firing_rate_correct"] == 0.0
    assert r3["ratio"] is None and r3["mean_buggy"] == 0.0 and r3["category"] == "none"
    # intervals over the 2 number pairs of the 3 questions (pair_prompts: two questions per pair)
    assert r1["n_pairs"] == 2 and r1["mean_buggy_low"] == r1["mean_buggy_high"] == pytest.approx(3.0)
    assert r1["firing_rate_buggy_low"] < 1.0 == r1["firing_rate_buggy_high"]


def test_wrong_vs_right_ratio_is_stratified_by_question_order():
    """The model names the number asked last, so wrong answers are mostly correct-first prompts. A
    feature that fires on correct-first prompts only tells the orders apart: its unstratified
    wrong/right ratio is large, its order-stratified one about 1. A planted wrong-answer feature
    keeps a ratio above 1 in both orders."""
    from bugscope.features.discriminative import interval_columns

    rng = np.random.default_rng(7)
    n = 400
    order = np.where(np.arange(n) % 2 == 0, "correct_first", "wrong_first")
    wrong = np.where(order == "correct_first", rng.random(n) < 0.9, rng.random(n) < 0.1)
    order_feature = np.where(order == "correct_first", 3.0, 0.0) + rng.exponential(0.1, n)
    answer_feature = np.where(wrong, 2.0, 1.0) + rng.exponential(0.1, n)
    x = np.column_stack([order_feature, answer_feature])
    pairs = np.arange(n) // 2
    naive = x[wrong].mean(axis=0) / x[~wrong].mean(axis=0)
    cols = interval_columns(x[wrong], x[~wrong], pairs[wrong], pairs[~wrong], boot=BOOT,
                            strata_a=order[wrong], strata_b=order[~wrong])
    assert naive[0] > 3 and cols["ratio"][0] == pytest.approx(1.0, abs=0.1)
    assert cols["ratio_low"][0] < 1.1 and cols["ratio_high"][0] > 0.9
    assert cols["ratio"][1] == pytest.approx(2.0, abs=0.15) and cols["ratio_low"][1] > 1.5


def test_wrong_vs_right_test_is_stratified_by_question_order():
    """van Elteren's test: with one stratum it is the Mann-Whitney normal approximation; an order
    feature is not significant within orders, a wrong-answer feature is."""
    from scipy import stats as sps

    from bugscope.features.discriminative import stratified_unpaired_test

    rng = np.random.default_rng(11)
    a, b = rng.normal(0.4, 1, size=(30, 3)), rng.normal(0, 1, size=(40, 3))
    p, d = stratified_unpaired_test(a, b, np.zeros(30), np.zeros(40), "wilcoxon")
    ref = sps.mannwhitneyu(a, b, axis=0, method="asymptotic", use_continuity=False).pvalue
    assert p == pytest.approx(ref, rel=1e-9)
    pooled = np.sqrt((29 * a.var(axis=0, ddof=1) + 39 * b.var(axis=0, ddof=1)) / 68)
    assert d == pytest.approx((a.mean(axis=0) - b.mean(axis=0)) / pooled, rel=1e-9)

    n = 400
    order = np.where(np.arange(n) % 2 == 0, "correct_first", "wrong_first")
    wrong = np.where(order == "correct_first", rng.random(n) < 0.9, rng.random(n) < 0.1)
    x = np.column_stack([np.where(order == "correct_first", 3.0, 0.0) + rng.exponential(0.1, n),
                         np.where(wrong, 2.0, 1.0) + rng.exponential(0.1, n)])
    for test in ("wilcoxon", "ttest"):
        p, d = stratified_unpaired_test(x[wrong], x[~wrong], order[wrong], order[~wrong], test)
        assert p[0] > 0.01 and abs(d[0]) < 0.5, test  # the order feature: no effect within an order
        assert p[1] < 1e-6 and d[1] > 2, test
