"""Bootstrap confidence intervals, seeded so that a rerun gives the same interval, and derived seeds."""

from __future__ import annotations

import warnings

import numpy as np


def bootstrap_mean_ci(values, *, n_resamples: int, confidence: float, seed: int) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap of the mean of `values` (1-D). NaN for empty input."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_resamples, x.size))
    means = x[idx].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(x.mean()), float(low), float(high)


# The resampled values of one block of columns, [n_resamples, n, columns], stay below this size:
# at 8B sizes (2,000 resamples x 512 prompts x 2,000+ head sets) the whole array would be ~19 GB.
BOOTSTRAP_BLOCK_BYTES = 256 << 20


def bootstrap_mean_ci_columns(matrix, *, n_resamples: int, confidence: float, seed: int):
    """Column-wise version for an [n, m] array: the same resampled rows for every column.

    Returns three arrays of shape [m]: mean, low, high. Columns are resampled in blocks (the same
    draws, so the result does not depend on the block size) to bound memory.
    """
    x = np.asarray(matrix, dtype=np.float64)
    n, m = x.shape
    if n == 0:
        nan = np.full(m, np.nan)
        return nan, nan.copy(), nan.copy()
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n))
    alpha = (1 - confidence) / 2
    low, high = np.empty(m), np.empty(m)
    # No block of a lone column (unless the matrix has one): numpy sums a single column in another
    # order (pairwise), which would make the last digits depend on the block size.
    block = max(2, BOOTSTRAP_BLOCK_BYTES // (8 * n_resamples * n))
    starts = list(range(0, m, block))
    if len(starts) > 1 and m - starts[-1] == 1:
        starts.pop()
    for start, stop in zip(starts, [*starts[1:], m]):
        cols = slice(start, stop)
        means = x[:, cols][idx].mean(axis=1)  # [n_resamples, block]
        low[cols], high[cols] = np.quantile(means, [alpha, 1 - alpha], axis=0)
    return x.mean(axis=0), low, high


# --- cluster bootstrap: resample number pairs, not prompts ---------------------------------------


def cluster_bootstrap_mean_ci_columns(matrix, clusters, *, n_resamples: int, confidence: float, seed: int):
    """Mean per column of an [n, m] array with a percentile CI that resamples *clusters*.

    `clusters` [n] labels each row (a prompt) with its cluster (its number pair): a resample draws
    clusters with replacement and keeps every row of a drawn cluster, so the two orders of a pair
    (and its formats) move together, as they are not independent. NaN cells are left out of their
    column (a conditional rate: NaN where the row is not eligible). The resampled mean of a column
    is sum(w_c * S_c) / sum(w_c * N_c) over clusters c drawn w_c times, with S_c, N_c the cluster's
    sum and count: memory is [n_resamples, m], whatever the number of rows.

    Returns three arrays of shape [m]: mean, low, high (NaN for a column with no values).
    """
    x = np.asarray(matrix, dtype=np.float64)
    n, m = x.shape
    if n == 0:
        nan = np.full(m, np.nan)
        return nan, nan.copy(), nan.copy()
    cluster_of, c = _cluster_index(clusters)
    sums, counts = _cluster_sums(x, cluster_of, c)
    weights = cluster_resample_weights(c, n_resamples=n_resamples, seed=seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = (weights @ sums) / (weights @ counts)  # [n_resamples, m]; NaN where nothing was drawn
        point = sums.sum(0) / counts.sum(0)
    low, high = percentile_interval(means, confidence)
    return point, low, high


def cluster_bootstrap_ratio_ci_columns(numerator, denominator, clusters, *, n_resamples: int, confidence: float,
                                       seed: int):
    """sum(numerator) / sum(denominator) per column of two [n, m] arrays (a ratio of means, not a
    mean of ratios: research notes section 8), with the percentile CI of the same cluster
    resampling as `cluster_bootstrap_mean_ci_columns` (same seed, same draws). NaN cells are left
    out of both sums. A resample whose denominator sum is 0 has no ratio and is left out.
    """
    a = np.asarray(numerator, dtype=np.float64)
    b = np.asarray(denominator, dtype=np.float64)
    n, m = a.shape
    if n == 0:
        nan = np.full(m, np.nan)
        return nan, nan.copy(), nan.copy()
    both = ~np.isnan(a) & ~np.isnan(b)
    cluster_of, c = _cluster_index(clusters)
    sa, _ = _cluster_sums(np.where(both, a, np.nan), cluster_of, c)
    sb, _ = _cluster_sums(np.where(both, b, np.nan), cluster_of, c)
    weights = cluster_resample_weights(c, n_resamples=n_resamples, seed=seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        ra, rb = weights @ sa, weights @ sb
        boot = np.where(rb != 0, ra / rb, np.nan)
        ta, tb = sa.sum(0), sb.sum(0)
        point = np.where(tb != 0, ta / tb, np.nan)
    low, high = percentile_interval(boot, confidence)
    return point, low, high


def cluster_means(matrix, clusters) -> np.ndarray:
    """[n_clusters, m]: the mean of each cluster's rows (NaN cells left out), clusters in sorted
    label order: one row per independent unit for a test that assumes independence."""
    x = np.asarray(matrix, dtype=np.float64)
    sums, counts = _cluster_sums(x, *_cluster_index(clusters))
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts


def _cluster_index(clusters) -> tuple[np.ndarray, int]:
    labels, cluster_of = np.unique(np.asarray(clusters), return_inverse=True)
    return cluster_of, len(labels)


def _cluster_sums(x: np.ndarray, cluster_of: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Per cluster and column: the sum and the count of the non-NaN cells, [c, m] each."""
    valid = ~np.isnan(x)
    sums = np.zeros((c, x.shape[1]))
    counts = np.zeros((c, x.shape[1]))
    np.add.at(sums, cluster_of, np.where(valid, x, 0.0))
    np.add.at(counts, cluster_of, valid.astype(np.float64))
    return sums, counts


def cluster_resample_weights(n_clusters: int, *, n_resamples: int, seed: int) -> np.ndarray:
    """[n_resamples, n_clusters] counts: how often each cluster is drawn in each resample.

    The draws of `cluster_bootstrap_mean_ci_columns` (clusters in sorted label order). Several
    tables whose rows carry the same cluster labels share one weight matrix, so a statistic that
    combines them (a difference of two means) is computed within each resample.
    """
    draws = np.random.default_rng(seed).integers(0, n_clusters, size=(n_resamples, n_clusters))
    weights = np.zeros((n_resamples, n_clusters))
    np.add.at(weights, (np.repeat(np.arange(n_resamples), n_clusters), draws.ravel()), 1.0)
    return weights


def cluster_resampled_means(matrix, cluster_index, weights: np.ndarray) -> np.ndarray:
    """[n_resamples, m] resampled column means of an [n, m] array whose row i is in cluster
    `cluster_index[i]` (0 .. n_clusters - 1, the columns of `weights`).

    NaN cells are left out of their column; a resample that draws no value of a column is NaN
    there. By counts: sum(w_c * S_c) / sum(w_c * N_c), so memory is [n_clusters + n_resamples, m],
    whatever the number of rows.
    """
    x = np.asarray(matrix, dtype=np.float64)
    sums, counts = _cluster_sums(x, np.asarray(cluster_index, dtype=np.int64), weights.shape[1])
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weights @ sums) / (weights @ counts)


# --- seeds: every random draw derives from the config's master seed, here -----------------------
# New draws use `derived_seed`. The SAE seeds and the head-subset draws predate it and keep their
# own derivations, so that results made before stay reproducible bit for bit.


def derived_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from the master seed and labels (layer, statistic, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def layer_seed(master_seed: int, layer: int) -> int:
    """The seed of one layer's SAE (torch's generator wants it below 2**31), recorded with the SAE."""
    return (master_seed * 1_000_003 + 7919 * (layer + 1)) % (2**31 - 1)


def subset_generator(master_seed: int, layer: int, pool_index: int, k: int, *more: int) -> np.random.Generator:
    """The generator of the random k-subsets of one pool at one layer (`more`: finer keys, such as a
    composition): its own stream, so adding a size or a pool leaves the other draws alone."""
    return np.random.default_rng([master_seed, layer, pool_index, k, *more])


def percentile_interval(resampled: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval per column of [n_resamples, m], ignoring NaN resamples."""
    alpha = (1 - confidence) / 2
    if resampled.shape[-1] == 0:  # no column: numpy's quantile of an empty axis has no rows to unpack
        return np.empty(0), np.empty(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanquantile(resampled, [alpha, 1 - alpha], axis=0)
    return low, high


# --- proportions over few clusters, two-arm tests, multiplicity (research notes section 9) --------
# A percentile bootstrap over 4-6 clusters prints [0, 0] for 0 of 6; these intervals do not.


def clopper_pearson(k, n, confidence: float):
    """Exact (Clopper-Pearson) interval of k successes in n independent trials, element-wise."""
    from scipy.stats import beta

    k, n = np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64)
    alpha = 1 - confidence
    with np.errstate(invalid="ignore", divide="ignore"):
        low = np.where(k > 0, beta.ppf(alpha / 2, k, n - k + 1), 0.0)
        high = np.where(k < n, beta.ppf(1 - alpha / 2, k + 1, n - k), 1.0)
    empty = n <= 0
    return np.where(empty, np.nan, low), np.where(empty, np.nan, high)


def wilson_interval(p, n, confidence: float):
    """Wilson score interval of a proportion p observed on n (possibly fractional) trials, element-wise."""
    from scipy.stats import norm

    p, n = np.asarray(p, dtype=np.float64), np.asarray(n, dtype=np.float64)
    z = norm.ppf(1 - (1 - confidence) / 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    bad = ~(n > 0)
    return np.where(bad, np.nan, np.clip(centre - half, 0, 1)), np.where(bad, np.nan, np.clip(centre + half, 0, 1))


def clustered_proportion_columns(matrix, clusters, confidence: float) -> dict[str, np.ndarray]:
    """Per column of an [n, m] array of outcomes in [0, 1] (NaN: the row is not counted): the rate,
    its interval and the number of clusters (number pairs) it rests on.

    Where every cluster gives at most one 0/1 outcome, the interval is Clopper-Pearson. Where a
    cluster gives several (the two orders of a pair), it is Wilson's on the design-effect-adjusted
    n: n / deff, with deff the variance of the cluster ratio estimator over the variance under
    independence (at least 1). A rate of exactly 0 or 1 has no variance to measure deff with, so
    it counts each cluster once. Returns rate, low, high, n_clusters, n_effective, each [m].
    """
    x = np.asarray(matrix, dtype=np.float64)
    m = x.shape[1]
    cluster_of, c = _cluster_index(clusters)
    sums, counts = _cluster_sums(x, cluster_of, c)  # [c, m]
    k, n = sums.sum(0), counts.sum(0)
    n_clusters = (counts > 0).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(n > 0, k / n, np.nan)
        resid = ((sums - rate * counts) ** 2).sum(0)
        var_cluster = n_clusters / np.maximum(n_clusters - 1, 1) * resid / (n * n)
        var_iid = rate * (1 - rate) / n
        deff = np.where(var_iid > 0, np.maximum(1.0, var_cluster / var_iid), np.nan)
        n_eff = np.where(var_iid > 0, n / deff, n_clusters.astype(np.float64))
    binary = np.all(np.isnan(x) | (x == 0) | (x == 1), axis=0)
    single = (counts <= 1).all(0) & binary
    cp_low, cp_high = clopper_pearson(np.round(k), n, confidence)
    w_low, w_high = wilson_interval(rate, n_eff, confidence)
    low, high = np.where(single, cp_low, w_low), np.where(single, cp_high, w_high)
    empty = n == 0
    return {"rate": rate, "low": np.where(empty, np.nan, low), "high": np.where(empty, np.nan, high),
            "n_clusters": n_clusters.astype(np.int64), "n_effective": np.where(empty, 0.0, n_eff) + np.zeros(m)}


def fisher_exact_p(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided Fisher exact p of k1/n1 against k2/n2 (1.0 when either arm is empty)."""
    from scipy.stats import fisher_exact

    if n1 <= 0 or n2 <= 0:
        return 1.0
    return float(fisher_exact([[k1, n1 - k1], [k2, n2 - k2]])[1])


def holm_adjusted(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values (familywise error), in the input order."""
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    m = len(p)
    adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order]) if m else p
    out = np.empty(m)
    out[order] = np.minimum(adjusted, 1.0)
    return out


def fewest_clusters_to_decide(*, at_least: float | None = None, at_most: float | None = None,
                              confidence: float, limit: int = 10_000) -> int | None:
    """The fewest independent targets on which a region can be decided at all with an exact
    interval: all of them fixed clears `at_least`, none of them clears `at_most` (None past limit)."""
    for n in range(1, limit + 1):
        low, high = clopper_pearson(n if at_least is not None else 0, n, confidence)
        if (at_least is None or low >= at_least) and (at_most is None or high <= at_most):
            return n
    return None
