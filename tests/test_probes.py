"""Knows vs says (bugscope.data.probes): the probe on made-up activations where the label is linearly
present and where it is not, the shuffled-label control, and the ci run's probe table."""

import numpy as np
import polars as pl
import pytest

from bugscope.data.probes import PROBE, SHUFFLED, first_is_bigger, kind_weights, probe_predictions, probe_summary
from bugscope.data.prompts import ALL

BOOT = dict(n_resamples=500, confidence=0.95, seed=0)
KINDS = {"shorter_bigger": 40, "longer_bigger": 12, "same_length": 12}


def _meta():
    rows = []
    for kind, n in KINDS.items():
        for _ in range(n):
            pair = len(rows) // 4
            for order in ("correct_first", "wrong_first"):
                for fmt in ("qa", "simple"):
                    rows.append({"prompt_id": len(rows), "pair_id": pair, "pair_kind": kind, "order": order,
                                 "format": fmt})
    return pl.DataFrame(rows)


def _run(x, meta):
    pred = probe_predictions({3: x}, meta, train_formats=["qa"], folds=5, alphas=[0.1, 1.0, 10.0, 100.0], seed=0)
    scores = meta.select("prompt_id", is_correct=pl.lit(False))  # the model never right: output accuracy 0
    summary = probe_summary(pred, scores, **BOOT)
    return {(r["family"], r["test_format"], r["pair_kind"]): r
            for r in summary.filter(pl.col("order") == ALL).iter_rows(named=True)}


def test_a_label_the_activations_carry_is_read_and_the_shuffled_control_stays_at_chance():
    meta = _meta()
    rng = np.random.default_rng(0)
    y = first_is_bigger(meta["order"].to_list())
    x = rng.normal(size=(meta.height, 32))
    x[:, 0] += np.where(y, 3.0, -3.0)  # the label along one direction, in both formats
    out = _run(x, meta)
    for fmt in ("qa", "simple"):  # trained on qa; held-out pairs of both formats
        for kind in KINDS:
            assert out[(PROBE, fmt, kind)]["probe_accuracy"] >= 0.9, (fmt, kind)
    pooled = out[(PROBE, "qa", ALL)]
    assert pooled["knows_minus_says"] == pytest.approx(pooled["probe_accuracy"])  # the model says 0
    shuffled = out[(SHUFFLED, "qa", ALL)]
    assert shuffled["probe_accuracy_low"] < 0.5 < shuffled["probe_accuracy_high"]


def test_activations_without_the_label_give_a_probe_at_chance():
    meta = _meta()
    out = _run(np.random.default_rng(1).normal(size=(meta.height, 32)), meta)
    pooled = out[(PROBE, "qa", ALL)]
    assert pooled["probe_accuracy_low"] < 0.5 < pooled["probe_accuracy_high"]
    assert pooled["n_pairs"] == sum(KINDS.values())


def test_every_pair_kind_weighs_the_same():
    w = kind_weights(np.array(["a"] * 6 + ["b"] * 2))
    assert w[:6].sum() == pytest.approx(w[6:].sum()) == pytest.approx(1.0)


def test_the_ci_runs_probes_cover_every_cached_resid_post_layer(ci_workflow, ci_config):
    from bugscope import layout, tables
    from bugscope.model.sites import parse_hook_name
    from bugscope.run.stages import probe_hooks

    summary = tables.frame(tables.PROBES, ci_config, ci_workflow / layout.PROBES)
    layers = {parse_hook_name(h)[0] for h in probe_hooks(ci_config)}
    assert set(summary["layer"]) == layers
    assert set(summary["family"]) == {PROBE, SHUFFLED}
    assert set(summary["train_format"]) == {ci_config["prompts"]["buggy_format"], ci_config["prompts"]["correct_format"]}
    assert set(summary["test_format"]) == set(ci_config["prompts"]["formats"])
    assert summary["probe_accuracy"].is_between(0, 1).all()
    assert (ci_workflow / layout.figure("probes", "svg")).stat().st_size > 1000
