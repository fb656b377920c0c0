"""The seed's feature and SAE claims added to the ledger with the paper's (layer-25 features, the
up/down pattern, the feature -> head lists, the reconstruction loss), each on made-up tables.

The shipped discriminative and named-feature checks read ratios with an interval (the named
features' `ratio_low` / `ratio_high`; the discriminative table's `ratio` of every comparison and
`heldout_ratio` of the held-out one, each over number pairs), so they hold where the interval lies
inside the claim's region, fail where it lies outside, and are inconclusive where it straddles an
edge (a bound at the ratio's null 1 is strict). Checks that read a column without an interval (a
mean activation, a direct attribution, a reconstruction error) decide nothing on a point estimate,
which the tests pin; their rows and regions are tested on `exact` copies (every check `exact:
true`, as if its values had no sampling error)."""

from __future__ import annotations

import copy

import polars as pl
import pytest

from bugscope.claims.evaluate import evaluate, evaluate_claim
from bugscope.claims.spec import load_ledger
from bugscope.features.discriminative import DISCRIMINATIVE_COLUMNS
from bugscope.features.named import NAMED_SCHEMA
from tests.conftest import REPO
from tests.test_claims import ctx

LEDGER = {c["id"]: c for c in load_ledger(REPO / "config" / "claims.yaml")}
LLAMA = ctx(model="Llama-3.1-8B-Instruct", focus=(10,), num_heads=32, num_layers=32)
MLP_SET = "mlp_out"  # the set of config/llama31_8b.yaml with the seed's release and site
NO_INTERVAL = "no interval: a point estimate decides nothing"
LAYER_25 = ("layer_25_wrong_answer_features", "layer_25_correct_answer_features")


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
    """Named-feature rows {feature_id: (mean_buggy, mean_correct)} of the MLP-output set, with
    intervals of +/- 5 % around the ratio and the means, over 40 number pairs."""
    rows = [{"sae_set": MLP_SET, "layer": layer, "category": "c", "feature_id": f, "mean_buggy": b, "mean_correct": c,
             "ratio": b / c, "ratio_low": 0.95 * b / c, "ratio_high": 1.05 * b / c, "n_pairs": 40,
             "mean_buggy_low": 0.95 * b, "mean_buggy_high": 1.05 * b, "mean_correct_low": 0.95 * c,
             "mean_correct_high": 1.05 * c}
            for f, (b, c) in features.items()]
    return pl.DataFrame(rows)


def with_ratio_ci(df: pl.DataFrame, feature: int, low: float, high: float) -> pl.DataFrame:
    """`df` with the ratio interval of one feature set to [low, high]."""
    is_f = pl.col("feature_id") == feature
    return df.with_columns(pl.when(is_f).then(pl.lit(low)).otherwise(pl.col("ratio_low")).alias("ratio_low"),
                           pl.when(is_f).then(pl.lit(high)).otherwise(pl.col("ratio_high")).alias("ratio_high"))


def test_layer_25_features_at_their_activations_and_directions():
    right = named(25, {11813: (2.5, 1.5), 20139: (2.6, 1.0), 15508: (3.5, 2.0), 10049: (1.2, 2.5), 11664: (1.0, 2.3)})
    # 15508 less active in the buggy format (ratio 0.7 [0.665, 0.735]), 10049 in the correct one:
    # the directions are false
    reversed_ = named(25, {11813: (2.5, 1.5), 20139: (2.6, 1.0), 15508: (3.5, 5.0), 10049: (2.5, 1.2),
                           11664: (1.0, 2.3)})
    # 15508 as active in both formats: its ratio interval [0.95, 1.05] straddles 1
    flat = named(25, {11813: (2.5, 1.5), 20139: (2.6, 1.0), 15508: (3.5, 3.5)})
    # the right directions at a tenth of the stated activation
    small = named(25, {10049: (0.1, 0.25), 11664: (0.1, 0.23)})
    wrong_answer, correct_answer = LAYER_25
    # the ratio and the activations are decided on their intervals over number pairs
    assert {"mean_buggy_low", "mean_correct_high", "firing_rate_buggy_low"} <= set(NAMED_SCHEMA)
    r = verdict(wrong_answer, named_features=right)
    assert r["verdict"] == "holds" and "requires min(ratio) >= 1 -> pass" in r["detail"], r["detail"]
    assert (r["measured"], r["n"], r["n_unit"]) == (pytest.approx(2.5 / 1.5), 40, "number pairs")
    r = verdict(correct_answer, named_features=right)
    assert r["verdict"] == "holds" and "requires max(ratio) <= 1 -> pass" in r["detail"], r["detail"]
    # an activation interval straddling the stated range: inconclusive
    edge = named(25, {11813: (3.1, 1.5), 20139: (2.6, 1.0), 15508: (3.5, 2.0)})
    assert verdict(wrong_answer, named_features=edge)["verdict"] == "inconclusive"
    for claim, check in ((wrong_answer, "min(ratio) >= 1"), (correct_answer, "max(ratio) <= 1")):
        r = verdict(claim, named_features=reversed_)
        assert r["verdict"] == "fails" and f"requires {check} -> fail" in r["detail"], r["detail"]
    r = verdict(wrong_answer, named_features=flat)
    assert r["verdict"] == "inconclusive" and r["measured"] == pytest.approx(1.0) and "feature_id=15508" in r["selected"]
    assert verdict(correct_answer, named_features=small)["verdict"] == "fails"  # a tenth of the stated activation
    # the rows and regions of every check, on exact copies
    wrong_exact, correct_exact = exact(wrong_answer), exact(correct_answer)
    assert verdict(wrong_exact, named_features=right)["verdict"] == "holds"
    assert verdict(correct_exact, named_features=right)["verdict"] == "holds"
    assert verdict(wrong_exact, named_features=flat)["verdict"] == "fails"  # 1 is not above the null 1
    r = verdict(correct_exact, named_features=small)
    assert r["verdict"] == "fails" and "requires 1.86 <= mean_correct <= 3.1 -> fail" in r["detail"]
    # the ids at another layer only: not testable, never scored on other rows
    other = named(10, {11813: (2.5, 1.5), 20139: (2.6, 1.0), 15508: (3.5, 2.0)})
    for claim in (wrong_answer, wrong_exact):
        assert verdict(claim, named_features=other)["verdict"] == "not testable here"


# (ratio, low, high) of a top feature: a clear 3x up and 1/3x down
UP, DOWN = (3.0, 2.5, 3.5), (1 / 3, 0.28, 0.4)


def discriminative(layer: int, comparison: str, up: tuple = UP, down: tuple = DOWN, *, q_value: float = 0.001,
                   n_pairs: int = 40, n_heldout_pairs: int = 20) -> pl.DataFrame:
    """Rank-0 rows (the top up and down feature) of one comparison, with every column of the table.

    `up` / `down` are the (ratio, low, high) of a / b the claims read: `ratio` on the wrong_vs_right
    rows (whose held-out columns are null, as the producer writes them), `heldout_ratio` on the
    buggy_vs_correct_heldout rows, whose ranking-half ratio is then a clear UP / DOWN (the rank was
    chosen there). `q_value` is the BH q of both."""
    held = comparison == "buggy_vs_correct_heldout"
    rows = []
    for direction, feature, tested in (("up", 1, up), ("down", 2, down)):
        ratio = (UP if direction == "up" else DOWN) if held else tested
        row = dict.fromkeys(DISCRIMINATIVE_COLUMNS)
        row.update(layer=layer, comparison=comparison, direction=direction, rank=0, feature_id=feature,
                   effect_size=1.0 if direction == "up" else -1.0, mean_a=ratio[0], mean_b=1.0,
                   mean_diff=ratio[0] - 1.0, firing_rate_a=0.6, firing_rate_b=0.6, p_value=q_value / 10,
                   q_value=q_value, significant=q_value <= 0.05, n_a=n_pairs, n_b=n_pairs, n_tested=300,
                   n_pairs=n_pairs, ratio=ratio[0], ratio_low=ratio[1], ratio_high=ratio[2])
        if held:
            row.update(heldout_mean_a=tested[0], heldout_mean_b=1.0, heldout_firing_rate_a=0.6,
                       heldout_firing_rate_b=0.6, n_heldout_pairs=n_heldout_pairs, heldout_ratio=tested[0],
                       heldout_ratio_low=tested[1], heldout_ratio_high=tested[2], heldout_firing_rate_a_low=0.4,
                       heldout_firing_rate_a_high=0.8, heldout_firing_rate_b_low=0.4, heldout_firing_rate_b_high=0.8)
        rows.append(row)
    return pl.DataFrame(rows)


DEPTH_25 = round(0.80645 * 13)  # the layer of Llama's 25 in ctx()'s 14 layers


def wrong_vs_right(up: tuple = UP, down: tuple = DOWN, **kw) -> pl.DataFrame:
    return discriminative(DEPTH_25, "wrong_vs_right", up, down, **kw)


def layer_25_verdicts(table: pl.DataFrame) -> list[str]:
    """The verdicts of the wrong- and the correct-answer claim (agnostic forms, on ctx())."""
    return [verdict(c, ctx(), discriminative_features=table)["verdict"] for c in LAYER_25]


def test_agnostic_layer_25_features_are_discriminative_after_the_fdr_correction():
    # ratio intervals inside "at least 1.2x" (>= 1.2 up, <= 0.833 down), significant: holds
    r = verdict(LAYER_25[0], ctx(), discriminative_features=wrong_vs_right())
    assert (r["verdict"], r["form"]) == ("holds", "agnostic") and "q_value: p=0.001" in r["detail"], r["detail"]
    assert (r["measured"], r["ci_low"], r["ci_high"], r["n"], r["n_unit"]) == (3.0, 2.5, 3.5, 40, "number pairs")
    assert layer_25_verdicts(wrong_vs_right()) == ["holds", "holds"]
    # 1.2 and 0.833 are no null: the bounds are closed
    assert layer_25_verdicts(wrong_vs_right((1.5, 1.2, 1.8), (0.7, 0.6, 0.833))) == ["holds", "holds"]
    # significant but barely different: intervals outside the regions
    flat = ((1.05, 0.95, 1.15), (0.95, 0.87, 1.05))
    assert layer_25_verdicts(wrong_vs_right(*flat)) == ["fails", "fails"]
    # intervals straddling 1.2 / 0.833
    assert layer_25_verdicts(wrong_vs_right((1.3, 1.1, 1.5), (0.8, 0.7, 0.9))) == ["inconclusive", "inconclusive"]
    # the top of many features, no larger than chance once all of them are corrected for: a q gate
    # not passed only withholds the verdict (not significant is not shown to be null)
    for claim in LAYER_25:
        r = verdict(claim, ctx(), discriminative_features=wrong_vs_right(q_value=0.4))
        assert r["verdict"] == "inconclusive" and "q_value: p=0.4" in r["detail"], r["detail"]
    # barely different and not significant: the failed ratio decides
    assert layer_25_verdicts(wrong_vs_right(*flat, q_value=0.4)) == ["fails", "fails"]
    # the same clear ratios from a bootstrap over 9 number pairs decide nothing
    r = verdict(LAYER_25[0], ctx(), discriminative_features=wrong_vs_right(n_pairs=9))
    assert r["verdict"] == "inconclusive" and "a bootstrap over 9 number pairs (fewer than 10)" in r["detail"]


def test_the_q_gates_are_holm_adjusted_within_the_section():
    table = {"discriminative_features": wrong_vs_right(q_value=0.03)}
    assert layer_25_verdicts(table["discriminative_features"]) == ["holds", "holds"]  # alone: 0.03 <= 0.05
    claims = [LEDGER[c] for c in LAYER_25]
    assert {c["section"] for c in claims} == {"features"}
    ledger = evaluate(claims, table, ctx()).filter(pl.col("section") == "features")
    # two tests in the section: Holm makes each 0.06
    assert ledger["verdict"].to_list() == ["inconclusive", "inconclusive"]
    assert ledger["family_tests"].to_list() == [2, 2] and "Holm-adjusted 0.06" in ledger["detail"][0]


def test_up_down_pattern_between_formats():
    pattern = {25523: (15.0, 10.0), 22441: (4.6, 2.8), 18967: (2.0, 1.0), 31205: (1.0, 2.0), 10049: (1.0, 1.8)}
    raised = {**pattern, 10049: (2.0, 1.0)}  # 10049 raised in Q&A too: the "suppressed" half is false
    level = {**pattern, 10049: (1.8, 1.8)}  # 10049 the same in both: [0.95, 1.05] straddles 1
    r = verdict("format_up_down_pattern", named_features=named(10, pattern))
    assert (r["verdict"], r["form"]) == ("holds", "literal"), r["detail"]
    r = verdict("format_up_down_pattern", named_features=named(10, raised))
    assert r["verdict"] == "fails" and "requires max(ratio) <= 1 -> fail" in r["detail"], r["detail"]
    assert verdict("format_up_down_pattern", named_features=named(10, level))["verdict"] == "inconclusive"
    # strict at the null 1: an interval [0.9, 1] does not show "less active", nor its negation
    touching = with_ratio_ci(named(10, pattern), 10049, 0.9, 1.0)
    assert verdict("format_up_down_pattern", named_features=touching)["verdict"] == "inconclusive"
    assert verdict("format_up_down_pattern",
                   named_features=with_ratio_ci(named(10, pattern), 10049, 1.0, 1.1))["verdict"] == "fails"

    # on any model: the top buggy-up and buggy-down features, ranked on the even pairs (3x, 1/3x
    # there), keep their directions on the held-out pairs by at least 1.2x (heldout_ratio)
    def heldout(up: tuple, down: tuple = (0.5, 0.4, 0.6), **kw) -> dict:
        return {"discriminative_features": discriminative(5, "buggy_vs_correct_heldout", up, down, **kw)}

    r = verdict("format_up_down_pattern", ctx(), **heldout((2.0, 1.6, 2.4)))
    assert (r["verdict"], r["form"]) == ("holds", "agnostic"), r["detail"]
    assert (r["measured"], r["n"], r["n_unit"]) == (2.0, 20, "held-out number pairs")
    # the down feature raised on the held-out pairs
    r = verdict("format_up_down_pattern", ctx(), **heldout((2.0, 1.6, 2.4), (2.0, 1.6, 2.4)))
    assert r["verdict"] == "fails" and "requires heldout_ratio <= 0.833 -> fail" in r["detail"], r["detail"]
    # ranked first at 3x, about 1x on the held-out pairs: regressed to the mean
    assert verdict("format_up_down_pattern", ctx(), **heldout((1.0, 0.9, 1.1)))["verdict"] == "fails"
    # an interval straddling 1.2
    assert verdict("format_up_down_pattern", ctx(), **heldout((1.3, 1.1, 1.5)))["verdict"] == "inconclusive"
    # 9 held-out number pairs (40 in the table's n_pairs): the held-out bootstrap decides nothing
    r = verdict("format_up_down_pattern", ctx(), **heldout((2.0, 1.6, 2.4), n_heldout_pairs=9))
    assert r["verdict"] == "inconclusive" and "a bootstrap over 9 held-out number pairs (fewer than 10)" in r["detail"]


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
