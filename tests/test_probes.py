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
            for r in summary.filter(pl.col("order") == ALL, pl.col("variant") == "all_pairs").iter_rows(named=True)}


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


def _probe_table(gap, gap_ci, shuffled, shuffled_ci) -> pl.DataFrame:
    """The rows the knows-vs-says claim reads: the held-out selected layer, probe and shuffled control."""
    rows = []
    for family, kind, value, ci, metric in ((PROBE, "shorter_bigger", gap, gap_ci, "knows_minus_says"),
                                            (SHUFFLED, ALL, shuffled, shuffled_ci, "probe_accuracy")):
        row = {"variant": "heldout_selected", "family": family, "train_format": "qa", "test_format": "qa",
               "pair_kind": kind, "order": ALL, "layer": 7, "n_pairs": 32, "n_prompts": 64,
               "probe_accuracy": 0.5, "probe_accuracy_low": 0.4, "probe_accuracy_high": 0.6,
               "knows_minus_says": 0.0, "knows_minus_says_low": -0.1, "knows_minus_says_high": 0.1}
        row |= {metric: value, f"{metric}_low": ci[0], f"{metric}_high": ci[1]}
        rows.append(row)
    return pl.DataFrame(rows)


@pytest.mark.parametrize("gap, gap_ci, shuffled, shuffled_ci, verdict", [
    (0.45, (0.36, 0.53), 0.5, (0.41, 0.59), "holds"),       # knows, says otherwise; the control at chance
    (0.0, (-0.06, 0.05), 0.5, (0.41, 0.59), "fails"),       # the probe reads no more than the model says
    (0.45, (0.36, 0.53), 0.8, (0.7, 0.9), "fails"),         # the shuffled probe reads its labels: broken
    (0.12, (-0.02, 0.25), 0.5, (0.41, 0.59), "inconclusive"),
])
def test_the_knows_but_says_otherwise_claim(gap, gap_ci, shuffled, shuffled_ci, verdict):
    from bugscope.claims.evaluate import evaluate_claim
    from bugscope.claims.spec import load_ledger
    from tests.conftest import REPO
    from tests.test_claims import ctx

    claim = next(c for c in load_ledger(REPO / "config" / "claims.yaml") if c["id"] == "knows_but_says_otherwise")
    result = evaluate_claim(claim, {"probes": _probe_table(gap, gap_ci, shuffled, shuffled_ci)}, ctx())
    assert result["verdict"] == verdict, result["detail"]


def test_the_selected_layer_is_chosen_on_even_pairs_and_measured_on_odd_ones():
    """Layer 3 carries the label weakly on every pair, layer 5 strongly on the even (selection) pairs
    only: the selection picks layer 5, and its held-out rows show it worth nothing on the odd pairs,
    where layer 3 would have read the label."""
    meta = _meta()
    rng = np.random.default_rng(2)
    y = first_is_bigger(meta["order"].to_list())
    even = (meta["pair_id"].to_numpy() % 2) == 0
    weak = rng.normal(size=(meta.height, 16))
    weak[:, 0] += np.where(y, 1.0, -1.0)
    selection_only = rng.normal(size=(meta.height, 16))
    selection_only[:, 0] += np.where(even, np.where(y, 3.0, -3.0), 0.0)
    pred = probe_predictions({3: weak, 5: selection_only}, meta, train_formats=["qa"], folds=5,
                             alphas=[0.1, 1.0, 10.0], seed=0)
    summary = probe_summary(pred, meta.select("prompt_id", is_correct=pl.lit(False)), **BOOT)

    def row(variant, layer=None):
        rows = summary.filter(pl.col("variant") == variant, pl.col("family") == PROBE, pl.col("test_format") == "qa",
                              pl.col("pair_kind") == ALL, pl.col("order") == ALL)
        return (rows if layer is None else rows.filter(pl.col("layer") == layer)).row(0, named=True)
    held = row("heldout_selected")
    assert held["layer"] == 5 and held["n_pairs"] == sum(KINDS.values()) // 2  # the odd pair ids only
    assert held["probe_accuracy_low"] < 0.5 < held["probe_accuracy_high"]
    assert row("all_pairs", 5)["probe_accuracy_low"] > 0.6  # on all pairs the even ones would carry it
