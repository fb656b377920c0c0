"""Feature analyses: overlap and amplification on hand-made sets, the attribution identity on the
real model, and the calibration of the parity permutation test."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch
from scipy import stats as sps

from bugscope import features as F
from bugscope.config import primary_sae_set, with_sae_set
from bugscope.features.attribution import attribute_layer, parity_test, summarise_attribution
from bugscope.model.capture import capture_decision
from tests.numerics import max_abs, rounding_tolerance


def _sparse(rows):
    """rows: (prompt_id, position, feature_id, activation) -> a feature table as the SAE stage writes it."""
    return pl.DataFrame(rows, schema={"prompt_id": pl.Int32, "position": pl.Int32, "feature_id": pl.Int32,
                                      "activation": pl.Float32}, orient="row")


def _prompts(n_questions: int, decision_pos: int = 5, aligned=(0, 2, 5)):
    rows = []
    for q in range(n_questions):
        for j, fmt in enumerate(("qa", "simple")):
            rows.append({"prompt_id": 2 * q + j, "question_id": q, "pair_id": q // 2, "pair_kind": "shorter_bigger",
                         "order": ("correct_first", "wrong_first")[q % 2], "format": fmt,
                         "correct": f"{9 + q // 2}.8", "wrong": f"{9 + q // 2}.11",
                         "decision_pos": decision_pos, "aligned_positions": list(aligned),
                         "prompt_last_pos": aligned[-2] if len(aligned) > 1 else decision_pos})
    return pl.DataFrame(rows, schema_overrides={"prompt_id": pl.Int32, "aligned_positions": pl.List(pl.Int32)})


# --- overlap and amplification ------------------------------------------------------------------


@pytest.fixture
def handmade():
    d = 5
    rows = [
        # q0: top-3 buggy {1, 2, 3}, correct {5, 1, 2}: shared {1, 2}, amplification (5/2.5 + 4/2)/2 = 2
        (0, d, 1, 5.0), (0, d, 2, 4.0), (0, d, 3, 3.0), (0, d, 4, 1.0),
        (1, d, 1, 2.5), (1, d, 2, 2.0), (1, d, 5, 6.0),
        # q1: no shared feature
        (2, d, 7, 1.0), (3, d, 8, 1.0),
        # q2: zero activations only (buggy) and nothing at all (correct)
        (4, d, 9, 0.0),
        # q3: ties at the buggy top-3 border (smaller id wins); shared {3} with ratio 1/2
        (6, d, 1, 1.0), (6, d, 2, 1.0), (6, d, 3, 1.0), (6, d, 4, 1.0),
        (7, d, 4, 1.0), (7, d, 3, 2.0),
        # activations off the decision position do not count in "decision" mode
        (7, 0, 1, 9.0),
    ]
    prompts = _prompts(4)
    pairs = F.prompt_pairs(prompts, "qa", "simple")
    values = F.prompt_values(_sparse(rows), F.position_weights(prompts, "decision"))
    return prompts, pairs, values


def test_pair_overlap_known_answers(handmade):
    _, pairs, values = handmade
    out = F.pair_overlap(values, pairs, k=3).sort("question_id")
    assert out["shared"].to_list() == [2, 0, 0, 1]
    assert out["buggy_only"].to_list() == [1, 1, 0, 2]
    assert out["correct_only"].to_list() == [1, 1, 0, 1]
    assert out["n_top_buggy"].to_list() == [3, 1, 0, 3]
    assert out["overlap_pct"].to_list() == pytest.approx([200 / 3, 0.0, 0.0, 100 / 3])
    jac = out["jaccard"].to_list()
    assert jac[0] == pytest.approx(0.5) and jac[1] == 0.0 and jac[2] is None and jac[3] == pytest.approx(0.25)
    for col in ("amplification_geomean", "amplification_original_mean_of_ratios"):
        amp = out[col].to_list()
        assert amp[0] == pytest.approx(2.0) and amp[1] is None and amp[2] is None and amp[3] == pytest.approx(0.5)


def test_aligned_mean_and_pooled(handmade):
    prompts, pairs, _ = handmade
    # aligned positions (1, 2, 5): position 4 is not aligned
    prompts = prompts.with_columns(pl.lit([1, 2, 5], pl.List(pl.Int32)).alias("aligned_positions"))
    rows = [(0, 1, 1, 3.0), (0, 5, 1, 3.0), (0, 4, 1, 100.0),
            (1, 2, 1, 1.5), (1, 2, 2, 3.0)]
    values = F.prompt_values(_sparse(rows), F.position_weights(prompts, "aligned_mean")).sort("prompt_id", "feature_id")
    assert values.rows() == [(0, 1, pytest.approx(2.0)), (1, 1, pytest.approx(0.5)), (1, 2, pytest.approx(1.0))]
    # position 0 (the attention sink) of one format drops that aligned index from both formats
    sink = prompts.with_columns(pl.when(pl.col("format") == "simple").then(pl.lit([0, 2, 5], pl.List(pl.Int32)))
                                .otherwise(pl.col("aligned_positions")).alias("aligned_positions"))
    w = F.position_weights(sink, "aligned_mean").filter(pl.col("prompt_id") < 2)
    assert w.rows() == [(0, 2, 0.5), (0, 5, 0.5), (1, 2, 0.5), (1, 5, 0.5)]
    pooled = F.pooled_overlap(values, pairs, k=1)
    # format means over 4 pairs: buggy {1: 0.5}, correct {1: 0.125, 2: 0.25}; top-1: {1} vs {2}
    assert pooled["shared"] == 0 and pooled["overlap_pct"] == 0 and pooled["amplification_geomean"] is None
    pooled = F.pooled_overlap(values, pairs, k=2)
    assert pooled["shared"] == 1 and pooled["amplification_original_mean_of_ratios"] == pytest.approx(4.0)
    assert pooled["amplification_geomean"] == pytest.approx(4.0)
    assert pooled["jaccard"] == pytest.approx(0.5)
    empty = F.pooled_overlap(values.clear(), pairs, k=2)
    assert empty["shared"] == 0 and empty["jaccard"] is None


def test_summary_marks_and_intervals():
    rng = np.random.default_rng(0)
    n = 40
    frames = []
    for layer, centre in [(0, 60.0), (5, 20.0), (10, 80.0), (15, 70.0), (29, 50.0)]:
        frames.append(pl.DataFrame({
            "question_id": np.arange(n), "pair_id": np.arange(n) // 2, "layer": layer,
            "overlap_pct": np.clip(centre + rng.normal(0, 5, n), 0, 100), "jaccard": rng.random(n),
            "amplification_geomean": np.where(rng.random(n) < 0.2, np.nan, rng.random(n) + 1),
            "amplification_original_mean_of_ratios": rng.random(n) + 1,
            "shared": rng.integers(0, 20, n), "buggy_only": rng.integers(0, 20, n),
            "correct_only": rng.integers(0, 20, n)}))
    per_pair = pl.concat(frames)
    pooled = pl.DataFrame({"layer": [0, 5, 10, 15, 29], "overlap_pct": [1.0] * 5})
    out = F.summarise_overlap(per_pair, pooled, k=20, num_layers=30, middle_fraction=[0.25, 0.75],
                              n_resamples=500, confidence=0.95, seed=1)
    pp = out.filter(pl.col("variant") == "per_pair").sort("layer")
    assert pp.filter("is_min_overlap")["layer"].to_list() == [5]
    assert pp.filter("is_max_overlap_middle")["layer"].to_list() == [10]
    assert pp["is_middle"].to_list() == [False, False, True, True, False]
    assert (pp["overlap_pct_low"] <= pp["overlap_pct"]).all() and (pp["overlap_pct"] <= pp["overlap_pct_high"]).all()
    assert pp.filter(pl.col("layer") == 5)["argmin_frequency"].item() == pytest.approx(1.0)
    assert pp["n_pairs_amplification"].max() < n
    again = F.summarise_overlap(per_pair, pooled, k=20, num_layers=30, middle_fraction=[0.25, 0.75],
                                n_resamples=500, confidence=0.95, seed=1)
    assert again.equals(out)
    assert out.filter(pl.col("variant") == "pooled").height == 5


def _pairs(n_pairs: int) -> pl.DataFrame:
    """Prompt pairs as the overlap stage builds them: 2 orders per number pair; prompt ids 4q (buggy), 4q + 1 (correct)."""
    rows = [{"question_id": 2 * p + o, "pair_id": p, "order": ("correct_first", "wrong_first")[o],
             "prompt_id_buggy": 2 * (2 * p + o), "prompt_id_correct": 2 * (2 * p + o) + 1}
            for p in range(n_pairs) for o in range(2)]
    return pl.DataFrame(rows, schema_overrides={c: pl.Int32 for c in ("question_id", "pair_id", "prompt_id_buggy",
                                                                       "prompt_id_correct")})


def _overlap_summary(value_of, n_pairs=30, layers=(0, 4, 8), k=10, n_resamples=1000, seed=0):
    """summarise_overlap on per-prompt values `value_of(layer, prompt_id) -> [n_features]` (absent = 0)."""
    pairs = _pairs(n_pairs)
    couples = F.baseline_couples(pairs, "qa", "simple", seed=7)
    # as features.stages.run_overlap: the held-out rows' baselines pair held-out (odd) pairs only
    heldout_couples = F.baseline_couples(pairs.filter(pl.col("pair_id") % 2 == 1), "qa", "simple", seed=7)
    per_pair, pooled, base, heldout_base = [], [], [], []
    for layer in layers:
        rows = [(pid, f, float(v)) for pid in range(4 * n_pairs) for f, v in enumerate(value_of(layer, pid)) if v > 0]
        values = pl.DataFrame(rows, schema={"prompt_id": pl.Int32, "feature_id": pl.Int32, "value": pl.Float64},
                              orient="row")
        per_pair.append(F.pair_overlap(values, pairs, k).with_columns(pl.lit(layer).alias("layer")))
        pooled.append({"layer": layer, **F.pooled_overlap(values, pairs, k)})
        base.append(F.baseline_overlap(values, couples, k).with_columns(pl.lit(layer).alias("layer")))
        heldout_base.append(F.baseline_overlap(values, heldout_couples, k).with_columns(pl.lit(layer).alias("layer")))
    return F.summarise_overlap(pl.concat(per_pair), pl.DataFrame(pooled), k=k, num_layers=10,
                               middle_fraction=[0.25, 0.75], n_resamples=n_resamples, confidence=0.95, seed=seed,
                               baselines=pl.concat(base), heldout_baselines=pl.concat(heldout_base)), pl.concat(per_pair)


def test_baseline_couples_pair_other_questions_of_the_same_order_and_format():
    pairs = _pairs(6)
    couples = F.baseline_couples(pairs, "qa", "simple", seed=3)
    assert couples.equals(F.baseline_couples(pairs, "qa", "simple", seed=3))  # deterministic
    prompt = pl.concat([pairs.select("pair_id", "order", pl.lit("qa").alias("format"), pl.col("prompt_id_buggy").alias("p")),
                        pairs.select("pair_id", "order", pl.lit("simple").alias("format"),
                                     pl.col("prompt_id_correct").alias("p"))])
    info = {r["p"]: (r["pair_id"], r["order"], r["format"]) for r in prompt.to_dicts()}
    diff = couples.filter(pl.col("comparison") == "same_format_different_question")
    assert diff.height == 24  # every question of every pair, in each format
    for r in diff.to_dicts():
        (pa, oa, fa), (pb, ob, fb) = info[r["prompt_id_a"]], info[r["prompt_id_b"]]
        assert pa == r["pair_id"] and pa != pb and oa == ob and fa == fb == r["format"]
    # a permutation cycle: each pair is once the first and once the second prompt of each (order, format)
    assert sorted(info[p][0] for p in diff["prompt_id_b"]) == sorted(diff["pair_id"].to_list())
    swapped = couples.filter(pl.col("comparison") == "same_format_swapped_order")
    assert swapped.height == 12
    for r in swapped.to_dicts():
        a, b = info[r["prompt_id_a"]], info[r["prompt_id_b"]]
        assert a[0] == b[0] == r["pair_id"] and (a[1], b[1]) == ("correct_first", "wrong_first") and a[2] == b[2]
    assert F.baseline_couples(pairs, "qa", "simple", seed=4)["prompt_id_b"].to_list() != couples["prompt_id_b"].to_list()
    with pytest.raises(ValueError, match="order"):
        F.baseline_couples(pairs.drop("order"), "qa", "simple", seed=3)


def test_baseline_overlap_of_identical_distributions_is_high_and_the_format_effect_is_null():
    # Every prompt of both formats draws from one distribution: a common profile (decreasing in the
    # feature id) times noise. Top-10 sets then share most, not all, features.
    rng = np.random.default_rng(0)
    profile = 1.0 / (1 + np.arange(60)) ** 0.7
    draws = {}

    def value_of(layer, pid):
        return draws.setdefault((layer, pid), profile * rng.lognormal(0, 0.4, 60))

    summary, _ = _overlap_summary(value_of)
    pp = summary.filter(pl.col("variant") == "per_pair")
    base = summary.filter(pl.col("variant") == "same_format_different_question", pl.col("format") == "both")
    assert (base["overlap_pct"] > 40).all() and (base["overlap_pct"] < 95).all()
    assert pp["baseline_overlap_pct"].to_list() == base["overlap_pct"].to_list()
    # no format effect: the cross-format overlap is at the baseline; its interval covers 0
    assert (pp["format_effect_pct_low"] < 0).all() and (pp["format_effect_pct_high"] > 0).all()
    assert (pp["format_effect_pct"] - (pp["baseline_overlap_pct"] - pp["overlap_pct"])).abs().max() < 1e-9
    # the geometric mean is about 1 and its interval covers 1; the seed's mean of ratios is biased above 1
    assert (pp["amplification_geomean_low"] < 1).all() and (pp["amplification_geomean_high"] > 1).all()
    assert (pp["amplification_excess_low"] < 1).all() and (pp["amplification_excess_high"] > 1).all()
    assert (pp["amplification_original_mean_of_ratios_low"] > 1).all()
    assert (base["amplification_original_mean_of_ratios"] > base["amplification_geomean"]).all()


def test_a_planted_format_effect_is_beyond_the_baseline():
    # The buggy format (even prompt ids) swaps 4 features of the common top for its own, and scales
    # every feature by 1.5: its top sets differ more from the correct format's than two questions do.
    rng = np.random.default_rng(1)
    profile = 1.0 / (1 + np.arange(60)) ** 0.7
    draws = {}

    def value_of(layer, pid):
        v = profile * rng.lognormal(0, 0.2, 60)
        if pid % 2 == 0:
            v = 1.5 * v
            v[[0, 2, 4, 6]], v[[50, 52, 54, 56]] = 0.0, 2 * profile[0]
        return draws.setdefault((layer, pid), v)

    summary, _ = _overlap_summary(value_of)
    pp = summary.filter(pl.col("variant") == "per_pair")
    assert (pp["format_effect_pct_low"] > 10).all()  # about 40 points fewer shared features
    assert pp["amplification_geomean"].to_numpy() == pytest.approx(1.5, rel=0.05)
    assert (pp["amplification_excess_low"] > 1.2).all()
    null = pp["amplification_geomean_null"].to_numpy()
    assert (np.abs(np.log(null)) < 0.1).all()


HELDOUT_LAYERS = (0, 3, 5, 7, 9)  # middle layers of 10 (0.25 .. 0.75): 3, 5, 7


def _noise_values(seed: int):
    """value_of(layer, prompt_id) of one distribution for every prompt (no format effect), cached."""
    rng = np.random.default_rng(seed)
    profile = 1.0 / (1 + np.arange(60)) ** 0.7
    draws = {}
    return lambda layer, pid: draws.setdefault((layer, pid), profile * rng.lognormal(0, 0.4, 60))


def test_heldout_rows_are_measured_on_the_odd_pairs_and_marked_on_the_even_ones():
    noise = _noise_values(5)
    for layer in HELDOUT_LAYERS:  # draw every prompt once, in one order, before any change
        for pid in range(4 * 30):
            noise(layer, pid)

    def even_peak(layer, pid):
        """The even pairs (pair_id = pid // 4) alone show a peak at 5 and a dip at 9; the odd pairs are unchanged."""
        v = noise(layer, pid)
        if (pid // 4) % 2 == 1:
            return v
        if layer == 5:  # both formats of a question alike: top-k sets identical
            return noise(layer, pid - pid % 2)
        if layer == 9:  # disjoint top-k sets: the buggy prompt's features 0-29, the correct one's 30-59
            return np.where((np.arange(60) < 30) == (pid % 2 == 0), v, 0.0)
        return v

    plain, per_pair = _overlap_summary(noise, layers=HELDOUT_LAYERS, n_resamples=300)
    changed, _ = _overlap_summary(even_peak, layers=HELDOUT_LAYERS, n_resamples=300)

    def held(summary):
        return summary.filter(pl.col("variant") == F.HELDOUT_VARIANT).sort("layer")

    stats = [c for c in F.SUMMARY_COLUMNS if c not in ("is_min_overlap", "is_max_overlap_middle")]
    # Only even-pair data changed: every statistic of the held-out rows is the same...
    assert held(changed).select(stats).equals(held(plain).select(stats))
    # ...while the full-data rows and the held-out marks (chosen on the even pairs) moved.
    per_pair_of = lambda s: s.filter(pl.col("variant") == "per_pair").sort("layer")  # noqa: E731
    assert not per_pair_of(changed)["overlap_pct"].equals(per_pair_of(plain)["overlap_pct"])
    assert held(changed).filter("is_max_overlap_middle")["layer"].to_list() == [5]
    assert held(changed).filter("is_min_overlap")["layer"].to_list() == [9]
    # The held-out statistics are those of the odd pair ids, the marks those of the even ones.
    odd = per_pair.filter(pl.col("pair_id") % 2 == 1).group_by("layer").agg(pl.col("overlap_pct").mean()).sort("layer")
    assert held(plain)["overlap_pct"].to_numpy() == pytest.approx(odd["overlap_pct"].to_numpy())
    assert held(plain)["n_number_pairs"].to_list() == [15] * 5 and held(plain)["n_pairs"].to_list() == [30] * 5
    even = per_pair.filter(pl.col("pair_id") % 2 == 0).group_by("layer").agg(pl.col("overlap_pct").mean()).sort("layer")
    assert held(plain).filter("is_min_overlap")["layer"].item() == even["layer"][int(np.argmin(even["overlap_pct"]))]
    # its beyond-baseline columns are measured too (on baselines among the odd pairs)
    assert held(plain)["format_effect_pct"].null_count() == 0


def test_heldout_baselines_must_not_hold_a_selection_pair():
    noise = _noise_values(6)
    pairs = _pairs(6)
    couples = F.baseline_couples(pairs, "qa", "simple", seed=7)
    rows = [(pid, f, float(v)) for pid in range(24) for f, v in enumerate(noise(0, pid)) if v > 0]
    values = pl.DataFrame(rows, schema={"prompt_id": pl.Int32, "feature_id": pl.Int32, "value": pl.Float64}, orient="row")
    per_pair = F.pair_overlap(values, pairs, 10).with_columns(pl.lit(0).alias("layer"))
    base = F.baseline_overlap(values, couples, 10).with_columns(pl.lit(0).alias("layer"))
    with pytest.raises(ValueError, match="even pair_id"):
        F.summarise_overlap(per_pair, pl.DataFrame({"layer": [0], "overlap_pct": [0.0]}), k=10, num_layers=10,
                            middle_fraction=[0.0, 1.0], n_resamples=50, confidence=0.95, seed=0, heldout_baselines=base)
    # one number pair per half is too few to hold out: no held-out rows
    two = F.summarise_overlap(per_pair.filter(pl.col("pair_id") < 2), pl.DataFrame({"layer": [0], "overlap_pct": [0.0]}),
                              k=10, num_layers=10, middle_fraction=[0.0, 1.0], n_resamples=50, confidence=0.95, seed=0)
    assert F.HELDOUT_VARIANT not in two["variant"].to_list()


def test_pair_level_overlap_ci_is_wider_than_a_question_level_one_when_orders_move_together():
    # The two orders of a number pair have the same overlap: 25 pairs are 25 observations, not 50.
    from bugscope.stats import bootstrap_mean_ci_columns

    rng = np.random.default_rng(2)
    n_pairs = 25
    by_pair = rng.uniform(20, 90, size=(n_pairs, 2))  # [pair, layer]
    per_pair = pl.concat([pl.DataFrame({
        "question_id": np.arange(2 * n_pairs), "pair_id": np.arange(2 * n_pairs) // 2, "layer": layer,
        **{stat: np.repeat(by_pair[:, i], 2) for stat in F.OVERLAP_STATS}}) for i, layer in enumerate((3, 6))])
    summary = F.summarise_overlap(per_pair, pl.DataFrame({"layer": [3, 6], "overlap_pct": [0.0, 0.0]}), k=20,
                                  num_layers=10, middle_fraction=[0.25, 0.75], n_resamples=4000, confidence=0.95,
                                  seed=0).filter(pl.col("variant") == "per_pair").sort("layer")
    pair_width = (summary["overlap_pct_high"] - summary["overlap_pct_low"]).to_numpy()
    x = np.repeat(by_pair, 2, axis=0)
    _, q_low, q_high = bootstrap_mean_ci_columns(x, n_resamples=4000, confidence=0.95, seed=0)
    assert (pair_width > 1.3 * (q_high - q_low)).all()  # about sqrt(2) wider
    assert summary["n_pairs"].to_list() == [50, 50] and summary["n_number_pairs"].to_list() == [25, 25]
    assert summary["overlap_pct"].to_numpy() == pytest.approx(by_pair.mean(axis=0))


def test_geomean_amplification_is_symmetric_in_the_two_formats():
    rng = np.random.default_rng(3)
    pairs = _pairs(10)
    rows = [(pid, f, float(rng.exponential())) for pid in range(40) for f in rng.choice(12, 8, replace=False)]
    values = pl.DataFrame(rows, schema={"prompt_id": pl.Int32, "feature_id": pl.Int32, "value": pl.Float64}, orient="row")
    swapped = pairs.with_columns(pl.col("prompt_id_correct").alias("prompt_id_buggy"),
                                 pl.col("prompt_id_buggy").alias("prompt_id_correct"))
    a, b = F.pair_overlap(values, pairs, 5), F.pair_overlap(values, swapped, 5)
    ok = a["amplification_geomean"].is_not_null()
    assert (a["amplification_geomean"] * b["amplification_geomean"]).filter(ok).to_numpy() == pytest.approx(1.0)
    # the mean of ratios is not: both directions come out above 1 on average
    assert (a["amplification_original_mean_of_ratios"] * b["amplification_original_mean_of_ratios"]).filter(ok).mean() > 1


# --- discriminative and named features ----------------------------------------------------------


def test_discriminative_finds_planted_feature():
    rng = np.random.default_rng(3)
    n_q = 30
    prompts = _prompts(n_q)
    pairs = F.prompt_pairs(prompts, "qa", "simple")
    rows = []
    for q in range(n_q):
        for j in range(2):
            pid = 2 * q + j
            rows.append((pid, 5, 100, 3.0 + (2.0 if j == 0 else 0.0) + rng.normal(0, 0.3)))  # up in buggy
            rows.append((pid, 5, 200, 3.0 + (1.5 if j == 1 else 0.0) + rng.normal(0, 0.3)))  # down in buggy
            rows += [(pid, 5, f, float(rng.exponential())) for f in range(10) if rng.random() < 0.5]
    values = F.prompt_values(_sparse(rows), F.position_weights(prompts, "decision"))
    scores = pl.DataFrame({"prompt_id": np.arange(2 * n_q, dtype=np.int32), "is_correct": np.arange(2 * n_q) % 4 < 2})
    cfg = {"test": "wilcoxon", "min_firing_rate": 0.05, "fdr_alpha": 0.05, "top_n": 3, "min_group_size": 5}
    out = F.discriminative_features(values, pairs, scores, layer=7, cfg=cfg)
    bvc = out.filter(pl.col("comparison") == "buggy_vs_correct")
    up = bvc.filter(pl.col("direction") == "up", pl.col("rank") == 0).row(0, named=True)
    down = bvc.filter(pl.col("direction") == "down", pl.col("rank") == 0).row(0, named=True)
    assert up["feature_id"] == 100 and up["significant"] and up["q_value"] < 1e-4 and up["effect_size"] > 2
    assert down["feature_id"] == 200 and down["significant"]
    assert bvc.filter(~pl.col("feature_id").is_in([100, 200]))["significant"].sum() == 0
    assert set(out["comparison"].unique()) == {"buggy_vs_correct", "buggy_vs_correct_heldout", "wrong_vs_right"}
    assert out.filter(pl.col("comparison") == "wrong_vs_right")["n_a"].unique().to_list() == [n_q // 2]
    # Held out: ranked on the even pair ids, measured on the odd ones. The planted feature stays on
    # top and keeps its ratio on pairs that did not rank it.
    held = out.filter(pl.col("comparison") == "buggy_vs_correct_heldout", pl.col("direction") == "up",
                      pl.col("rank") == 0).row(0, named=True)
    assert held["feature_id"] == 100 and held["n_a"] == len(range(0, n_q // 2, 2)) * 2
    assert held["heldout_mean_a"] / held["heldout_mean_b"] == pytest.approx(5 / 3, abs=0.25)
    assert held["heldout_firing_rate_a"] == held["heldout_firing_rate_b"] == 1.0  # about 5 and 3, never 0


def test_heldout_ratio_of_a_noise_feature_shrinks_to_one():
    # No feature differs between formats: the top-ranked one has a ratio above 1 on the pairs that
    # ranked it, by selection alone, and about 1 on the held-out pairs.
    rng = np.random.default_rng(5)
    n_q = 80
    prompts = _prompts(n_q)
    pairs = F.prompt_pairs(prompts, "qa", "simple")
    rows = [(2 * q + j, 5, f, float(rng.exponential())) for q in range(n_q) for j in range(2) for f in range(300)]
    values = F.prompt_values(_sparse(rows), F.position_weights(prompts, "decision"))
    scores = pl.DataFrame({"prompt_id": np.arange(2 * n_q, dtype=np.int32), "is_correct": np.arange(2 * n_q) % 4 < 2})
    cfg = {"test": "wilcoxon", "min_firing_rate": 0.05, "fdr_alpha": 0.05, "top_n": 1, "min_group_size": 5}
    top = F.discriminative_features(values, pairs, scores, layer=7, cfg=cfg).filter(
        pl.col("comparison") == "buggy_vs_correct_heldout", pl.col("direction") == "up").row(0, named=True)
    assert top["mean_a"] / top["mean_b"] > 1.25
    assert abs(top["heldout_mean_a"] / top["heldout_mean_b"] - 1) < abs(top["mean_a"] / top["mean_b"] - 1) / 2


def test_bh_matches_definition():
    p = np.array([0.01, 0.04, 0.03, 0.2, np.nan])
    q = F.bh_qvalues(p)
    # m = 5 (NaN counts as p = 1): sorted q = 0.01*5/1, min(0.03*5/2, 0.04*5/3), 0.04*5/3, 0.2*5/4, 1
    assert q == pytest.approx([0.05, 1 / 15, 1 / 15, 0.25, 1.0])


def test_named_ratio_and_zero_denominator():
    prompts = _prompts(3)
    pairs = F.prompt_pairs(prompts, "qa", "simple")
    rows = [(0, 5, 1, 3.0), (2, 5, 1, 3.0), (4, 5, 1, 3.0), (1, 5, 1, 2.0), (3, 5, 1, 2.0), (5, 5, 1, 2.0),
            (0, 5, 2, 1.0)]
    values = F.prompt_values(_sparse(rows), F.position_weights(prompts, "decision"))
    out = F.named_features(values, pairs, layer=3, named={"fmt": [1, 2], "none": [3]}, n_resamples=200,
                           confidence=0.95, seed=0).sort("feature_id")
    r1, r2, r3 = out.rows(named=True)
    assert r1["ratio"] == pytest.approx(1.5) and r1["ratio_low"] == pytest.approx(1.5) and r1["firing_rate_buggy"] == 1.0
    assert r2["ratio"] is None and r2["mean_buggy"] == pytest.approx(1 / 3) and r2["firing_rate_correct"] == 0.0
    assert r3["ratio"] is None and r3["mean_buggy"] == 0.0 and r3["category"] == "none"


# --- parity permutation test --------------------------------------------------------------------


def test_parity_detects_planted_parity():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(9, 12))
    m[1::2] += 3.0
    res = parity_test(m, n_permutations=10_000, seed=0)
    assert res.exact and res.n_permutations == math.comb(9, 4)
    assert res.p_value == pytest.approx(1 / math.comb(9, 4)) and res.eta_squared > 0.5
    assert (res.r > 0.5).all()


@pytest.mark.parametrize("n_heads,n_permutations", [(9, 10_000), (32, 199)])
def test_parity_p_uniform_under_shuffled_labels(n_heads, n_permutations):
    """Head labels shuffled at random: the p-value must be uniform (here: KS test and P(p <= a) <= a)."""
    rng = np.random.default_rng(123)
    ps, rps = [], []
    for seed in range(400):
        m = rng.normal(size=(n_heads, 8)) + rng.normal(size=(1, 8)) * 3  # feature effects, no head effect
        m[1::2] += 2.0  # a real parity effect ...
        m = m[rng.permutation(n_heads)]  # ... destroyed by shuffling the head labels
        res = parity_test(m, n_permutations=n_permutations, seed=seed)
        ps.append(res.p_value)
        rps.append(res.r_p_value[0])
    ps, rps = np.array(ps), np.array(rps)
    assert sps.kstest(ps, "uniform").pvalue > 0.01
    assert sps.kstest(rps, "uniform").pvalue > 0.01
    for a in (0.05, 0.1, 0.25, 0.5):
        assert np.mean(ps <= a) <= a + 3 * math.sqrt(a * (1 - a) / len(ps))


def test_parity_familywise_p_corrects_the_choice_of_the_most_correlated_feature():
    """No head effect, 40 features: the most correlated feature's own p is <= 0.05 in most draws
    (it was chosen for it), its familywise (max-statistic) p in about 5 % of them at most."""
    rng = np.random.default_rng(7)
    own, familywise = [], []
    for seed in range(200):
        res = parity_test(rng.normal(size=(32, 40)), n_permutations=199, seed=seed)
        best = int(np.argmax(np.abs(res.r)))
        own.append(res.r_p_value[best])
        familywise.append(res.r_familywise_p_value[best])
        assert (res.r_familywise_p_value >= res.r_p_value).all()
    own, familywise = np.array(own), np.array(familywise)
    assert np.mean(own <= 0.05) > 0.5
    assert np.mean(familywise <= 0.05) <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / len(familywise))
    # a planted parity effect on one feature survives the correction
    m = rng.normal(size=(32, 40))
    m[1::2, 3] += 3.0
    res = parity_test(m, n_permutations=199, seed=0)
    assert res.r_familywise_p_value[3] == pytest.approx(1 / 200)


# --- attribution identity on the real model -----------------------------------------------------


def _make_sae(kind: str, normalisation: str, d_in: int, seed: int = 0):
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, TopKSAE, TopKSAEConfig

    torch.manual_seed(seed)
    if kind == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=384, k=24, normalize_activations=normalisation,
                                    rescale_acts_by_decoder_norm=True))
    else:
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=384, normalize_activations=normalisation))
        with torch.no_grad():
            sae.threshold.fill_(0.05)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.5)
        sae.b_enc.normal_(0, 0.1)
        sae.W_dec.mul_(torch.rand(sae.cfg.d_sae, 1) + 0.5)
        if normalisation == "none":
            sae.W_enc.div_(100.0)
    return sae.eval()


@pytest.fixture(scope="module")
def decision_capture(embedded, ci_config):
    from bugscope.data.prompts import build_prompt_table

    model, tokenizer = embedded
    prompts = pl.from_arrow(build_prompt_table(ci_config, tokenizer)).head(12)
    ids, caps = capture_decision(model, prompts.to_dicts(), layers=[3, 10], batch_size=6,
                                   pad_token_id=tokenizer.pad_token_id)
    return prompts, ids, caps


@pytest.mark.parametrize("kind,normalisation,site", [("topk", "none", "resid_post"),
                                                     ("topk", "constant_norm_rescale", "resid_post"),
                                                     ("jumprelu", "layer_norm", "resid_post"),
                                                     ("topk", "constant_norm_rescale", "attn_out")])
@pytest.mark.numerical
def test_head_attributions_reconstruct_sae_pre_activation(embedded, decision_capture, kind, normalisation, site):
    model, _ = embedded
    prompts, ids, caps = decision_capture
    n_heads = model.config.num_attention_heads
    sae = _make_sae(kind, normalisation, model.config.hidden_size)
    feats = list(range(0, 384, 7))
    for layer in (3, 10):
        cap = caps[layer]
        # the captured pieces are the layer's residual stream: pre + attention + MLP = post
        add_tol = rounding_tolerance(torch.float32, scale=max_abs(cap.resid_post), reduction=3)
        assert (cap.resid_pre + cap.attn_out + cap.mlp_out - cap.resid_post).abs().max() <= add_tol
        res = attribute_layer(model, layer, sae, cap, feats, n_heads=n_heads, site=site)
        assert res["pre"].abs().max().item() > 1e-2
        # The float64 decomposition against the SAE's own float32 encoding of the float32 capture:
        # float32 rounding of the largest term, through o_proj and the encoder.
        terms = max(max_abs(res[k]) for k in ("heads", "resid_pre", "mlp_out", "attn_bias", "sae_bias", "pre"))
        tol = rounding_tolerance(torch.float32, scale=terms, reduction=model.config.hidden_size, depth=2)
        assert res["attn_identity_error"] <= tol, (res["attn_identity_error"], tol)
        assert res["identity_error"] <= tol, (res["identity_error"], tol)
        # every head contributes something distinct
        assert res["heads"].abs().amax(dim=(1, 2)).min() > 0
        # ablation check: zero-ablating head h moves the pre-activation by about minus its direct
        # attribution (exactly so, up to layer L's MLP and the input scale, which it also moves)
        direct = res["heads"].reshape(n_heads, -1)
        delta = res["zero_pre"].reshape(n_heads, -1)
        corr = np.corrcoef(direct.flatten().numpy(), -delta.flatten().numpy())[0, 1]
        assert corr > 0.5, corr
    formats = pl.DataFrame({"prompt_id": ids.astype(np.int32)}).join(
        prompts.select("prompt_id", "format"), on="prompt_id", how="left", maintain_order="left")["format"].to_numpy()
    rows = summarise_attribution(res, layer=10, feature_ids=feats, sources=["x"] * len(feats), formats=formats)
    sums = rows.group_by("format", "feature_id").agg(pl.col("direct_attribution").sum(), pl.col("pre_activation").first())
    assert (sums["direct_attribution"] - sums["pre_activation"]).abs().max() <= tol


# --- stage drivers on hand-made tables ----------------------------------------------------------


@pytest.fixture
def stage_inputs(tmp_path, ci_config):
    """A prompt table, baseline scores and two layers of sparse features written as the pipeline writes them."""
    from bugscope.config import stage_hash
    from bugscope.io import write_table

    rng = np.random.default_rng(0)
    n_q = 12
    prompts = _prompts(n_q)
    write_table(prompts.to_arrow(), tmp_path / "prompts.parquet",
                {"kind": "prompts", "config_hash": stage_hash(ci_config, "prompts")})
    scores = pl.DataFrame({"prompt_id": prompts["prompt_id"], "format": prompts["format"],
                           "pair_id": prompts["pair_id"], "pair_kind": prompts["pair_kind"], "order": prompts["order"],
                           "is_correct": rng.random(prompts.height) < 0.5})
    write_table(scores.to_arrow(), tmp_path / "scores.parquet",
                {"kind": "baseline_scores", "config_hash": stage_hash(ci_config, "baseline")})
    paths = {}
    for layer in (0, 10):
        rows = [(pid, pos, int(f), float(rng.exponential()))
                for pid in prompts["prompt_id"] for pos in (0, 2, 5) for f in rng.choice(50, 8, replace=False)]
        paths[layer] = tmp_path / f"blocks.{layer}.hook_resid_post.parquet"
        write_table(_sparse(rows).to_arrow(), paths[layer], {"kind": "features", "d_sae": 50, "sae": "hand-made",
                                                          "config_hash": stage_hash(ci_config, "sae")})
    return ci_config, tmp_path, paths


def test_feature_analyses_read_only_the_bug_pair_kind(stage_inputs, tmp_path):
    from bugscope.config import stage_hash
    from bugscope.io import write_table

    config, tmp, _ = stage_inputs
    prompts = _prompts(4).with_columns(
        pl.when(pl.col("pair_id") == 1).then(pl.lit("longer_bigger")).otherwise(pl.col("pair_kind")).alias("pair_kind"))
    write_table(prompts.to_arrow(), tmp_path / "mixed.parquet",
                {"kind": "prompts", "config_hash": stage_hash(config, "prompts")})
    kept = F.load_prompt_frame(tmp_path / "mixed.parquet", config)
    assert sorted(kept["pair_id"].unique().to_list()) == [0] and kept.height == 4


def test_stage_drivers(stage_inputs):
    import copy

    from bugscope.io import read_metadata

    config, tmp, paths = stage_inputs
    summary, per_pair, meta = F.run_overlap(config, tmp / "prompts.parquet", paths)
    # The original study's one question (9.8 vs 9.11, correct first) at the prompt's last token.
    single = summary.filter(pl.col("variant") == "original_single_pair")
    assert single["layer"].to_list() == [0, 10] and (single["n_pairs"] == 1).all()
    assert single["overlap_pct"].is_not_null().all()
    assert per_pair.height == 2 * 12 and set(per_pair["layer"]) == {0, 10}
    # original single pair, per_pair, per_pair_heldout, pooled, and the two baselines per format and
    # for both, at 2 layers
    assert summary.group_by("variant").len().sort("variant")["len"].to_list() == [2, 2, 2, 2, 6, 6]
    assert summary.filter(pl.col("variant") == "per_pair")["format_effect_pct"].is_not_null().all()
    # the held-out rows: the 3 odd of the 6 number pairs, with their own baselines
    held = summary.filter(pl.col("variant") == F.HELDOUT_VARIANT)
    assert held["n_number_pairs"].to_list() == [3, 3] and held["format_effect_pct"].is_not_null().all()
    assert held["is_min_overlap"].sum() == 1
    assert meta["sources"]["10"]["sae"] == "hand-made"
    table, _ = F.run_discriminative(config, tmp / "prompts.parquet", tmp / "scores.parquet", paths)
    assert set(table["layer"]) == {0, 10} and table["q_value"].is_between(0, 1).all()
    cfg = with_sae_set(copy.deepcopy(config), primary_sae_set(config))
    cfg["sae_set"]["named"] = {"10": {"cat": [3, 7]}}
    named, nmeta = F.run_named(cfg, tmp / "prompts.parquet", paths)
    assert named["feature_id"].to_list() == [3, 7] and named["layer"].to_list() == [10, 10]
    cfg["sae_set"]["named"] = {"10": {"cat": [3, 25523]}}
    with pytest.raises(ValueError, match="out of range"):
        F.run_named(cfg, tmp / "prompts.parquet", paths)
    cfg["features"]["position"] = "aligned_mean"
    summary_aligned, _, _ = F.run_overlap(cfg, tmp / "prompts.parquet", paths)
    assert not summary_aligned.equals(summary)
    assert F.run_overlap(cfg, tmp / "prompts.parquet", paths)[0].equals(summary_aligned)  # deterministic
    assert read_metadata(paths[0])["kind"] == "features"


def test_check_config_rejects_unanalysed_layers(ci_config):
    import copy

    from bugscope.config import ConfigError

    cfg = copy.deepcopy(ci_config)
    cfg["features"]["attribution"]["layers"] = [10, 12]
    with pytest.raises(ConfigError, match="not analysed"):
        F.check_config(cfg)
