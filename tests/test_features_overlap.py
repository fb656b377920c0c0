"""Feature overlap and amplification between the formats: known answers on hand-made sets, the
same-format chance levels, the held-out rows and the pair-level intervals."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from bugscope.features.chance import baseline_couples, baseline_overlap
from bugscope.features.overlap import (
    HELDOUT_VARIANT,
    OVERLAP_STATS,
    SUMMARY_COLUMNS,
    pair_overlap,
    pooled_overlap,
    summarise_overlap,
)
from bugscope.features.values import position_weights, prompt_pairs, prompt_values
from tests.helpers import pair_prompts, sparse_features


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
    prompts = pair_prompts(4)
    pairs = prompt_pairs(prompts, "qa", "simple")
    values = prompt_values(sparse_features(rows), position_weights(prompts, "decision"))
    return prompts, pairs, values


def test_pair_overlap_known_answers(handmade):
    _, pairs, values = handmade
    out = pair_overlap(values, pairs, k=3).sort("question_id")
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
    values = prompt_values(sparse_features(rows), position_weights(prompts, "aligned_mean")).sort("prompt_id", "feature_id")
    assert values.rows() == [(0, 1, pytest.approx(2.0)), (1, 1, pytest.approx(0.5)), (1, 2, pytest.approx(1.0))]
    # position 0 (the attention sink) of one format drops that aligned index from both formats
    sink = prompts.with_columns(pl.when(pl.col("format") == "simple").then(pl.lit([0, 2, 5], pl.List(pl.Int32)))
                                .otherwise(pl.col("aligned_positions")).alias("aligned_positions"))
    w = position_weights(sink, "aligned_mean").filter(pl.col("prompt_id") < 2)
    assert w.rows() == [(0, 2, 0.5), (0, 5, 0.5), (1, 2, 0.5), (1, 5, 0.5)]
    pooled = pooled_overlap(values, pairs, k=1)
    # format means over 4 pairs: buggy {1: 0.5}, correct {1: 0.125, 2: 0.25}; top-1: {1} vs {2}
    assert pooled["shared"] == 0 and pooled["overlap_pct"] == 0 and pooled["amplification_geomean"] is None
    pooled = pooled_overlap(values, pairs, k=2)
    assert pooled["shared"] == 1 and pooled["amplification_original_mean_of_ratios"] == pytest.approx(4.0)
    assert pooled["amplification_geomean"] == pytest.approx(4.0)
    assert pooled["jaccard"] == pytest.approx(0.5)
    empty = pooled_overlap(values.clear(), pairs, k=2)
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
    out = summarise_overlap(per_pair, pooled, k=20, num_layers=30, middle_fraction=[0.25, 0.75],
                              n_resamples=500, confidence=0.95, seed=1)
    pp = out.filter(pl.col("variant") == "per_pair").sort("layer")
    assert pp.filter("is_min_overlap")["layer"].to_list() == [5]
    assert pp.filter("is_max_overlap_middle")["layer"].to_list() == [10]
    assert pp["is_middle"].to_list() == [False, False, True, True, False]
    assert (pp["overlap_pct_low"] <= pp["overlap_pct"]).all() and (pp["overlap_pct"] <= pp["overlap_pct_high"]).all()
    assert pp.filter(pl.col("layer") == 5)["argmin_frequency"].item() == pytest.approx(1.0)
    assert pp["n_pairs_amplification"].max() < n
    again = summarise_overlap(per_pair, pooled, k=20, num_layers=30, middle_fraction=[0.25, 0.75],
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
    couples = baseline_couples(pairs, "qa", "simple", seed=7)
    # as features.stages.run_overlap: the held-out rows' baselines pair held-out (odd) pairs only
    heldout_couples = baseline_couples(pairs.filter(pl.col("pair_id") % 2 == 1), "qa", "simple", seed=7)
    per_pair, pooled, base, heldout_base = [], [], [], []
    for layer in layers:
        rows = [(pid, f, float(v)) for pid in range(4 * n_pairs) for f, v in enumerate(value_of(layer, pid)) if v > 0]
        values = pl.DataFrame(rows, schema={"prompt_id": pl.Int32, "feature_id": pl.Int32, "value": pl.Float64},
                              orient="row")
        per_pair.append(pair_overlap(values, pairs, k).with_columns(pl.lit(layer).alias("layer")))
        pooled.append({"layer": layer, **pooled_overlap(values, pairs, k)})
        base.append(baseline_overlap(values, couples, k).with_columns(pl.lit(layer).alias("layer")))
        heldout_base.append(baseline_overlap(values, heldout_couples, k).with_columns(pl.lit(layer).alias("layer")))
    return summarise_overlap(pl.concat(per_pair), pl.DataFrame(pooled), k=k, num_layers=10,
                               middle_fraction=[0.25, 0.75], n_resamples=n_resamples, confidence=0.95, seed=seed,
                               baselines=pl.concat(base), heldout_baselines=pl.concat(heldout_base)), pl.concat(per_pair)


def test_baseline_couples_pair_other_questions_of_the_same_order_and_format():
    pairs = _pairs(6)
    couples = baseline_couples(pairs, "qa", "simple", seed=3)
    assert couples.equals(baseline_couples(pairs, "qa", "simple", seed=3))  # deterministic
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
    assert baseline_couples(pairs, "qa", "simple", seed=4)["prompt_id_b"].to_list() != couples["prompt_id_b"].to_list()
    with pytest.raises(ValueError, match="order"):
        baseline_couples(pairs.drop("order"), "qa", "simple", seed=3)


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
        return summary.filter(pl.col("variant") == HELDOUT_VARIANT).sort("layer")

    stats = [c for c in SUMMARY_COLUMNS if c not in ("is_min_overlap", "is_max_overlap_middle")]
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
    couples = baseline_couples(pairs, "qa", "simple", seed=7)
    rows = [(pid, f, float(v)) for pid in range(24) for f, v in enumerate(noise(0, pid)) if v > 0]
    values = pl.DataFrame(rows, schema={"prompt_id": pl.Int32, "feature_id": pl.Int32, "value": pl.Float64}, orient="row")
    per_pair = pair_overlap(values, pairs, 10).with_columns(pl.lit(0).alias("layer"))
    base = baseline_overlap(values, couples, 10).with_columns(pl.lit(0).alias("layer"))
    with pytest.raises(ValueError, match="even pair_id"):
        summarise_overlap(per_pair, pl.DataFrame({"layer": [0], "overlap_pct": [0.0]}), k=10, num_layers=10,
                            middle_fraction=[0.0, 1.0], n_resamples=50, confidence=0.95, seed=0, heldout_baselines=base)
    # one number pair per half is too few to hold out: no held-out rows
    two = summarise_overlap(per_pair.filter(pl.col("pair_id") < 2), pl.DataFrame({"layer": [0], "overlap_pct": [0.0]}),
                              k=10, num_layers=10, middle_fraction=[0.0, 1.0], n_resamples=50, confidence=0.95, seed=0)
    assert HELDOUT_VARIANT not in two["variant"].to_list()


def test_pair_level_overlap_ci_is_wider_than_a_question_level_one_when_orders_move_together():
    # The two orders of a number pair have the same overlap: 25 pairs are 25 observations, not 50.
    from bugscope.stats import bootstrap_mean_ci_columns

    rng = np.random.default_rng(2)
    n_pairs = 25
    by_pair = rng.uniform(20, 90, size=(n_pairs, 2))  # [pair, layer]
    per_pair = pl.concat([pl.DataFrame({
        "question_id": np.arange(2 * n_pairs), "pair_id": np.arange(2 * n_pairs) // 2, "layer": layer,
        **{stat: np.repeat(by_pair[:, i], 2) for stat in OVERLAP_STATS}}) for i, layer in enumerate((3, 6))])
    summary = summarise_overlap(per_pair, pl.DataFrame({"layer": [3, 6], "overlap_pct": [0.0, 0.0]}), k=20,
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
    a, b = pair_overlap(values, pairs, 5), pair_overlap(values, swapped, 5)
    ok = a["amplification_geomean"].is_not_null()
    assert (a["amplification_geomean"] * b["amplification_geomean"]).filter(ok).to_numpy() == pytest.approx(1.0)
    # the mean of ratios is not: both directions come out above 1 on average
    assert (a["amplification_original_mean_of_ratios"] * b["amplification_original_mean_of_ratios"]).filter(ok).mean() > 1
