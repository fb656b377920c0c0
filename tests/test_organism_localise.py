"""Localisation scores (bugscope.organism.localise) on made-up patching tables."""

import polars as pl

from bugscope.organism.localise import localisation


def _row(layer, head_set, recovery, family="head_set", low=None, high=None, positions="aligned", n=30):
    return {"pair_kind": "shorter_bigger", "order": "all", "positions": positions, "layer": layer,
            "head_set": head_set, "family": family, "recovery": recovery,
            "recovery_low": recovery - 0.05 if low is None else low,
            "recovery_high": recovery + 0.05 if high is None else high, "n_eligible_pairs": n}


def _heads(planted_layer=9, found=(0, 2, 4, 6, 8, 3)):
    rows = [_row(layer, "all", 0.9 if layer == planted_layer else 0.1) for layer in (8, 9, 10)]
    rows += [_row(9, f"head{h}", 0.4 if h in found else 0.0, low=0.3 if h in found else -0.1) for h in range(9)]
    rows += [_row(9, "even", 0.85), _row(9, "odd", 0.02), _row(9, "resid_post", 0.95, family="ceiling"),
             _row(9, "random_k5", 0.1, family="random_control", high=0.2),
             _row(9, "all", 0.1, positions="decision")]  # another positions: not read
    return pl.DataFrame(rows)


def _scores(heads, residual_map=None):
    return {r["score"]: r for r in localisation(heads, residual_map, 9, [0, 2, 4, 6, 8], "aligned").iter_rows(named=True)}


def test_the_planted_layer_and_heads_are_found():
    residual_map = pl.DataFrame([{"pair_kind": "shorter_bigger", "order": "all", "layer": layer, "rank": rank,
                                  "recovery": 0.2 * rank + (0.5 if layer == 9 else 0.0)}
                                 for layer in (8, 9, 10) for rank in (0, 1)])
    s = _scores(_heads(), residual_map)
    assert s["head_sweep_layer_rank"]["value"] == 1.0 and s["head_sweep_layer_rank"]["n"] == 3
    assert s["head_sweep_choice"]["value"] == 9.0 and "the planted layer" in s["head_sweep_choice"]["detail"]
    assert s["residual_map_layer_rank"]["value"] == 1.0
    assert s["planted_head_precision"]["value"] == 5 / 6 and s["planted_head_recall"]["value"] == 1.0
    assert s["planted_set_recovery"]["value"] == 0.85 and s["ceiling_recovery"]["value"] == 0.95
    assert abs(s["planted_share_of_ceiling"]["value"] - 0.85 / 0.95) < 1e-12


def test_a_missed_layer_ranks_low_and_no_head_above_the_control_gives_no_precision():
    s = _scores(_heads(planted_layer=10, found=()))
    assert s["head_sweep_layer_rank"]["value"] == 2.0
    assert s["head_sweep_choice"]["value"] == 10.0 and "not the planted layer 9" in s["head_sweep_choice"]["detail"]
    assert s["planted_head_precision"]["value"] is None and s["planted_head_recall"]["value"] == 0.0
    assert "residual_map_layer_rank" not in s


def test_the_change_of_the_answers_is_paired_per_prompt_and_counts_the_flips():
    from bugscope.organism.localise import behaviour_change

    rows = [{"prompt_id": 4 * pair + 2 * o + f, "pair_id": pair, "pair_kind": "same_length", "format": fmt}
            for pair in range(10) for o in range(2) for f, fmt in enumerate(("qa", "simple"))]
    # unedited: right on exactly one order of every pair (accuracy 0.5, a degenerate bootstrap interval)
    unedited = pl.DataFrame(rows).with_columns(is_correct=(pl.col("prompt_id") // 2) % 2 == 0)
    flipped = {3, 7}  # two simple prompts of the order it got wrong now answered right
    planted = unedited.with_columns(is_correct=pl.col("is_correct") | pl.col("prompt_id").is_in(list(flipped)))
    out = {r["score"]: r for r in behaviour_change(unedited, planted, formats=["qa", "simple"], n_resamples=500,
                                                     confidence=0.95, seed=0).iter_rows(named=True)}
    simple, qa = out["simple_change_same_length"], out["qa_change_same_length"]
    assert simple["value"] == 2 / 20 and simple["n"] == 10 and "2 of 20 prompts changed" in simple["detail"]
    assert simple["low"] <= 0 < simple["high"]  # two flips over ten pairs: no change can be ruled out
    assert (qa["value"], qa["low"], qa["high"]) == (0.0, 0.0, 0.0)
