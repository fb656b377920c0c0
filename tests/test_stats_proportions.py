"""Intervals for proportions over few clusters, two-arm tests and Holm (research notes section 9),
checked against exact values and against a simulation on made-up clustered tables."""

from __future__ import annotations

import numpy as np
import pytest

from bugscope.stats import (
    clopper_pearson,
    clustered_proportion_columns,
    fewest_clusters_to_decide,
    fisher_exact_p,
    holm_adjusted,
    wilson_interval,
)


def test_exact_interval_of_none_of_six_is_wide():
    low, high = clopper_pearson(0, 6, 0.95)
    assert low == 0 and high == pytest.approx(0.4593, abs=1e-4)  # 1 - 0.025 ** (1 / 6)


def test_fewest_pairs_to_decide_a_region():
    assert fewest_clusters_to_decide(at_least=0.8, confidence=0.95) == 17
    assert fewest_clusters_to_decide(at_least=0.95, confidence=0.95) == 72
    assert fewest_clusters_to_decide(at_most=0.2, confidence=0.95) == 17
    assert fewest_clusters_to_decide(at_most=0.05, confidence=0.95) == 72


def test_one_target_per_pair_uses_the_exact_interval():
    x = np.array([[1.0], [1.0], [0.0], [np.nan]])
    out = clustered_proportion_columns(x, [0, 1, 2, 3], 0.95)
    low, high = clopper_pearson(2, 3, 0.95)
    assert out["rate"][0] == pytest.approx(2 / 3)
    assert (out["low"][0], out["high"][0]) == (pytest.approx(float(low)), pytest.approx(float(high)))
    assert out["n_clusters"][0] == 3


def test_an_empty_column_has_no_interval():
    out = clustered_proportion_columns(np.full((3, 1), np.nan), [0, 1, 2], 0.95)
    assert np.isnan(out["rate"][0]) and np.isnan(out["low"][0]) and out["n_clusters"][0] == 0


def _clustered_draws(rng, n_clusters, p, icc):
    """Two outcomes per cluster that agree more than chance: a cluster's own rate is drawn from a
    beta with mean p and intra-cluster correlation icc."""
    a = p * (1 - icc) / icc
    b = (1 - p) * (1 - icc) / icc
    rates = rng.beta(a, b, size=n_clusters)
    outcomes = (rng.random((n_clusters, 2)) < rates[:, None]).astype(float)
    return outcomes.ravel(), np.repeat(np.arange(n_clusters), 2)


def test_design_effect_interval_covers_on_clustered_tables_where_the_naive_one_does_not():
    rng = np.random.default_rng(0)
    p, hits, naive_hits, trials = 0.3, 0, 0, 600
    for _ in range(trials):
        x, clusters = _clustered_draws(rng, 30, p, icc=0.6)
        out = clustered_proportion_columns(x[:, None], clusters, 0.95)
        hits += out["low"][0] <= p <= out["high"][0]
        lo, hi = wilson_interval(x.mean(), len(x), 0.95)
        naive_hits += lo <= p <= hi
    assert hits / trials >= 0.92
    assert naive_hits / trials < 0.9  # ignoring the clusters under-covers: the check can fail


def test_exact_interval_covers_independent_targets():
    rng = np.random.default_rng(1)
    p, n, trials = 0.1, 12, 2000
    k = rng.binomial(n, p, size=trials)
    low, high = clopper_pearson(k, np.full(trials, n), 0.95)
    assert ((low <= p) & (p <= high)).mean() >= 0.95


def test_fisher_and_holm():
    assert fisher_exact_p(1, 4, 0, 4) == pytest.approx(1.0)
    assert fisher_exact_p(0, 0, 0, 0) == 1.0
    assert fisher_exact_p(20, 20, 0, 20) < 1e-6
    assert holm_adjusted([0.01, 0.04, 0.03]).tolist() == pytest.approx([0.03, 0.06, 0.06])
