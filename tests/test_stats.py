"""Bootstrap helpers: blocked resampling gives the numbers of the whole array, and a summary at
the 8B study's sizes stays within a bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from bugscope import stats


def _unblocked(x, n_resamples, confidence, seed):
    idx = np.random.default_rng(seed).integers(0, x.shape[0], size=(n_resamples, x.shape[0]))
    alpha = (1 - confidence) / 2
    return np.quantile(x[idx].mean(axis=1), [alpha, 1 - alpha], axis=0)


@pytest.mark.parametrize("block_columns", [2, 3, 4, 16, 1000])
def test_blocked_bootstrap_equals_the_whole_array(monkeypatch, block_columns):
    x = np.random.default_rng(1).normal(size=(41, 17))
    monkeypatch.setattr(stats, "BOOTSTRAP_BLOCK_BYTES", 8 * 300 * 41 * block_columns)
    mean, low, high = stats.bootstrap_mean_ci_columns(x, n_resamples=300, confidence=0.9, seed=5)
    ref_low, ref_high = _unblocked(x, 300, 0.9, 5)
    assert np.array_equal(low, ref_low) and np.array_equal(high, ref_high)
    assert np.array_equal(mean, x.mean(axis=0))


# The 8B study: 256 pairs x 2 orders = 512 target prompts, 32 layers x 70 head sets (all, even,
# odd, 32 single heads, subsets), 2,000 resamples. Before blocking, the summary built a
# [2,000 x 512 x 2,240] float64 array: ~18 GB.
PEAK_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, polars as pl
    from bugscope.patching.summary import summary_table
    n_prompts, n_layers, n_sets = 512, 32, 70
    rng = np.random.default_rng(0)
    base = rng.normal(size=n_prompts)
    layer = np.repeat(np.arange(n_layers, dtype=np.int32), n_sets * n_prompts)
    head_set = np.tile(np.repeat([f"s{i:02d}" for i in range(n_sets)], n_prompts), n_layers)
    prompt = np.tile(np.arange(n_prompts, dtype=np.int32), n_layers * n_sets)
    df = pl.DataFrame({"method": "per_head", "positions": "aligned", "operation": "patch", "direction": "fix",
                       "target_format": "qa", "source_format": "simple", "layer": layer, "head_set": head_set,
                       "family": "subset", "pool": "all", "k": 1, "sample": 0, "heads": [[0]] * len(layer),
                       "prompt_id": prompt, "pair_id": prompt // 2, "pair_kind": "shorter_bigger",
                       "order": np.where(prompt % 2 == 0, "correct_first", "wrong_first"),
                       "logit_diff": rng.normal(size=len(layer)), "baseline_logit_diff": np.tile(base, n_layers * n_sets),
                       "source_logit_diff": np.tile(base[::-1], n_layers * n_sets)})
    # VmHWM belongs to this process's address space (ru_maxrss would carry over pytest's own peak
    # across exec on Linux).
    def hwm_mb():
        line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    before = hwm_mb()
    out = summary_table(df, n_resamples=2000, confidence=0.95, seed=0)
    print(json.dumps({"rows": out.height, "peak_mb": hwm_mb(), "before_mb": before}))
""")


@pytest.mark.slow
def test_patching_summary_at_8b_sizes_stays_under_2_gb():
    proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["rows"] == 32 * 70 * 2 * 3  # pair kind: all, shorter_bigger; order: all and each
    assert result["peak_mb"] <= 2048, result


def test_cluster_bootstrap_matches_scipy_when_every_row_is_its_own_cluster():
    from scipy.stats import bootstrap

    x = np.random.default_rng(2).normal(size=60)
    mean, low, high = stats.cluster_bootstrap_mean_ci_columns(x[:, None], np.arange(60), n_resamples=20000,
                                                              confidence=0.95, seed=0)
    ref = bootstrap((x,), np.mean, n_resamples=20000, confidence_level=0.95, method="percentile",
                    random_state=np.random.default_rng(1)).confidence_interval
    se = x.std(ddof=1) / np.sqrt(len(x))
    assert mean[0] == pytest.approx(x.mean())
    # Two Monte Carlo estimates of one percentile: equal within a few % of the standard error.
    assert low[0] == pytest.approx(ref.low, abs=0.1 * se) and high[0] == pytest.approx(ref.high, abs=0.1 * se)


def test_cluster_bootstrap_by_hand_on_a_clustered_case():
    # Three clusters (pairs) of 2, 1 and 3 rows; column 1 is a conditional rate with a NaN row.
    x = np.array([[1.0, 1.0], [3.0, np.nan], [10.0, 0.0], [2.0, 1.0], [2.0, 1.0], [5.0, 0.0]])
    clusters = np.array([7, 7, 3, 9, 9, 9])
    mean, low, high = stats.cluster_bootstrap_mean_ci_columns(x, clusters, n_resamples=50, confidence=0.8, seed=4)
    assert mean == pytest.approx([23 / 6, 3 / 5])
    # The same draws, by hand: clusters in sorted label order (3, 7, 9), all rows of a drawn cluster.
    draws = np.random.default_rng(4).integers(0, 3, size=(50, 3))
    rows = {0: [2], 1: [0, 1], 2: [3, 4, 5]}
    by_hand = []
    for d in draws:
        picked = x[[r for cl in d for r in rows[cl]]]
        by_hand.append(np.nanmean(picked, axis=0))
    ref_low, ref_high = np.nanquantile(np.array(by_hand), [0.1, 0.9], axis=0)
    assert low == pytest.approx(ref_low) and high == pytest.approx(ref_high)


def test_pair_level_ci_is_wider_than_the_prompt_level_one_when_orders_move_together():
    # Both orders of a pair get the same answer: 40 pairs are 40 observations, not 80.
    pair_correct = np.random.default_rng(0).random(40) < 0.5
    x = np.repeat(pair_correct.astype(float), 2)[:, None]
    pairs = np.repeat(np.arange(40), 2)
    _, p_low, p_high = stats.bootstrap_mean_ci_columns(x, n_resamples=4000, confidence=0.95, seed=0)
    _, c_low, c_high = stats.cluster_bootstrap_mean_ci_columns(x, pairs, n_resamples=4000, confidence=0.95, seed=0)
    assert (c_high - c_low)[0] > 1.3 * (p_high - p_low)[0]  # about sqrt(2) wider


def test_cluster_resampled_means_are_the_draws_of_the_cluster_bootstrap():
    # The helper behind the overlap summary: the same draws, so its percentiles are the CI of
    # cluster_bootstrap_mean_ci_columns, and a hand computation of one resample agrees.
    x = np.array([[1.0, 1.0], [3.0, np.nan], [10.0, 0.0], [2.0, 1.0], [2.0, 1.0], [5.0, 0.0]])
    clusters = np.array([7, 7, 3, 9, 9, 9])
    index = np.unique(clusters, return_inverse=True)[1]
    weights = stats.cluster_resample_weights(3, n_resamples=50, seed=4)
    assert weights.shape == (50, 3) and (weights.sum(axis=1) == 3).all()
    means = stats.cluster_resampled_means(x, index, weights)
    _, low, high = stats.cluster_bootstrap_mean_ci_columns(x, clusters, n_resamples=50, confidence=0.8, seed=4)
    ref_low, ref_high = np.nanquantile(means, [0.1, 0.9], axis=0)
    assert low == pytest.approx(ref_low) and high == pytest.approx(ref_high)
    rows = {0: [2], 1: [0, 1], 2: [3, 4, 5]}
    picked = x[[r for c in range(3) for _ in range(int(weights[0, c])) for r in rows[c]]]
    assert means[0] == pytest.approx(np.nanmean(picked, axis=0))
