"""Knows vs says (research notes section 11): does the residual stream at the decision position
carry the right comparison where the model's answer does not?

Per analysed layer, a linear probe reads "the number named first is the bigger one" from the
residual stream at the decision position. The label is balanced across what could stand in for it:
every pair kind comes in both question orders, and each kind weighs the same in training (the bug's
kind has more pairs than the controls), so "the first number is the shorter one", right on
shorter_bigger and wrong on longer_bigger, is at chance over the kinds: decimal length does not
predict the label. Accuracy is reported per kind.

- Cross-validation is grouped over number pairs (the two orders and every format of a pair stay on
  one side of each split), with the L2 penalty chosen inside each training fold (leave-one-out on
  its rows: it decides the penalty only, never a reported accuracy).
- A probe is trained on one format and tested on the held-out pairs of every format: the diagonal is
  "knows", the rest says whether the reading transfers across formats.
- The control: the same probe fitted and scored on shuffled labels (each number pair's label flipped
  or not at random, so its two orders keep opposite labels): a held-out pair's shuffled label is a
  coin flip whatever the residual stream holds, so it stays at chance unless the probe is broken.
- Beside each probe accuracy, the model's own accuracy on the same test prompts, and the paired gap
  (probe right minus output right, per prompt), with CIs over number pairs.

Light to import: NumPy, Polars and scikit-learn, no torch (the job runs beside the figures).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import polars as pl

from bugscope.data.prompts import BUG_PAIR_KIND, is_selection_pair, kind_order_splits
from bugscope.stats import cluster_bootstrap_mean_ci_columns, derived_seed

# Probe families: the probe itself and its shuffled-label control.
PROBE, SHUFFLED = "probe", "shuffled_labels"
# Summary variants: every layer on every pair; the layer of the largest gap, chosen and measured apart.
ALL_PAIRS, HELDOUT_SELECTED = "all_pairs", "heldout_selected"
_PROBE_STREAM = 32  # derived seed stream of the probes' label shuffles


def first_is_bigger(order: Sequence[str]) -> np.ndarray:
    """The probe's label: the number named first is the bigger one (the correct answer is asked first)."""
    return np.asarray(order) == "correct_first"


def _group_folds(groups: np.ndarray, n_folds: int) -> list[np.ndarray]:
    """Test-fold membership [n] per fold: the distinct groups dealt round-robin in sorted order."""
    labels = np.unique(groups)
    fold_of = {g: i % n_folds for i, g in enumerate(labels)}
    assigned = np.array([fold_of[g] for g in groups])
    return [assigned == k for k in range(n_folds)]


def kind_weights(kinds: np.ndarray) -> np.ndarray:
    """Per row, 1 / the rows of its pair kind: every kind weighs the same. The bug's kind has far more
    pairs than the controls; unweighted, "the first number is the shorter" would score on it alone."""
    labels, inverse, counts = np.unique(kinds, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse]


def fit_probe(x: np.ndarray, y: np.ndarray, weight: np.ndarray, alphas: Sequence[float]):
    """A standardised ridge probe whose L2 penalty is chosen on the training rows alone (efficient
    leave-one-out, sklearn's RidgeClassifierCV), every pair kind weighing the same."""
    from sklearn.linear_model import RidgeClassifierCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), RidgeClassifierCV(alphas=list(alphas))).fit(
        x, y, ridgeclassifiercv__sample_weight=weight)


def probe_predictions(vectors: Mapping[int, np.ndarray], meta: pl.DataFrame, *, train_formats: Sequence[str],
                      folds: int, alphas: Sequence[float], seed: int) -> pl.DataFrame:
    """One row per (layer, family, train format, test prompt): whether the probe reads the label right.

    `vectors`: layer -> [n, d] residual stream at the decision position, rows in `meta`'s order
    (prompt_id, pair_id, pair_kind, order, format)."""
    y = first_is_bigger(meta["order"].to_list())
    pairs = meta["pair_id"].to_numpy()
    formats = meta["format"].to_numpy()
    kinds = meta["pair_kind"].to_numpy()
    if len(np.unique(pairs)) < 2:
        raise ValueError("the probes need at least 2 number pairs (one to train on while the other is held out); "
                         "raise prompts.n_pairs or set probes.enabled: false.")
    outer = _group_folds(pairs, folds)
    # the shuffled control permutes the labels of whole number pairs, so that a pair keeps its two
    # orders' labels opposite and only their link to the residual stream is broken
    rng = np.random.default_rng(derived_seed(seed, _PROBE_STREAM))
    flip = dict(zip(np.unique(pairs), rng.random(len(np.unique(pairs))) < 0.5))
    shuffled = np.where([flip[p] for p in pairs], ~y, y)
    rows = []
    for layer, x in sorted(vectors.items()):
        for family, labels in ((PROBE, y), (SHUFFLED, shuffled)):
            for train_format in train_formats:
                right = np.zeros(len(y), dtype=bool)
                alpha_of = np.zeros(len(y))
                for test in outer:
                    train = ~test & (formats == train_format)
                    if not test.any():
                        continue  # fewer number pairs than folds
                    probe = fit_probe(x[train], labels[train], kind_weights(kinds[train]), alphas)
                    right[test] = probe.predict(x[test]) == labels[test]
                    alpha_of[test] = probe[-1].alpha_
                rows.append(meta.select("prompt_id", "pair_id", "pair_kind", "order", pl.col("format").alias("test_format"))
                            .with_columns(layer=pl.lit(layer, pl.Int32), family=pl.lit(family),
                                          train_format=pl.lit(train_format), probe_right=pl.Series(right),
                                          alpha=pl.Series(alpha_of)))
    return pl.concat(rows)


def _summary_rows(part: pl.DataFrame, key: dict, *, n_resamples: int, confidence: float, seed: int) -> list[dict]:
    """Rows per (pair kind, order; each also pooled) of one group of joined predictions."""
    out = []
    for kind, order, mask in kind_order_splits(part["pair_kind"].to_list(), part["order"].to_list()):
        sub = part.filter(pl.Series(mask))
        probe = sub["probe_right"].cast(pl.Float64).to_numpy()
        said = sub["output_right"].cast(pl.Float64).to_numpy()
        point, low, high = cluster_bootstrap_mean_ci_columns(
            np.stack([probe, said, probe - said], axis=1), sub["pair_id"].to_numpy(),
            n_resamples=n_resamples, confidence=confidence, seed=seed)
        out.append({**key, "pair_kind": kind, "order": order, "n_prompts": sub.height, "n_pairs": sub["pair_id"].n_unique(),
                    "probe_accuracy": point[0], "probe_accuracy_low": low[0], "probe_accuracy_high": high[0],
                    "output_accuracy": point[1], "output_accuracy_low": low[1], "output_accuracy_high": high[1],
                    "knows_minus_says": point[2], "knows_minus_says_low": low[2], "knows_minus_says_high": high[2],
                    "confidence": confidence})
    return out


def probe_summary(predictions: pl.DataFrame, scores: pl.DataFrame, *, n_resamples: int, confidence: float,
                  seed: int) -> pl.DataFrame:
    """Per (variant, layer, family, train format, test format, pair kind, order; kind and order also
    pooled): the probe's accuracy, the model's output accuracy on the same prompts and their paired
    gap (probe - output), with CIs over number pairs.

    variant `all_pairs`: every layer on every pair. variant `heldout_selected`: one layer per (train,
    test) format, the one whose gap on the bug's kind is largest on the selection pairs (even
    pair_id), measured on the held-out pairs (odd pair_id), for the probe and its shuffled control
    alike: "the largest gap over the layers" tested without the optimism of picking it on the same data."""
    boot = dict(n_resamples=n_resamples, confidence=confidence, seed=seed)
    joined = predictions.join(scores.select("prompt_id", pl.col("is_correct").alias("output_right")), on="prompt_id")
    out = []
    for (layer, family, train_format, test_format), part in joined.group_by(
            "layer", "family", "train_format", "test_format", maintain_order=True):
        out += _summary_rows(part, {"variant": ALL_PAIRS, "layer": layer, "family": family, "train_format": train_format,
                                    "test_format": test_format}, **boot)
    selection = is_selection_pair(pl.col("pair_id"))
    gaps = (joined.filter(selection, pl.col("family") == PROBE, pl.col("pair_kind") == BUG_PAIR_KIND)
            .group_by("train_format", "test_format", "layer")
            .agg((pl.col("probe_right").cast(pl.Float64) - pl.col("output_right").cast(pl.Float64)).mean().alias("gap"))
            .sort("train_format", "test_format", pl.col("gap"), "layer", descending=[False, False, True, False]))
    for (train_format, test_format), chosen in gaps.group_by("train_format", "test_format", maintain_order=True):
        layer = chosen["layer"][0]
        for family in (PROBE, SHUFFLED):
            part = joined.filter(~selection, pl.col("layer") == layer, pl.col("family") == family,
                                 pl.col("train_format") == train_format, pl.col("test_format") == test_format)
            out += _summary_rows(part, {"variant": HELDOUT_SELECTED, "layer": layer, "family": family,
                                        "train_format": train_format, "test_format": test_format}, **boot)
    return pl.DataFrame(out).sort("variant", "family", "train_format", "test_format", "pair_kind", "order", "layer")


def position_vectors(path, dtype: str, prompts: pl.DataFrame, column: str = "decision_pos") -> np.ndarray:
    """[n, d] float32, rows in `prompts`' order: each prompt's cached activation at the position its
    `column` names (the decision position by default), from a prompt activation file of
    bugscope.model.cache, read without torch."""
    return vectors_at(path, dtype, prompts, [column])[column]


def vectors_at(path, dtype: str, prompts: pl.DataFrame, columns) -> dict[str, np.ndarray]:
    """`position_vectors` for each position column of `columns`, the file read once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bugscope.io import arrow_to_numpy_vectors

    ids = prompts["prompt_id"].to_list()
    wanted = {c: dict(zip(ids, prompts[c].to_list())) for c in columns}
    positions = sorted({p for w in wanted.values() for p in w.values()})
    table = pq.read_table(path, filters=[("prompt_id", "in", sorted(ids)), ("position", "in", positions)])
    row_of = {(int(i), int(p)): r for r, (i, p) in enumerate(zip(table.column("prompt_id").to_numpy(),
                                                                 table.column("position").to_numpy()))}
    out = {}
    for column, pos in wanted.items():
        missing = [p for p in ids if (p, pos[p]) not in row_of]
        if missing:
            raise ValueError(f"{path} has no activation at the {column} of {len(missing)} prompts "
                             f"(e.g. prompt {missing[0]}): the cache must hold those positions (cache.positions: aligned).")
        take = pa.array([row_of[(p, pos[p])] for p in ids])
        out[column] = arrow_to_numpy_vectors(table.column("activation").take(take), dtype)
    return out
