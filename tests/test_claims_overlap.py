"""The overlap and amplification rules of config/claims.yaml against their chance baselines: each
shipped rule holds on a made-up table where the seed's claim is true beyond the same-format
baseline, and fails where the level matches but the format effect (or the amplification beyond
the null) is not there."""

from __future__ import annotations

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
# 1.97x at 8 and 1.24x at 10 beyond its null, none at 7, 1.13x at 25.
SEED_WORLD = {
    7: {"overlap_pct": (10, 2), "format_effect_pct": (40, 5), "amplification_geomean": (1.0, 0.1),
        "amplification_excess": (1.0, 0.1), "pooled_amplification": 1.0},
    8: {"overlap_pct": (20, 2), "format_effect_pct": (30, 5), "amplification_geomean": (1.97, 0.2),
        "amplification_excess": (1.97, 0.2), "pooled_amplification": 1.97},
    9: {"overlap_pct": (45, 2)},
    10: {"overlap_pct": (80, 2), "format_effect_pct": (2, 3), "amplification_geomean": (1.24, 0.1),
         "amplification_excess": (1.24, 0.1), "pooled_amplification": 1.24},
    25: {"overlap_pct": (60, 2), "amplification_geomean": (1.13, 0.1), "pooled_amplification": 1.13},
}


DEFAULT = {"overlap_pct": (50, 2), "format_effect_pct": (0, 3), "amplification_geomean": (1.0, 0.1),
           "amplification_excess": (1.0, 0.1), "baseline_overlap_pct": (50, 2),
           "swapped_order_overlap_pct": (90, 1), "amplification_geomean_null": (1.0, 0.05),
           "amplification_original_mean_of_ratios": (1.2, 0.1)}


def _cross_rows(spec: dict, variant: str, marks_from: dict) -> pl.DataFrame:
    """Rows of one cross-format variant of 32 layers from `spec`, marked on the overlap of `marks_from`."""
    rows = []
    for layer in LAYERS:
        row = {"layer": layer, "variant": variant, "n_pairs": 64 if variant == "per_pair" else 32}
        for col, dflt in DEFAULT.items():
            v, half = spec[layer].get(col, dflt)
            row.update({col: float(v), f"{col}_low": float(v - half), f"{col}_high": float(v + half)})
        rows.append(row)
    mean = {la: marks_from[la].get("overlap_pct", DEFAULT["overlap_pct"])[0] for la in LAYERS}
    lo, hi = min(LAYERS, key=mean.get), max(MIDDLE, key=mean.get)
    return pl.DataFrame(rows).with_columns((pl.col("layer") == lo).alias("is_min_overlap"),
                                           (pl.col("layer") == hi).alias("is_max_overlap_middle"))


def world(changes: dict | None = None, heldout: dict | None = None) -> pl.DataFrame:
    """A feature_overlap table of SEED_WORLD with `changes`: per_pair, per_pair_heldout, pooled and
    original_single_pair rows of 32 layers.

    The per_pair_heldout rows are the same world with the further `heldout` changes, and carry the
    marks of the selection half, which sees the world without them (as on real pairs, where the
    even pairs choose the layer and the odd ones are measured there).
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
        "layer": LAYERS, "variant": "pooled", "n_pairs": 64,
        "overlap_pct": [float(spec[la].get("pooled_overlap", spec[la].get("overlap_pct", (50, 0)))[0]) for la in LAYERS],
        "amplification_original_mean_of_ratios": [float(spec[la].get("pooled_amplification", 1.2)) for la in LAYERS],
        "is_min_overlap": False, "is_max_overlap_middle": False})
    # The literal forms read the original study's own measurement (one pair, at prompt_last).
    single = pooled.with_columns(pl.lit("original_single_pair").alias("variant"), pl.lit(1).alias("n_pairs"))
    return pl.concat([per_pair, per_pair_heldout, pooled, single], how="diagonal_relaxed")


def verdict(claim_id: str, table: pl.DataFrame, literal: bool) -> dict:
    row = evaluate_claim(LEDGER[claim_id], {"feature_overlap": table}, ctx(literal))
    assert row["form"] == ("literal" if literal else "agnostic"), row["detail"]
    return row


# (claim, changes that make it false beyond the baseline although its level may still match)
FALSE_WORLDS = {
    # 10 % at layer 7, but two questions of one format share as little: no format effect
    "overlap_layer_7": {7: {"format_effect_pct": (0, 3)}},
    # 20 % at layer 8, with a format effect whose CI reaches 0
    "overlap_layer_8": {8: {"format_effect_pct": (4, 5)}},
    # the level itself is off
    "overlap_layer_10": {10: {"overlap_pct": (60, 2)}},
    "overlap_layer_25": {25: {"overlap_pct": (30, 2)}},
    # the overlap dips and peaks, but the dip is matched by the same-format baseline
    "re_entanglement": {7: {"format_effect_pct": (1, 3)}},
    # 1.97x, and the seed's mean of ratios says so too, but the excess over the null covers 1
    "amplification_layer_8": {8: {"amplification_excess": (1.3, 0.4)}},
    "amplification_layer_10": {10: {"amplification_excess": (1.1, 0.15)}},
    # "1.0x at layer 7", but the shared features are amplified beyond the null there
    "amplification_layer_7_25": {7: {"amplification_geomean": (1.25, 0.05), "amplification_excess": (1.25, 0.05)}},
}


@pytest.mark.parametrize("literal", [True, False], ids=["literal", "agnostic"])
@pytest.mark.parametrize("claim_id", sorted(FALSE_WORLDS))
def test_overlap_and_amplification_rules_hold_and_fail(claim_id, literal):
    if literal and claim_id in ("overlap_layer_10", "overlap_layer_25"):
        pytest.skip("their literal forms (pooled levels) are unchanged and tested elsewhere")
    holds = verdict(claim_id, world(), literal)
    assert holds["verdict"] == "holds", holds["detail"]
    fails = verdict(claim_id, world(FALSE_WORLDS[claim_id]), literal)
    assert fails["verdict"] == "fails", fails["detail"]


def test_re_entanglement_fails_when_the_format_effect_does_not_shrink_at_the_peak():
    # a real separation at 7, but as large at the peak: overlap rises only because the baseline does
    table = world({10: {"format_effect_pct": (38, 5)}})
    for literal in (True, False):
        assert verdict("re_entanglement", table, literal)["verdict"] == "fails"


def test_amplification_by_the_biased_estimator_alone_does_not_hold():
    # The original mean of ratios says 1.24x; the geometric mean says 1.0x at the chance level.
    table = world({10: {"amplification_geomean": (1.0, 0.05), "amplification_excess": (1.0, 0.06),
                        "amplification_original_mean_of_ratios": (1.24, 0.05)}})
    row = verdict("amplification_layer_10", table, literal=False)
    assert row["verdict"] == "fails" and row["metric"] == "amplification_geomean"
    assert "amplification_original_mean_of_ratios=1.24" in row["detail"]


def test_levels_are_reported_beside_their_chance_level():
    row = verdict("overlap_layer_10", world(), literal=False)
    assert row["verdict"] == "holds" and row["measured"] == 80
    assert "beside: baseline_overlap_pct=50 [48, 52]" in row["detail"]
    assert "swapped_order_overlap_pct=90" in row["detail"] and "format_effect_pct=2 [-1, 5]" in row["detail"]


def test_also_ops_are_strict_and_checked():
    form = {"form": "agnostic", "description": "d", "checks": [
        {"table": "feature_overlap", "where": {"variant": "per_pair", "layer": 10}, "metric": "format_effect_pct",
         "at_least": 0, "also": {"format_effect_pct_low": {"above": -1}}}]}
    claim = {"id": "c", "section": "s", "claim": "c", "study_value": 0, "forms": [form]}
    table = world()  # format_effect_pct_low at layer 10 is exactly -1
    assert evaluate_claim(claim, {"feature_overlap": table}, ctx(False))["verdict"] == "fails"
    form["checks"][0]["also"] = {"format_effect_pct_low": {"at_least": -1}}
    assert evaluate_claim(claim, {"feature_overlap": table}, ctx(False))["verdict"] == "holds"
    form["checks"][0]["also"] = {"format_effect_pct_low": {"greater": -1}}
    with pytest.raises(LedgerError, match="greater"):
        evaluate_claim(claim, {"feature_overlap": table}, ctx(False))


# --- selection: the agnostic forms test a marked layer on pairs that did not mark it -------------

# (claim, held-out changes): the selection half shows the seed's story at the marked layer, the
# held-out pairs do not (the selected layer regresses to the mean).
SELECTED_BY_CHANCE = {
    "overlap_layer_7": {7: {"overlap_pct": (35, 2), "format_effect_pct": (5, 3)}},
    "overlap_layer_8": {8: {"overlap_pct": (45, 2), "format_effect_pct": (0, 3)}},
    "overlap_layer_10": {10: {"overlap_pct": (55, 2)}},
    "re_entanglement": {10: {"overlap_pct": (50, 2)}},
    "amplification_layer_8": {8: {"amplification_geomean": (1.0, 0.1), "amplification_excess": (1.0, 0.1)}},
    "amplification_layer_10": {10: {"amplification_geomean": (1.0, 0.1), "amplification_excess": (1.0, 0.1)}},
    "amplification_layer_7_25": {7: {"amplification_geomean": (1.3, 0.05), "amplification_excess": (1.3, 0.05)}},
}


def on_all_pairs(claim: dict) -> dict:
    """The claim with its agnostic form reading the per_pair rows (marks and statistics of all pairs)."""
    text = yaml.safe_dump(claim).replace("per_pair_heldout", "per_pair")
    return yaml.safe_load(text)


@pytest.mark.parametrize("claim_id", sorted(SELECTED_BY_CHANCE))
def test_marked_layer_rules_fail_when_only_the_selection_half_shows_the_claim(claim_id):
    table = world(heldout=SELECTED_BY_CHANCE[claim_id])
    row = verdict(claim_id, table, literal=False)
    assert row["verdict"] == "fails", row["detail"]
    assert "held-out" in row["form_tested"]
    # The same rule on the per_pair rows, marked and measured on the same pairs, would hold here.
    again = evaluate_claim(on_all_pairs(LEDGER[claim_id]), {"feature_overlap": table}, ctx(False))
    assert again["form"] == "agnostic" and again["verdict"] == "holds", again["detail"]


def _noise_rows(variant: str, rng: np.random.Generator, marks: tuple[int, int]) -> pl.DataFrame:
    """32 layers of pure noise (no dip, no peak, no format effect), marked at `marks` = (min, middle max)."""
    overlap = 50 + rng.normal(0, 2, len(LAYERS))
    effect = rng.normal(0, 2, len(LAYERS))
    return pl.DataFrame({
        "layer": LAYERS, "variant": variant, "n_pairs": 32,
        "overlap_pct": overlap, "overlap_pct_low": overlap - 4, "overlap_pct_high": overlap + 4,
        "format_effect_pct": effect, "format_effect_pct_low": effect - 4, "format_effect_pct_high": effect + 4,
        "baseline_overlap_pct": overlap + effect, "baseline_overlap_pct_low": overlap + effect - 4,
        "baseline_overlap_pct_high": overlap + effect + 4,
        "is_min_overlap": [la == marks[0] for la in LAYERS], "is_max_overlap_middle": [la == marks[1] for la in LAYERS]})


def test_re_entanglement_fails_on_a_peak_of_the_selection_half_that_the_held_out_noise_lacks():
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
        pl.lit("per_pair").alias("variant"), pl.lit(64).alias("n_pairs")).with_columns(
        (pl.col("overlap_pct") - 3).alias("overlap_pct_low"), (pl.col("overlap_pct") + 3).alias("overlap_pct_high"),
        (pl.col("format_effect_pct") - 3).alias("format_effect_pct_low"),
        (pl.col("format_effect_pct") + 3).alias("format_effect_pct_high")).drop("sel_overlap", "sel_effect")
    table = pl.concat([all_pairs, held], how="diagonal_relaxed")
    row = verdict("re_entanglement", table, literal=False)
    assert row["verdict"] == "fails", row["detail"]
    assert "layer=15" in row["selected"] and row["n"] == 32
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
