"""The overlap and amplification rules of config/claims.yaml against their chance baselines: each
shipped rule holds on a made-up table where the seed's claim is true beyond the same-format
baseline, and fails where the level matches but the format effect (or the amplification beyond
the null) is not there."""

from __future__ import annotations

import polars as pl
import pytest

from bugscope import claims
from tests.conftest import REPO

LEDGER = {c["id"]: c for c in claims.load_ledger(REPO / "config" / "claims.yaml")}
LAYERS = list(range(32))
MIDDLE = range(8, 25)  # 0.25 * 32 .. 0.75 * 32


def ctx(literal: bool) -> claims.Context:
    model = "meta-llama/Llama-3.1-8B-Instruct" if literal else "SmolLM2-135M-Instruct"
    return claims.Context(model, "x", 32, 32 if literal else 9, "qa", "simple", [10])


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


def world(changes: dict | None = None) -> pl.DataFrame:
    """A feature_overlap table (per_pair and pooled rows of 32 layers) of SEED_WORLD with `changes`."""
    spec = {layer: dict(SEED_WORLD.get(layer, {})) for layer in LAYERS}
    for layer, cols in (changes or {}).items():
        spec[layer].update(cols)
    default = {"overlap_pct": (50, 2), "format_effect_pct": (0, 3), "amplification_geomean": (1.0, 0.1),
               "amplification_excess": (1.0, 0.1), "baseline_overlap_pct": (50, 2),
               "swapped_order_overlap_pct": (90, 1), "amplification_geomean_null": (1.0, 0.05),
               "amplification_original_mean_of_ratios": (1.2, 0.1)}
    rows = []
    for layer in LAYERS:
        row = {"layer": layer, "variant": "per_pair", "n_pairs": 64}
        for col, dflt in default.items():
            v, half = spec[layer].get(col, dflt)
            row.update({col: float(v), f"{col}_low": float(v - half), f"{col}_high": float(v + half)})
        rows.append(row)
    per_pair = pl.DataFrame(rows)
    lo = min(LAYERS, key=lambda la: per_pair["overlap_pct"][la])
    hi = max(MIDDLE, key=lambda la: per_pair["overlap_pct"][la])
    per_pair = per_pair.with_columns((pl.col("layer") == lo).alias("is_min_overlap"),
                                     (pl.col("layer") == hi).alias("is_max_overlap_middle"))
    pooled = pl.DataFrame({
        "layer": LAYERS, "variant": "pooled", "n_pairs": 64,
        "overlap_pct": [float(spec[la].get("pooled_overlap", spec[la].get("overlap_pct", (50, 0)))[0]) for la in LAYERS],
        "amplification_original_mean_of_ratios": [float(spec[la].get("pooled_amplification", 1.2)) for la in LAYERS],
        "is_min_overlap": False, "is_max_overlap_middle": False})
    # The literal forms read the original study's own measurement (one pair, at prompt_last).
    single = pooled.with_columns(pl.lit("original_single_pair").alias("variant"), pl.lit(1).alias("n_pairs"))
    return pl.concat([per_pair, pooled, single], how="diagonal_relaxed")


def verdict(claim_id: str, table: pl.DataFrame, literal: bool) -> dict:
    row = claims.evaluate_claim(LEDGER[claim_id], {"feature_overlap": table}, ctx(literal))
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
    assert claims.evaluate_claim(claim, {"feature_overlap": table}, ctx(False))["verdict"] == "fails"
    form["checks"][0]["also"] = {"format_effect_pct_low": {"at_least": -1}}
    assert claims.evaluate_claim(claim, {"feature_overlap": table}, ctx(False))["verdict"] == "holds"
    form["checks"][0]["also"] = {"format_effect_pct_low": {"greater": -1}}
    with pytest.raises(claims.LedgerError, match="greater"):
        claims.evaluate_claim(claim, {"feature_overlap": table}, ctx(False))
