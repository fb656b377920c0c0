"""The reading features (research notes section 11; bugscope.data.reading): the SAE features every
reading family shares at the decision position, chosen on the training wording, and whether they
fire more in the buggy format, tested as the discriminative stage tests features
(bugscope.features.discriminative). Their ablation runs in the reading model job
(bugscope.model.steering) and is summarised with the steering table (bugscope.data.reading).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from bugscope.data.prompts import ALL, BUG_PAIR_KIND, DECIMAL, is_selection_pair
from bugscope.data.reading import TEST, kind_groups, pair_ci_row
from bugscope.features.discriminative import interval_columns, paired_test, stratified_unpaired_test
from bugscope.stats import derived_seed

_FEATURE_STREAM = 35  # derived seed stream of the random feature sets


def select_reading_features(acts: np.ndarray, family: np.ndarray, *, top_n: int, random_sets: int,
                            seed: int, layer: int) -> tuple[list[int], list[list[int]], np.ndarray]:
    """(the reading features, the random control sets, every feature's score) from the SAE codes
    [n, d_sae] of the training wording's decision positions: the top_n features by their score, the
    smallest margin by which a reading family's mean activation exceeds the decimal family's, among
    those that score above 0. The smallest margin, not the mean: a feature of one family's own tokens
    (the month names of the dates) would otherwise outscore any reading the families share. Each
    random set: as many features drawn from those active on some training row (the reading features
    left out)."""
    decimal = acts[family == DECIMAL].mean(0)
    score = np.min([acts[family == f].mean(0) - decimal for f in sorted(set(family)) if f != DECIMAL], axis=0)
    order = np.argsort(-score, kind="stable")
    chosen = [int(i) for i in order[:top_n] if score[i] > 0]
    active = np.flatnonzero((acts > 0).any(0))
    pool = np.setdiff1d(active, chosen)
    rng = np.random.default_rng(derived_seed(seed, _FEATURE_STREAM, layer))
    randoms = [sorted(int(i) for i in rng.choice(pool, size=min(len(chosen), len(pool)), replace=False))
               for _ in range(random_sets)]
    return chosen, randoms, score


def feature_summary(reading_acts: pl.DataFrame, analysis_acts: pl.DataFrame, *, buggy_format: str,
                    correct_format: str, test: str, n_resamples: int, confidence: float, seed: int) -> pl.DataFrame:
    """Per layer, the summed activation of its reading features at the decision position, with CIs
    over number pairs: on each family's held-out wording and pairs (the test wording, odd pair ids:
    the features were chosen on the training wording), and on the analysis prompts per format and
    kind with the buggy - correct difference paired per question: do they fire more in the buggy format?
    Each comparison is also tested as the discriminative stage tests features (`test`: wilcoxon or
    ttest; bugscope.features.discriminative): `reading_over_decimal` (the held-out reading families
    over the decimal family, a ratio of means stratified by question order, CI over number pairs) by
    the stratified two-sample test on pair means, and `buggy_minus_correct` by the paired test on pair
    means (`p_value`).

    `reading_acts` / `analysis_acts`: (layer, prompt_id, pair_id, family / pair_kind, format, wording
    / question_id, activation)."""
    boot = dict(n_resamples=n_resamples, confidence=confidence, seed=seed)
    out = []
    for (layer,), acts in reading_acts.group_by("layer", maintain_order=True):
        held = acts.filter(pl.col("wording") == TEST, ~is_selection_pair(pl.col("pair_id")))
        for family in sorted(set(held["family"])):
            f = held.filter(pl.col("family") == family)
            out.append({"layer": layer, "measure": "heldout_activation", "family": family, "format": ALL,
                        "pair_kind": BUG_PAIR_KIND, **pair_ci_row(f["activation"].to_numpy(), f["pair_id"].to_numpy(), boot)})
        # one row per (pair, order): the formats' mean, so that within an order the rows are independent
        units = held.group_by("pair_id", "order", "family").agg(pl.col("activation").mean()).sort("pair_id", "order")
        a, b = units.filter(pl.col("family") != DECIMAL), units.filter(pl.col("family") == DECIMAL)
        p, _ = stratified_unpaired_test(a["activation"].to_numpy()[:, None], b["activation"].to_numpy()[:, None],
                                        a["order"].to_numpy(), b["order"].to_numpy(), test)
        ratio = interval_columns(a["activation"].to_numpy()[:, None], b["activation"].to_numpy()[:, None],
                                 a["pair_id"].to_numpy(), b["pair_id"].to_numpy(), boot=boot,
                                 strata_a=a["order"].to_numpy(), strata_b=b["order"].to_numpy())
        out.append({"layer": layer, "measure": "reading_over_decimal", "family": ALL, "format": ALL,
                    "pair_kind": BUG_PAIR_KIND, "n_prompts": held.height, "n_pairs": held["pair_id"].n_unique(),
                    "value": float(ratio["ratio"][0]), "value_low": float(ratio["ratio_low"][0]),
                    "value_high": float(ratio["ratio_high"][0]), "p_value": float(p[0])})
    for (layer,), acts in analysis_acts.group_by("layer", maintain_order=True):
        for kind, rows in kind_groups(acts):
            for fmt in (buggy_format, correct_format):
                f = rows.filter(pl.col("format") == fmt)
                out.append({"layer": layer, "measure": "activation", "family": DECIMAL, "format": fmt, "pair_kind": kind,
                            **pair_ci_row(f["activation"].to_numpy(), f["pair_id"].to_numpy(), boot)})
            paired = (rows.filter(pl.col("format") == buggy_format).select("question_id", "pair_id", pl.col("activation").alias("b"))
                      .join(rows.filter(pl.col("format") == correct_format).select("question_id", pl.col("activation").alias("c")),
                            on="question_id"))
            means = paired.group_by("pair_id").agg(pl.col("b").mean(), pl.col("c").mean())
            p, _ = paired_test(means["b"].to_numpy()[:, None], means["c"].to_numpy()[:, None], test)
            out.append({"layer": layer, "measure": "buggy_minus_correct", "family": DECIMAL,
                        "format": f"{buggy_format}-{correct_format}", "pair_kind": kind,
                        **pair_ci_row((paired["b"] - paired["c"]).to_numpy(), paired["pair_id"].to_numpy(), boot),
                        "p_value": float(p[0])})
    return pl.DataFrame([{"p_value": None, **row} for row in out]).with_columns(confidence=pl.lit(confidence))
