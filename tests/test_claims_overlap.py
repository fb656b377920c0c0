"""The overlap and amplification rules of config/claims.yaml against their chance baselines, decided
on intervals (bugscope.claims.decide): each shipped rule holds on a made-up table where the seed's
claim is true beyond the same-format baseline, fails on one whose interval lies outside the claim's
region (a format effect or an amplification excess entirely on the wrong side of its null, a level
far from the seed's), and is inconclusive on one whose interval straddles the region's edge."""

from __future__ import annotations

import copy

import numpy as np
import polars as pl
import pytest
import yaml

from bugscope.claims.evaluate import Context, evaluate_claim
from bugscope.claims.spec import LedgerError, load_ledger
from bugscope.config import load_config
from tests.conftest import REPO

LEDGER = {c["id"]: c for c in load_ledger(REPO / "config" / "claims.yaml")}
LAYERS = list(range(32))
MIDDLE = range(8, 25)  # 0.25 * 32 .. 0.75 * 32


LLAMA_SETS = Context.from_config(load_config(REPO / "config" / "llama31_8b.yaml"), None).sae_sets


def ctx(literal: bool) -> Context:
    model = "meta-llama/Llama-3.1-8B-Instruct" if literal else "SmolLM2-135M-Instruct"
    return Context(model, "x", 32, 32 if literal else 9, "qa", "simple", [10],
                   **({"sae_sets": LLAMA_SETS} if literal else {}))


# The seed's story, true beyond the baseline: overlap collapses at 7 (a format effect of 40
# points), separates at 8, re-entangles at 10 (no format effect left), 60 % at 25; amplification
# 1.97x at 8, 1.25x at 9 and 1.24x at 10 beyond its null, none at 7, 1.13x at 25. Each metric is
# (value, half-width of its interval); `argmax_middle_frequency` (how often the bootstrap puts the
# middle maximum at a layer; no interval) is 1 at the marked middle maximum unless a layer names it.
SEED_WORLD = {
    7: {"overlap_pct": (10, 2), "format_effect_pct": (40, 5), "amplification_geomean": (1.0, 0.1),
        "amplification_excess": (1.0, 0.1), "pooled_amplification": 1.0},
    8: {"overlap_pct": (20, 2), "format_effect_pct": (30, 5), "amplification_geomean": (1.97, 0.2),
        "amplification_excess": (1.97, 0.2), "pooled_amplification": 1.97},
    9: {"overlap_pct": (45, 2), "amplification_geomean": (1.25, 0.1), "pooled_amplification": 1.25},
    10: {"overlap_pct": (80, 2), "format_effect_pct": (2, 3), "amplification_geomean": (1.24, 0.1),
         "amplification_excess": (1.24, 0.1), "pooled_amplification": 1.24},
    25: {"overlap_pct": (60, 2), "amplification_geomean": (1.13, 0.05), "pooled_amplification": 1.13},
}


DEFAULT = {"overlap_pct": (50, 2), "format_effect_pct": (0, 3), "amplification_geomean": (1.0, 0.1),
           "amplification_excess": (1.0, 0.1), "baseline_overlap_pct": (50, 2),
           "swapped_order_overlap_pct": (90, 1), "amplification_geomean_null": (1.0, 0.05),
           "amplification_original_mean_of_ratios": (1.2, 0.1)}
# number pairs behind a row's bootstrap (the table's n column): all pairs, the held-out (odd) half
NUMBER_PAIRS = {"per_pair": 32, "per_pair_heldout": 16}


def _cross_rows(spec: dict, variant: str, marks_from: dict) -> pl.DataFrame:
    """Rows of one cross-format variant of 32 layers from `spec`, marked on the overlap of `marks_from`."""
    rows = []
    for layer in LAYERS:
        row = {"layer": layer, "variant": variant, "n_pairs": 2 * NUMBER_PAIRS[variant],
               "n_number_pairs": NUMBER_PAIRS[variant]}
        for col, dflt in DEFAULT.items():
            v, half = spec[layer].get(col, dflt)
            row.update({col: float(v), f"{col}_low": float(v - half), f"{col}_high": float(v + half)})
        rows.append(row)
    mean = {la: marks_from[la].get("overlap_pct", DEFAULT["overlap_pct"])[0] for la in LAYERS}
    lo, hi = min(LAYERS, key=mean.get), max(MIDDLE, key=mean.get)
    for row in rows:  # NaN outside the middle layers, as the producer writes it
        la = row["layer"]
        freq = spec[la].get("argmax_middle_frequency", float(la == hi))
        row["argmax_middle_frequency"] = float(freq) if la in MIDDLE else float("nan")
    return pl.DataFrame(rows).with_columns((pl.col("layer") == lo).alias("is_min_overlap"),
                                           (pl.col("layer") == hi).alias("is_max_overlap_middle"))


def world(changes: dict | None = None, heldout: dict | None = None) -> pl.DataFrame:
    """A feature_overlap table of SEED_WORLD with `changes`: per_pair, per_pair_heldout, pooled and
    original_single_pair rows of 32 layers.

    The per_pair_heldout rows are the same world with the further `heldout` changes, and carry the
    marks of the selection half, which sees the world without them (as on real pairs, where the
    even pairs choose the layer and the odd ones are measured there). The original_single_pair rows
    (the literal forms' single measurement) have no interval, as in the real table.
    """
    spec = {layer: dict(SEED_WORLD.get(layer, {})) for layer in LAYERS}
    for layer, cols in (changes or {}).items():
        spec[layer].update(cols)
    held = {layer: dict(cols) for layer, cols in spec.items()}
    for layer, cols in (heldout or {}).items():
        held[layer].update(cols)
    per_pair = _cross_rows(spec, "per_pair", spec)
    per_pair_heldout = _cross_rows(held, "per_pair_heldout", spec)
    pooled = pl.DataFrame({
        "layer": LAYERS, "variant": "pooled", "n_pairs": 64, "n_number_pairs": 32,
        "overlap_pct": [float(spec[la].get("pooled_overlap", spec[la].get("overlap_pct", (50, 0)))[0]) for la in LAYERS],
        "amplification_original_mean_of_ratios": [float(spec[la].get("pooled_amplification", 1.2)) for la in LAYERS],
        "is_min_overlap": False, "is_max_overlap_middle": False})
    # The literal forms read the original study's own measurement (one pair, at prompt_last).
    single = pooled.with_columns(pl.lit("original_single_pair").alias("variant"), pl.lit(1).alias("n_pairs"),
                                 pl.lit(1).alias("n_number_pairs"))
    return pl.concat([per_pair, per_pair_heldout, pooled, single], how="diagonal_relaxed")


def verdict(claim: str | dict, table: pl.DataFrame, literal: bool) -> dict:
    claim = LEDGER[claim] if isinstance(claim, str) else claim
    row = evaluate_claim(claim, {"feature_overlap": table}, ctx(literal))
    assert row["form"] == ("literal" if literal else "agnostic"), row["detail"]
    return row


# (claim, a world whose interval lies outside the claim's region, one whose interval straddles its edge)
WORLDS = {
    # 10 % at layer 7, but cross-format questions share more than two of one format: an effect
    # interval entirely below 0 / one that reaches 0 (no effect shown, none excluded)
    "overlap_layer_7": ({7: {"format_effect_pct": (-10, 3)}}, {7: {"format_effect_pct": (0, 3)}}),
    "overlap_layer_8": ({8: {"format_effect_pct": (-8, 3)}}, {8: {"format_effect_pct": (4, 5)}}),
    # the level itself is off / on the edge of the seed's +/- 10 points
    "overlap_layer_10": ({10: {"overlap_pct": (60, 2)}}, {10: {"overlap_pct": (70, 3)}}),
    "overlap_layer_25": ({25: {"overlap_pct": (30, 2)}}, {25: {"overlap_pct": (50, 2)}}),
    # the overlap dips and peaks, but at the dip the same-format baseline shares less than the
    # cross-format pairs (below 0, and below the effect at the peak) / about as little
    "re_entanglement": ({7: {"format_effect_pct": (-10, 3)}}, {7: {"format_effect_pct": (1, 3)}}),
    # 1.97x, and the seed's mean of ratios says so too, but the excess over the null lies below 1 /
    # covers 1
    "amplification_layer_8": ({8: {"amplification_excess": (0.8, 0.1)}}, {8: {"amplification_excess": (1.3, 0.4)}}),
    "amplification_layer_9": ({9: {"amplification_geomean": (0.9, 0.05)}},
                              {9: {"amplification_geomean": (1.05, 0.1)}}),
    "amplification_layer_10": ({10: {"amplification_excess": (0.85, 0.1)}},
                               {10: {"amplification_excess": (1.1, 0.15)}}),
    # "1.0x at layer 7", but the shared features are amplified 1.5x there / by 1.15 to 1.35x, across
    # the window's edge 1.3
    "amplification_layer_7_25": ({7: {"amplification_geomean": (1.5, 0.1), "amplification_excess": (1.5, 0.1)}},
                                 {7: {"amplification_geomean": (1.25, 0.1), "amplification_excess": (1.25, 0.1)}}),
}
# Literal forms whose checks are all single exact measurements (original_single_pair, `exact:
# true`): a value has no interval to straddle an edge, and one on the edge lies in the closed window.
ONLY_EXACT = ("overlap_layer_10", "overlap_layer_25")
CASES = [pytest.param(c, lit, id=f"{c}-{'literal' if lit else 'agnostic'}")
         for c in sorted(WORLDS) for lit in (True, False)]


@pytest.mark.parametrize(("claim_id", "literal"), CASES)
def test_overlap_and_amplification_rules_hold_fail_and_are_inconclusive(claim_id, literal):
    false_world, edge_world = WORLDS[claim_id]
    holds = verdict(claim_id, world(), literal)
    assert holds["verdict"] == "holds", holds["detail"]
    fails = verdict(claim_id, world(false_world), literal)
    assert fails["verdict"] == "fails", fails["detail"]
    assert "-> fail" in fails["detail"]
    edge = verdict(claim_id, world(edge_world), literal)
    expected = "holds" if literal and claim_id in ONLY_EXACT else "inconclusive"
    assert edge["verdict"] == expected, edge["detail"]


def test_re_entanglement_fails_when_the_format_effect_grows_at_the_peak():
    # A real separation at 7 (40 [35, 45]) and as large at the peak (38 [33, 43]): the overlap rises
    # only because the baseline does, but two overlapping intervals show neither a shrinking nor a
    # growing effect, so separate intervals leave it inconclusive (the old point rule failed it).
    as_large = verdict("re_entanglement", world({10: {"format_effect_pct": (38, 5)}}), literal=False)
    assert as_large["verdict"] == "inconclusive", as_large["detail"]
    assert "check 3: 40 [35, 45]" in as_large["detail"] and "-> inconclusive; CI [35, 45]" in as_large["detail"]
    # larger at the peak (60 [55, 65]) than at the dip, beyond both intervals: fails
    larger = verdict("re_entanglement", world({10: {"format_effect_pct": (60, 5)}}), literal=False)
    assert larger["verdict"] == "fails", larger["detail"]


def test_literal_re_entanglement_reads_exact_locations():
    # Check 1 compares the single original pair's overlap at 7 and 10, check 2 how often the
    # all-pairs bootstrap puts the middle maximum at layer 10: both exact, no interval needed.
    row = verdict("re_entanglement", world(), literal=True)
    assert row["verdict"] == "holds" and "exact values: 10 against 80" in row["detail"], row["detail"]
    assert "check 2: 1 (exact: a named item), n=32 number pairs at layer=10" in row["detail"]
    # the bootstrap puts the middle maximum at 11 more often than at 10: shown false, as exact
    at_11 = verdict("re_entanglement", world({10: {"argmax_middle_frequency": 0.3},
                                              11: {"argmax_middle_frequency": 0.7}}), literal=True)
    assert at_11["verdict"] == "fails", at_11["detail"]
    assert "requires argmax_middle_frequency >= 0.5 -> fail" in at_11["detail"]
    # half of the resamples: the closed bound 0.5 holds (0.5 is no null of a frequency)
    half = world({10: {"argmax_middle_frequency": 0.5}, 11: {"argmax_middle_frequency": 0.5}})
    assert verdict("re_entanglement", half, literal=True)["verdict"] == "holds"
    # the original pair's overlap at 7 above that at 10 (its single value no lower): fails
    for pooled in (85, 80):
        row = verdict("re_entanglement", world({7: {"pooled_overlap": (pooled, 0)}}), literal=True)
        assert row["verdict"] == "fails", row["detail"]
        assert "'original_single_pair', 'layer': 10} -> fail; exact values" in row["detail"]


def test_a_peak_that_is_not_a_local_maximum_is_never_shown_false():
    # The marked peak of the held-out pairs lies below every other layer: local_max is not shown,
    # but not being shown a local maximum is not being shown none, so the claim stays inconclusive.
    row = verdict("re_entanglement", world(heldout={10: {"overlap_pct": (5, 2)}}), literal=False)
    assert row["verdict"] == "inconclusive", row["detail"]
    assert "before none, after none" in row["detail"] and "-> fail" not in row["detail"]


def test_amplification_by_the_biased_estimator_alone_does_not_hold():
    # The original mean of ratios says 1.24x; the geometric mean says 1.0x at the chance level,
    # with an interval below the window 1.24 +/- 0.2: fails.
    table = world({10: {"amplification_geomean": (1.0, 0.03), "amplification_excess": (1.0, 0.03),
                        "amplification_original_mean_of_ratios": (1.24, 0.05)}})
    row = verdict("amplification_layer_10", table, literal=False)
    assert row["verdict"] == "fails" and row["metric"] == "amplification_geomean", row["detail"]
    assert "amplification_original_mean_of_ratios=1.24" in row["detail"]
    # at the chance level with a wider interval that reaches the window: inconclusive, never holds
    table = world({10: {"amplification_geomean": (1.0, 0.05), "amplification_excess": (1.0, 0.06),
                        "amplification_original_mean_of_ratios": (1.24, 0.05)}})
    assert verdict("amplification_layer_10", table, literal=False)["verdict"] == "inconclusive"


def test_levels_are_reported_beside_their_chance_level():
    row = verdict("overlap_layer_10", world(), literal=False)
    assert row["verdict"] == "holds" and row["measured"] == 80
    assert (row["ci_low"], row["ci_high"], row["n"], row["n_unit"]) == (78, 82, 16, "number pairs")
    assert "beside: baseline_overlap_pct=50 [48, 52]" in row["detail"]
    assert "swapped_order_overlap_pct=90" in row["detail"] and "format_effect_pct=2 [-1, 5]" in row["detail"]


def test_a_single_pair_value_decides_only_as_an_exact_measurement():
    # The literal form reads the one original pair (no interval) and says `exact: true`.
    assert verdict("overlap_layer_10", world({10: {"pooled_overlap": (70, 0)}}), True)["verdict"] == "holds"
    assert verdict("overlap_layer_10", world({10: {"pooled_overlap": (69.5, 0)}}), True)["verdict"] == "fails"
    # The same check without `exact: true`: a point estimate decides nothing, even in mid-window.
    claim = copy.deepcopy(LEDGER["overlap_layer_10"])
    del claim["forms"][0]["checks"][0]["exact"]
    row = verdict(claim, world(), literal=True)
    assert row["verdict"] == "inconclusive" and row["measured"] == 80, row["detail"]
    assert "no interval: a point estimate decides nothing" in row["detail"]


def _with_heldout_pairs(table: pl.DataFrame, n: int) -> pl.DataFrame:
    return table.with_columns(pl.when(pl.col("variant") == "per_pair_heldout").then(pl.lit(n))
                              .otherwise(pl.col("n_number_pairs")).alias("n_number_pairs"))


def test_a_bootstrap_over_fewer_than_ten_number_pairs_decides_nothing():
    ten = verdict("overlap_layer_10", _with_heldout_pairs(world(), 10), literal=False)
    assert ten["verdict"] == "holds", ten["detail"]
    # the same interval inside the window, or one far outside it, from 9 held-out number pairs
    for changes in ({}, {10: {"overlap_pct": (55, 2)}}):
        nine = verdict("overlap_layer_10", _with_heldout_pairs(world(changes), 9), literal=False)
        assert nine["verdict"] == "inconclusive" and nine["n"] == 9, nine["detail"]
        assert "a bootstrap over 9 number pairs (fewer than 10)" in nine["detail"]
    assert verdict("overlap_layer_10", world({10: {"overlap_pct": (55, 2)}}), literal=False)["verdict"] == "fails"


def _one_check(**check) -> dict:
    """A claim of one check on the format effect at layer 10 of the per_pair rows."""
    base = {"table": "feature_overlap", "where": {"variant": "per_pair", "layer": 10}, "metric": "format_effect_pct"}
    return {"id": "c", "section": "s", "claim": "c", "study_value": 0,
            "forms": [{"form": "agnostic", "description": "d", "checks": [{**base, **check}]}]}


def test_also_conditions_on_an_interval_bound_are_strict_and_decide_three_ways():
    table = world()  # the format effect at layer 10 is 2 [-1, 5]; the overlap there is 80

    def decided(**check) -> str:
        return evaluate_claim(_one_check(**check), {"feature_overlap": table}, ctx(False))["verdict"]

    assert decided(at_least=-2) == "holds"
    assert decided(at_least=-2, also={"format_effect_pct_low": {"at_least": -1}}) == "holds"
    # strict: a low bound of exactly -1 is not above -1, and the high bound 5 could still be
    assert decided(at_least=-2, also={"format_effect_pct_low": {"above": -1}}) == "inconclusive"
    # no bound of [-1, 5] can lie above 5 (or below -1): shown not met
    assert decided(at_least=-2, also={"format_effect_pct_low": {"above": 5}}) == "fails"
    assert decided(at_least=-2, also={"format_effect_pct_high": {"below": -1}}) == "fails"
    assert decided(at_least=-2, also={"format_effect_pct_high": {"below": 6}}) == "holds"
    # a point column: not met withholds the verdict, met decides nothing (the check still does)
    assert decided(at_least=-2, also={"overlap_pct": {"at_least": 90}}) == "inconclusive"
    assert decided(at_least=-2, also={"overlap_pct": {"at_least": 50}}) == "holds"
    assert decided(at_least=3, also={"overlap_pct": {"at_least": 50}}) == "inconclusive"
    with pytest.raises(LedgerError, match="greater"):
        decided(at_least=-2, also={"format_effect_pct_low": {"greater": -1}})


def test_a_bound_at_the_metric_null_is_strict():
    def decided(effect, **check) -> str:
        table = world({10: {"format_effect_pct": effect}})
        return evaluate_claim(_one_check(**check), {"feature_overlap": table}, ctx(False))["verdict"]

    # [0, 6] touches the null 0 of a format effect: "at least 0" is not shown; [-6, 0] shows it false
    assert decided((3, 3), at_least=0) == "inconclusive"
    assert decided((-3, 3), at_least=0) == "fails"
    assert decided((3.5, 3), at_least=0) == "holds"
    # the same bound is closed where it is not the check's null
    assert decided((3, 3), at_least=0, null=-5) == "holds"
    assert decided((-3, 3), at_most=0, null=-5) == "holds"
    assert decided((-3, 3), at_most=0) == "inconclusive"


# --- selection: the agnostic forms test a marked layer on pairs that did not mark it -------------

# (claim, held-out changes, verdict): the selection half shows the seed's story at the marked layer,
# the held-out pairs do not (the selected layer regresses to the mean, with a tight interval).
SELECTED_BY_CHANCE = {
    "overlap_layer_7": ({7: {"overlap_pct": (35, 2), "format_effect_pct": (5, 3)}}, "fails"),
    "overlap_layer_8": ({8: {"overlap_pct": (45, 2), "format_effect_pct": (0, 3)}}, "fails"),
    "overlap_layer_10": ({10: {"overlap_pct": (55, 2)}}, "fails"),
    # a flat held-out "peak" is not shown to be a local maximum, and local_max never fails (not
    # being shown a peak is not being shown none): inconclusive, where the point rule said fails
    "re_entanglement": ({10: {"overlap_pct": (50, 2)}}, "inconclusive"),
    "amplification_layer_8": ({8: {"amplification_geomean": (1.0, 0.1), "amplification_excess": (1.0, 0.1)}},
                              "fails"),
    "amplification_layer_10": ({10: {"amplification_geomean": (1.0, 0.03), "amplification_excess": (1.0, 0.03)}},
                               "fails"),
    "amplification_layer_7_25": ({7: {"amplification_geomean": (1.5, 0.05), "amplification_excess": (1.5, 0.05)}},
                                 "fails"),
}


def on_all_pairs(claim: dict) -> dict:
    """The claim with its agnostic form reading the per_pair rows (marks and statistics of all pairs)."""
    text = yaml.safe_dump(claim).replace("per_pair_heldout", "per_pair")
    return yaml.safe_load(text)


@pytest.mark.parametrize("claim_id", sorted(SELECTED_BY_CHANCE))
def test_marked_layer_rules_do_not_hold_when_only_the_selection_half_shows_the_claim(claim_id):
    changes, expected = SELECTED_BY_CHANCE[claim_id]
    table = world(heldout=changes)
    row = verdict(claim_id, table, literal=False)
    assert row["verdict"] == expected, row["detail"]
    assert "held-out" in row["form_tested"]
    # The same rule on the per_pair rows, marked and measured on the same pairs, would hold here.
    again = evaluate_claim(on_all_pairs(LEDGER[claim_id]), {"feature_overlap": table}, ctx(False))
    assert again["form"] == "agnostic" and again["verdict"] == "holds", again["detail"]


def _noise_rows(variant: str, rng: np.random.Generator, marks: tuple[int, int]) -> pl.DataFrame:
    """32 layers of pure noise (no dip, no peak, no format effect), marked at `marks` = (min, middle max)."""
    overlap = 50 + rng.normal(0, 2, len(LAYERS))
    effect = rng.normal(0, 2, len(LAYERS))
    return pl.DataFrame({
        "layer": LAYERS, "variant": variant, "n_pairs": 32, "n_number_pairs": 16,
        "overlap_pct": overlap, "overlap_pct_low": overlap - 4, "overlap_pct_high": overlap + 4,
        "format_effect_pct": effect, "format_effect_pct_low": effect - 4, "format_effect_pct_high": effect + 4,
        "baseline_overlap_pct": overlap + effect, "baseline_overlap_pct_low": overlap + effect - 4,
        "baseline_overlap_pct_high": overlap + effect + 4,
        "is_min_overlap": [la == marks[0] for la in LAYERS], "is_max_overlap_middle": [la == marks[1] for la in LAYERS]})


def test_re_entanglement_does_not_hold_on_a_peak_of_the_selection_half_that_the_held_out_noise_lacks():
    """The selection half (even pairs) happens to show a dip at 5 and a peak at 15; the held-out
    half is pure noise. The all-pairs rows inherit the selection half's extremes and pass."""
    rng = np.random.default_rng(0)
    held = _noise_rows("per_pair_heldout", rng, marks=(5, 15))
    # all pairs = the average of the two halves: the selection half's dip and peak, half as deep
    selection = held.with_columns(
        pl.when(pl.col("layer") == 5).then(pl.lit(10.0)).when(pl.col("layer") == 15).then(pl.lit(90.0))
        .otherwise(pl.col("overlap_pct")).alias("sel_overlap"),
        pl.when(pl.col("layer") == 5).then(pl.lit(45.0)).otherwise(pl.lit(0.0)).alias("sel_effect"))
    all_pairs = selection.with_columns(
        ((pl.col("overlap_pct") + pl.col("sel_overlap")) / 2).alias("overlap_pct"),
        ((pl.col("format_effect_pct") + pl.col("sel_effect")) / 2).alias("format_effect_pct"),
        pl.lit("per_pair").alias("variant"), pl.lit(64).alias("n_pairs"), pl.lit(32).alias("n_number_pairs"),
    ).with_columns(
        (pl.col("overlap_pct") - 3).alias("overlap_pct_low"), (pl.col("overlap_pct") + 3).alias("overlap_pct_high"),
        (pl.col("format_effect_pct") - 3).alias("format_effect_pct_low"),
        (pl.col("format_effect_pct") + 3).alias("format_effect_pct_high")).drop("sel_overlap", "sel_effect")
    table = pl.concat([all_pairs, held], how="diagonal_relaxed")
    row = verdict("re_entanglement", table, literal=False)
    # Noise shows neither the peak nor its absence: every check is inconclusive (the point rule
    # said fails; an interval straddling the region cannot).
    assert row["verdict"] == "inconclusive", row["detail"]
    assert row["detail"].count("-> inconclusive") >= 3 and "-> pass" not in row["detail"]
    assert "layer=15" in row["selected"] and row["n"] == 16
    selected_on_the_tested_data = evaluate_claim(on_all_pairs(LEDGER["re_entanglement"]),
                                                 {"feature_overlap": table}, ctx(False))
    assert selected_on_the_tested_data["verdict"] == "holds", selected_on_the_tested_data["detail"]
    # a real dip and peak on the held-out pairs too: holds
    real = held.with_columns(
        pl.when(pl.col("layer") == 15).then(pl.lit(85.0)).when(pl.col("layer") == 5).then(pl.lit(12.0))
        .otherwise(pl.col("overlap_pct")).alias("overlap_pct"),
        pl.when(pl.col("layer") == 5).then(pl.lit(40.0)).otherwise(pl.col("format_effect_pct")).alias("format_effect_pct"),
    ).with_columns((pl.col("overlap_pct") - 4).alias("overlap_pct_low"), (pl.col("overlap_pct") + 4).alias("overlap_pct_high"),
                   (pl.col("format_effect_pct") - 4).alias("format_effect_pct_low"),
                   (pl.col("format_effect_pct") + 4).alias("format_effect_pct_high"))
    assert verdict("re_entanglement", pl.concat([all_pairs, real], how="diagonal_relaxed"),
                   literal=False)["verdict"] == "holds"


def test_marked_rules_are_not_testable_without_held_out_rows():
    table = world().filter(pl.col("variant") != "per_pair_heldout")
    row = evaluate_claim(LEDGER["re_entanglement"], {"feature_overlap": table}, ctx(False))
    assert row["verdict"] == "not testable here" and "no row" in row["detail"]
