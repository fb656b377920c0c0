"""The seed's feature and SAE claims added to the ledger with the paper's (layer-25 features, the
up/down pattern, the feature -> head lists, the reconstruction loss), each on made-up tables.

The shipped checks of these claims read columns that have no interval (a ratio's lower bound, a
mean activation, a ratio of two means, a direct attribution, a reconstruction error), and a point
estimate decides nothing: as shipped, each is inconclusive on any table, which the tests pin. Their
rows and regions are tested on `exact` copies (every check `exact: true`, as if its values had no
sampling error): holds where the claim is true, fails where it is false. Where a table can carry an
interval the shipped check reads (the attribution's), the shipped claim decides on it."""

from __future__ import annotations

import copy

import polars as pl
import pytest

from bugscope.claims.evaluate import evaluate, evaluate_claim
from bugscope.claims.spec import load_ledger
from tests.conftest import REPO
from tests.test_claims import ctx

LEDGER = {c["id"]: c for c in load_ledger(REPO / "config" / "claims.yaml")}
LLAMA = ctx(model="Llama-3.1-8B-Instruct", focus=(10,), num_heads=32, num_layers=32)
MLP_SET = "mlp_out"  # the set of config/llama31_8b.yaml with the seed's release and site
NO_INTERVAL = "no interval: a point estimate decides nothing"


def exact(claim_id: str) -> dict:
    """The shipped claim with every check `exact: true`: its point values decide."""
    c = copy.deepcopy(LEDGER[claim_id])
    for form in c["forms"]:
        for check in form["checks"]:
            check["exact"] = True
    return c


def verdict(claim: str | dict, context=LLAMA, **tables) -> dict:
    """The ledger row of a shipped claim (by id) or of a copy of one."""
    return evaluate_claim(LEDGER[claim] if isinstance(claim, str) else claim, tables, context)


def undecided(r: dict, checks: int) -> bool:
    """Inconclusive with every one of its `checks` inconclusive for want of an interval."""
    return (r["verdict"] == "inconclusive" and r["detail"].count("-> inconclusive") == checks
            and "-> pass" not in r["detail"] and "-> fail" not in r["detail"])


def named(layer: int, features: dict[int, tuple[float, float]]) -> pl.DataFrame:
    """Named-feature rows {feature_id: (mean_buggy, mean_correct)} of the MLP-output set, with a
    ratio CI of +/- 5 % around the ratio."""
    rows = [{"sae_set": MLP_SET, "layer": layer, "category": "c", "feature_id": f, "mean_buggy": b, "mean_correct": c,
             "ratio": b / c, "ratio_low": 0.95 * b / c, "ratio_high": 1.05 * b / c, "n_pairs": 40}
            for f, (b, c) in features.items()]
    return pl.DataFrame(rows)


def test_layer_25_features_at_their_activations_and_directions():
    right = named(25, {11813: (2.5, 1.5), 20139: (2.6, 1.0), 15508: (3.5, 2.0), 10049: (1.2, 2.5), 11664: (1.0, 2.3)})
    # 15508 as active in both formats: not discriminative for the wrong answer
    flat = named(25, {11813: (2.5, 1.5), 20139: (2.6, 1.0), 15508: (3.5, 3.5)})
    # the right directions at a tenth of the stated activation
    small = named(25, {10049: (0.1, 0.25), 11664: (0.1, 0.23)})
    # As shipped: ratio_low and mean_buggy / mean_correct have no interval, true claim or false.
    # (The old point-estimate rule decided these; see the module docstring.)
    for table in (right, flat):
        r = verdict("layer_25_wrong_answer_features", named_features=table)
        assert undecided(r, 4) and NO_INTERVAL in r["detail"]
    r = verdict("layer_25_wrong_answer_features", named_features=flat)
    assert r["measured"] == pytest.approx(0.95) and "feature_id=15508" in r["selected"]  # the worst of the three
    assert undecided(verdict("layer_25_correct_answer_features", named_features=right), 3)
    wrong_answer, correct_answer = exact("layer_25_wrong_answer_features"), exact("layer_25_correct_answer_features")
    assert verdict(wrong_answer, named_features=right)["verdict"] == "holds"
    assert verdict(correct_answer, named_features=right)["verdict"] == "holds"
    assert verdict(wrong_answer, named_features=flat)["verdict"] == "fails"
    r = verdict(correct_answer, named_features=small)
    assert r["verdict"] == "fails" and "requires 1.86 <= mean_correct <= 3.1 -> fail" in r["detail"]
    # the ids at another layer only: not testable, never scored on other rows
    other = named(10, {11813: (2.5, 1.5), 20139: (2.6, 1.0), 15508: (3.5, 2.0)})
    for claim in ("layer_25_wrong_answer_features", wrong_answer):
        assert verdict(claim, named_features=other)["verdict"] == "not testable here"


def discriminative(layer: int, up: tuple[float, float], down: tuple[float, float], comparison: str,
                   q_value: float = 0.001) -> pl.DataFrame:
    """Rank-0 rows of one comparison: (mean in a, in b) of the top up and down feature, the same on
    the held-out pairs, and its BH q-value."""
    return pl.DataFrame([{"layer": layer, "comparison": comparison, "direction": d, "rank": 0, "feature_id": f,
                          "mean_a": a, "mean_b": b, "heldout_mean_a": a, "heldout_mean_b": b, "q_value": q_value,
                          "n_a": 40, "n_b": 40}
                         for d, f, (a, b) in (("up", 1, up), ("down", 2, down))])


def test_agnostic_layer_25_features_are_discriminative_after_the_fdr_correction():
    depth_layer = round(0.80645 * 13)  # ctx()'s 14 layers
    holds = discriminative(depth_layer, (3.0, 1.0), (1.0, 3.0), "wrong_vs_right")
    small = ctx()
    # As shipped: a ratio of two means (mean_a / mean_b) has no interval; the q gate passes
    r = verdict("layer_25_wrong_answer_features", small, discriminative_features=holds)
    assert r["verdict"] == "inconclusive" and NO_INTERVAL in r["detail"] and "q_value: p=0.001" in r["detail"]
    assert r["form"] == "agnostic" and r["measured"] == 3.0
    wrong_answer, correct_answer = exact("layer_25_wrong_answer_features"), exact("layer_25_correct_answer_features")
    assert verdict(wrong_answer, small, discriminative_features=holds)["verdict"] == "holds"
    assert verdict(correct_answer, small, discriminative_features=holds)["verdict"] == "holds"
    # the top of many features, no larger than chance once all of them are corrected for: the old
    # rule failed it; a q gate not passed now only withholds the verdict (not significant is not
    # shown to be null)
    chance = discriminative(depth_layer, (3.0, 1.0), (1.0, 3.0), "wrong_vs_right", q_value=0.4)
    for claim in (wrong_answer, correct_answer):
        r = verdict(claim, small, discriminative_features=chance)
        assert r["verdict"] == "inconclusive" and "q_value: p=0.4" in r["detail"]
    # significant but barely different
    flat = discriminative(depth_layer, (1.05, 1.0), (1.0, 1.05), "wrong_vs_right")
    assert verdict(wrong_answer, small, discriminative_features=flat)["verdict"] == "fails"
    assert verdict(correct_answer, small, discriminative_features=flat)["verdict"] == "fails"
    # barely different and not significant: the failed ratio decides
    flat_chance = discriminative(depth_layer, (1.05, 1.0), (1.0, 1.05), "wrong_vs_right", q_value=0.4)
    assert verdict(wrong_answer, small, discriminative_features=flat_chance)["verdict"] == "fails"


def test_the_q_gates_are_holm_adjusted_within_the_section():
    depth_layer = round(0.80645 * 13)
    table = {"discriminative_features": discriminative(depth_layer, (3.0, 1.0), (1.0, 3.0), "wrong_vs_right",
                                                       q_value=0.03)}
    wrong_answer, correct_answer = exact("layer_25_wrong_answer_features"), exact("layer_25_correct_answer_features")
    assert verdict(wrong_answer, ctx(), **table)["verdict"] == "holds"  # alone: 0.03 <= 0.05
    assert wrong_answer["section"] == correct_answer["section"] == "features"
    ledger = evaluate([wrong_answer, correct_answer], table, ctx()).filter(pl.col("section") == "features")
    # two tests in the section: Holm makes each 0.06
    assert ledger["verdict"].to_list() == ["inconclusive", "inconclusive"]
    assert ledger["family_tests"].to_list() == [2, 2] and "Holm-adjusted 0.06" in ledger["detail"][0]


def test_up_down_pattern_between_formats():
    pattern = {25523: (15.0, 10.0), 22441: (4.6, 2.8), 18967: (2.0, 1.0), 31205: (1.0, 2.0), 10049: (1.0, 1.8)}
    raised = {**pattern, 10049: (2.0, 1.0)}  # 10049 raised in Q&A too: the "suppressed" half is false
    # As shipped: ratio_low / ratio_high have no interval of their own
    assert undecided(verdict("format_up_down_pattern", named_features=named(10, pattern)), 2)
    assert undecided(verdict("format_up_down_pattern", named_features=named(10, raised)), 2)
    up_down = exact("format_up_down_pattern")
    assert verdict(up_down, named_features=named(10, pattern))["verdict"] == "holds"
    r = verdict(up_down, named_features=named(10, raised))
    assert r["verdict"] == "fails" and "requires max(ratio_high) <= 1 -> fail" in r["detail"]
    # on any model: the top held-out buggy-up and buggy-down features keep their directions
    holds = discriminative(5, (2.0, 1.0), (1.0, 2.0), "buggy_vs_correct_heldout")
    flipped = discriminative(5, (2.0, 1.0), (2.0, 1.0), "buggy_vs_correct_heldout")
    r = verdict("format_up_down_pattern", ctx(), discriminative_features=holds)
    assert r["form"] == "agnostic" and undecided(r, 2)
    assert verdict(up_down, ctx(), discriminative_features=holds)["verdict"] == "holds"
    assert verdict(up_down, ctx(), discriminative_features=flipped)["verdict"] == "fails"


LISTS = {10049: range(0, 16, 2), 11664: range(2, 18, 2), 8234: range(0, 32, 4), 15789: range(6, 22, 2),
         22156: range(0, 32, 2)}


def attribution(writers: dict[int, set[int]], ci: float | None = None) -> pl.DataFrame:
    """Head -> feature direct attribution at layer 10 in both formats: 1 from each writing head, 0
    from the others; with `ci`, an interval of +/- ci around each (the producer writes none)."""
    rows = [{"sae_set": MLP_SET, "layer": 10, "feature_id": f, "format": fmt, "component": "head", "head": h,
             "direct_attribution": float(h in heads)}
            for f, heads in writers.items() for fmt in ("qa", "simple") for h in range(32)]
    df = pl.DataFrame(rows)
    if ci is None:
        return df
    return df.with_columns(direct_attribution_low=pl.col("direct_attribution") - ci,
                           direct_attribution_high=pl.col("direct_attribution") + ci)


def test_feature_head_lists():
    listed = {f: set(h) for f, h in LISTS.items()}
    wrong = {**listed, 8234: set(range(1, 32, 4))}  # 8234 written by the odd heads: its list is false
    # As shipped: the attribution table has no interval, so no comparison decides
    for writers in (listed, wrong):
        r = verdict("feature_head_lists", head_feature_attribution=attribution(writers))
        assert undecided(r, 5) and "no interval to compare" in r["detail"]
    # with an interval, the separate intervals of the listed heads' worst and the others' best decide
    assert verdict("feature_head_lists", head_feature_attribution=attribution(listed, 0.1))["verdict"] == "holds"
    r = verdict("feature_head_lists", head_feature_attribution=attribution(wrong, 0.1))
    assert r["verdict"] == "fails" and "check 3: 0 [-0.1, 0.1]" in r["detail"]
    # one listed head that writes nothing, tied with the unlisted ones: the point rule failed
    # "every listed head above every other"; equal intervals show neither above nor below
    gap = {**listed, 10049: set(range(0, 14, 2))}
    r = verdict("feature_head_lists", head_feature_attribution=attribution(gap, 0.1))
    assert r["verdict"] == "inconclusive" and r["detail"].count("-> inconclusive") == 1
    assert "check 1: 0 [-0.1, 0.1]" in r["detail"]


def test_reconstruction_loss_of_the_mlp_out_set():
    def quality(mse, sets=("residual", MLP_SET)):
        return pl.DataFrame({"sae_set": list(sets), "layer": [10] * len(sets), "mse_corpus": [0.5, mse][:len(sets)],
                             "ev_corpus": [0.7, 0.9][:len(sets)], "n_tokens_corpus": [5000] * len(sets)})
    # As shipped: the corpus MSE has no interval; the MLP-output set's row is the one read
    r = verdict("sae_reconstruction_loss", sae_quality=quality(0.009))
    assert undecided(r, 1) and (r["sae_set"], r["measured"], r["n"]) == (MLP_SET, 0.009, 5000)
    assert "beside: ev_corpus=0.9" in r["detail"]
    loss = exact("sae_reconstruction_loss")
    r = verdict(loss, sae_quality=quality(0.009))
    assert (r["verdict"], r["sae_set"]) == ("holds", MLP_SET)  # the residual set's 0.5 is not read
    assert verdict(loss, sae_quality=quality(0.02))["verdict"] == "fails"
    # a run without the MLP-output set cannot test the seed's SAEs
    r = verdict(loss, sae_quality=quality(0.009, sets=("residual",)))
    assert r["verdict"] == "not testable here" and MLP_SET in r["detail"]
