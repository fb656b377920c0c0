"""The seed's feature and SAE claims added to the ledger with the paper's (layer-25 features, the
up/down pattern, the feature -> head lists, the reconstruction loss), each on a made-up table where
it holds and on one where it is false."""

from __future__ import annotations

import polars as pl

from bugscope.claims.evaluate import evaluate_claim
from bugscope.claims.spec import load_ledger
from tests.conftest import REPO
from tests.test_claims import ctx

LEDGER = {c["id"]: c for c in load_ledger(REPO / "config" / "claims.yaml")}
LLAMA = ctx(model="Llama-3.1-8B-Instruct", focus=(10,), num_heads=32, num_layers=32)
MLP_SET = "mlp_out"  # the set of config/llama31_8b.yaml with the seed's release and site


def verdict(claim_id: str, context=LLAMA, **tables) -> dict:
    return evaluate_claim(LEDGER[claim_id], tables, context)


def named(layer: int, features: dict[int, tuple[float, float]]) -> pl.DataFrame:
    """Named-feature rows {feature_id: (mean_buggy, mean_correct)} of the MLP-output set, with a
    ratio CI of +/- 5 % around the ratio."""
    rows = [{"sae_set": MLP_SET, "layer": layer, "category": "c", "feature_id": f, "mean_buggy": b, "mean_correct": c,
             "ratio": b / c, "ratio_low": 0.95 * b / c, "ratio_high": 1.05 * b / c, "n_pairs": 40}
            for f, (b, c) in features.items()]
    return pl.DataFrame(rows)


def test_layer_25_features_at_their_activations_and_directions():
    right = named(25, {11813: (2.5, 1.5), 20139: (2.6, 1.0), 15508: (3.5, 2.0), 10049: (1.2, 2.5), 11664: (1.0, 2.3)})
    assert verdict("layer_25_wrong_answer_features", named_features=right)["verdict"] == "holds"
    assert verdict("layer_25_correct_answer_features", named_features=right)["verdict"] == "holds"
    # 15508 as active in both formats: not discriminative for the wrong answer
    flat = named(25, {11813: (2.5, 1.5), 20139: (2.6, 1.0), 15508: (3.5, 3.5)})
    assert verdict("layer_25_wrong_answer_features", named_features=flat)["verdict"] == "fails"
    # the right directions at a tenth of the stated activation
    small = named(25, {10049: (0.1, 0.25), 11664: (0.1, 0.23)})
    assert verdict("layer_25_correct_answer_features", named_features=small)["verdict"] == "fails"
    # the ids at another layer only: not testable, never scored on other rows
    other = named(10, {11813: (2.5, 1.5), 20139: (2.6, 1.0), 15508: (3.5, 2.0)})
    assert verdict("layer_25_wrong_answer_features", named_features=other)["verdict"] == "not testable here"


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
    assert verdict("layer_25_wrong_answer_features", small, discriminative_features=holds)["verdict"] == "holds"
    assert verdict("layer_25_correct_answer_features", small, discriminative_features=holds)["verdict"] == "holds"
    # the top of many features, no larger than chance once all of them are corrected for
    chance = discriminative(depth_layer, (3.0, 1.0), (1.0, 3.0), "wrong_vs_right", q_value=0.4)
    assert verdict("layer_25_wrong_answer_features", small, discriminative_features=chance)["verdict"] == "fails"
    assert verdict("layer_25_correct_answer_features", small, discriminative_features=chance)["verdict"] == "fails"
    # significant but barely different
    flat = discriminative(depth_layer, (1.05, 1.0), (1.0, 1.05), "wrong_vs_right")
    assert verdict("layer_25_wrong_answer_features", small, discriminative_features=flat)["verdict"] == "fails"
    assert verdict("layer_25_correct_answer_features", small, discriminative_features=flat)["verdict"] == "fails"


def test_up_down_pattern_between_formats():
    pattern = {25523: (15.0, 10.0), 22441: (4.6, 2.8), 18967: (2.0, 1.0), 31205: (1.0, 2.0), 10049: (1.0, 1.8)}
    assert verdict("format_up_down_pattern", named_features=named(10, pattern))["verdict"] == "holds"
    # 10049 raised in Q&A too: the "suppressed" half of the pattern is false
    assert verdict("format_up_down_pattern", named_features=named(10, {**pattern, 10049: (2.0, 1.0)}))["verdict"] == "fails"
    # on any model: the top held-out buggy-up and buggy-down features keep their directions
    holds = discriminative(5, (2.0, 1.0), (1.0, 2.0), "buggy_vs_correct_heldout")
    assert verdict("format_up_down_pattern", ctx(), discriminative_features=holds)["verdict"] == "holds"
    flipped = discriminative(5, (2.0, 1.0), (2.0, 1.0), "buggy_vs_correct_heldout")
    assert verdict("format_up_down_pattern", ctx(), discriminative_features=flipped)["verdict"] == "fails"


LISTS = {10049: range(0, 16, 2), 11664: range(2, 18, 2), 8234: range(0, 32, 4), 15789: range(6, 22, 2),
         22156: range(0, 32, 2)}


def attribution(writers: dict[int, set[int]]) -> pl.DataFrame:
    """Head -> feature direct attribution at layer 10 in both formats: 1 from each writing head, 0 from the others."""
    rows = [{"sae_set": MLP_SET, "layer": 10, "feature_id": f, "format": fmt, "component": "head", "head": h,
             "direct_attribution": float(h in heads)}
            for f, heads in writers.items() for fmt in ("qa", "simple") for h in range(32)]
    return pl.DataFrame(rows)


def test_feature_head_lists():
    listed = {f: set(h) for f, h in LISTS.items()}
    assert verdict("feature_head_lists", head_feature_attribution=attribution(listed))["verdict"] == "holds"
    # 8234 written by the odd heads: its list is false
    wrong = {**listed, 8234: set(range(1, 32, 4))}
    r = verdict("feature_head_lists", head_feature_attribution=attribution(wrong))
    assert r["verdict"] == "fails"
    # one listed head that writes nothing breaks "every listed head above every other"
    gap = {**listed, 10049: set(range(0, 14, 2))}
    assert verdict("feature_head_lists", head_feature_attribution=attribution(gap))["verdict"] == "fails"


def test_reconstruction_loss_of_the_mlp_out_set():
    def quality(mse):
        return pl.DataFrame({"sae_set": ["residual", MLP_SET], "layer": [10, 10], "mse_corpus": [0.5, mse],
                             "ev_corpus": [0.7, 0.9], "n_tokens_corpus": [5000, 5000]})
    r = verdict("sae_reconstruction_loss", sae_quality=quality(0.009))
    assert (r["verdict"], r["sae_set"]) == ("holds", MLP_SET)  # the residual set's 0.5 is not read
    assert verdict("sae_reconstruction_loss", sae_quality=quality(0.02))["verdict"] == "fails"
