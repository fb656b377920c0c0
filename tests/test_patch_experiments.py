"""The focus-layer patching experiments on the real embedded model and real prompts: the replacement
fraction, exhaustive head sets, the residual map and both directions; and their summaries on
made-up tables where the claim they test is false."""

import math

import numpy as np
import polars as pl
import pytest
import torch

from bugscope.data.baseline import score_prompts
from bugscope.patching.engine import HeadPatcher
from bugscope.patching.head_sets import exhaustive_head_sets, head_composition, named_head_sets
from bugscope.patching.pairs import DIRECTIONS, PatchSpec, direction_formats, make_pairs
from bugscope.patching.study import eligible_pairs, listed_pairs, logit_diffs_by_prompt, residual_map_rows
from bugscope.patching.summary import summarise
from bugscope.run.resources import n_exhaustive_sets
from tests.numerics import forward_tolerance, rounding_tolerance

LAYER = 10


@pytest.fixture(scope="module")
def patcher(embedded):
    model, tok = embedded
    return HeadPatcher(model, pad_token_id=tok.pad_token_id, max_prompts=4, batch_rows=12, progress=False)


@pytest.fixture(scope="module")
def pairs(prompts, ci_config):
    target, source = direction_formats(ci_config["prompts"], "fix")
    return make_pairs(prompts, target, source, "aligned")[:6]


@pytest.mark.numerical
def test_replacement_at_one_is_the_plain_patch_and_at_zero_no_patch(patcher, pairs):
    sets = {LAYER: [s for s in named_head_sets(patcher.n_heads) if s.name in ("all", "even", "odd")]}
    spec = PatchSpec(positions="aligned")
    plain, base = patcher.sweep(pairs, sets, spec)
    blended, _ = patcher.sweep(pairs, sets, spec, fractions=[0.0, 0.5, 1.0])
    at = {a: blended.filter(pl.col("fraction") == a).drop("fraction").sort("head_set", "prompt_id") for a in (0, .5, 1)}
    # a = 1 writes 1 * source + 0 * target: exactly the source's values, the same run as the plain patch
    assert at[1].equals(plain.sort("head_set", "prompt_id"))
    # a = 0 writes the run's own values: the unpatched logit difference, up to the patched run's rounding
    joined = at[0].join(base, on="prompt_id")
    tol = forward_tolerance(patcher.model, scale=float(joined["baseline_logit_diff"].abs().max()) + 1)
    assert (joined["logit_diff"] - joined["baseline_logit_diff"]).abs().max() <= tol
    # a = 0.5 is a real blend: neither end (the patch moves these targets)
    half = at[0.5]["logit_diff"].to_numpy()
    assert np.abs(half - at[1]["logit_diff"].to_numpy()).max() > 10 * tol
    assert np.abs(half - at[0]["logit_diff"].to_numpy()).max() > 10 * tol


@pytest.mark.numerical
def test_residual_map_at_the_last_layer_and_decision_position_gives_the_source(patcher, pairs):
    last = patcher.n_layers - 1
    rows = residual_map_rows(patcher, pairs, [last, LAYER])
    source = patcher.unpatched_logit_diffs([p.source for p in pairs])
    got = rows.filter(pl.col("layer") == last, pl.col("rank") == 0).sort("prompt_id")
    want = np.array([source[p.source["prompt_id"]] for p in sorted(pairs, key=lambda p: p.target["prompt_id"])])
    tol = forward_tolerance(patcher.model, scale=float(np.abs(want).max()) + 1)
    assert np.abs(got["logit_diff"].to_numpy() - want).max() <= tol
    # every matched position of every pair is mapped, at each layer
    n_positions = sum(len(p.target_positions) for p in pairs)
    assert rows.filter(pl.col("layer") == LAYER).height == n_positions
    # an early position at the last layer cannot reach the decision logit (attention is over)
    early = rows.filter(pl.col("layer") == last, pl.col("rank") > 0)
    assert (early["logit_diff"] - early["baseline_logit_diff"]).abs().max() <= tol


def test_exhaustive_sets_enumerate_every_subset_within_the_budget():
    sets = exhaustive_head_sets(9, pools=["even", "odd", "mixed"], budget=12870, samples=20, seed=0, layer=8)
    heads = [s.heads for s in sets]
    assert len(heads) == len(set(heads)) == 2 ** 9 - 1
    comps = {head_composition(h)[2] for h in heads}
    assert comps == {"even", "odd", "mixed"}
    assert all(head_composition(s.heads)[2] == "mixed" for s in sets if s.pool == "mixed")
    # beyond the budget: `samples` distinct seeded draws, the same on a rerun
    big = exhaustive_head_sets(32, pools=["even"], budget=100, samples=7, seed=3, layer=10)
    k8 = [s.heads for s in big if s.k == 8]
    assert len(k8) == len(set(k8)) == 7 and all(all(h % 2 == 0 for h in c) for c in k8)
    assert k8 == [s.heads for s in exhaustive_head_sets(32, pools=["even"], budget=100, samples=7, seed=3,
                                                        layer=10) if s.k == 8]
    # the 8B default budget covers every 8 of Llama's 16 even heads
    full = exhaustive_head_sets(32, pools=["even"], budget=12870, samples=20, seed=0, layer=10)
    assert sum(1 for s in full if s.k == 8) == math.comb(16, 8)


def test_resource_count_matches_the_enumeration(ci_config):
    for pools in (["even", "odd", "mixed"], ["all"], ["mixed"]):
        cfg = {**ci_config, "patching": {**ci_config["patching"],
                                          "exhaustive": {**ci_config["patching"]["exhaustive"], "pools": pools}}}
        n = ci_config["model"]["num_heads"]
        ex = cfg["patching"]["exhaustive"]
        got = exhaustive_head_sets(n, pools=pools, budget=ex["budget"], samples=ex["samples"], seed=0, layer=0,
                                   sizes=ex["sizes"])
        assert n_exhaustive_sets(cfg) == len(got)


def _made_up(direction, base, src, ld):
    n = len(base)
    return pl.DataFrame({"layer": [0] * n, "head_set": ["even"] * n, "prompt_id": list(range(n)),
                         "pair_id": list(range(n)), "baseline_logit_diff": base, "source_logit_diff": src,
                         "logit_diff": ld})


def test_break_direction_success_is_taking_the_sources_wrong_answer():
    # Targets right unpatched; sources 0-2 wrong (eligible), 3 right (not). The patch makes target 0
    # wrong and leaves 1 and 2 right: success 1/3 in the break direction.
    t = _made_up("break", [1.0, 1.0, 2.0, 1.0], [-1.0, -2.0, -1.0, 1.0], [-0.5, 0.5, 1.5, -3.0])
    row = summarise(t, keys=["layer", "head_set"], n_resamples=200, confidence=0.95, seed=0,
                    direction="break").row(0, named=True)
    assert row["n_eligible"] == 3 and abs(row["success_rate"] - 1 / 3) < 1e-12
    # in the fix direction no target of this table is eligible (all are right)
    fix = summarise(t, keys=["layer", "head_set"], n_resamples=200, confidence=0.95, seed=0).row(0, named=True)
    assert fix["n_eligible"] == 0


def test_listed_pairs_counts_eligible_targets_of_each_listed_pair():
    prompts = pl.DataFrame({"prompt_id": [0, 1, 2, 3], "correct": ["9.8", "9.8", "3.4", "3.4"],
                            "wrong": ["9.11", "9.11", "3.25", "3.25"]}, schema_overrides={"prompt_id": pl.Int32})
    per_prompt = pl.DataFrame({
        "direction": ["fix"] * 4, "layer": [10] * 4, "head_set": ["even"] * 4, "family": ["even"] * 4,
        "prompt_id": [0, 1, 2, 3], "baseline_logit_diff": [-1.0, -1.0, -1.0, 1.0],
        "source_logit_diff": [1.0, 1.0, 1.0, 1.0], "logit_diff": [1.0, -0.5, 2.0, 1.0]},
        schema_overrides={"prompt_id": pl.Int32})
    out = listed_pairs(per_prompt, prompts, [["9.8", "9.11"], ["3.4", "3.25"], ["1.5", "1.25"]])
    by = {r["correct"]: r for r in out.to_dicts()}
    assert set(by) == {"9.8", "3.4"}  # a listed pair the prompt table lacks has no row
    assert by["9.8"]["n_eligible"] == 2 and by["9.8"]["n_success"] == 1 and by["9.8"]["works"] is False
    assert by["3.4"]["n_eligible"] == 1 and by["3.4"]["works"] is True


def test_workflow_experiment_tables(ci_workflow, ci_config):
    from bugscope import layout, tables

    focus = tables.read(tables.PATCHING_REPLACEMENT, ci_config, ci_workflow / layout.PATCHING_REPLACEMENT)[1][
        "focus_layers"]
    rep = tables.frame(tables.PATCHING_REPLACEMENT, ci_config, ci_workflow / layout.PATCHING_REPLACEMENT)
    assert set(rep["fraction"].unique().to_list()) == set(ci_config["patching"]["replacement"]["fractions"])
    assert set(rep["method"].unique().to_list()) == {"per_head", "original"}
    assert set(rep["layer"].unique().to_list()) == set(focus)
    # a = 1 is the plain patch: each eligible target's patched logit difference is the sweep's, up
    # to the rounding of another batch shape (a float32 forward through the whole model)
    got = tables.frame(tables.PATCHING_REPLACEMENT_PROMPTS, ci_config, ci_workflow / layout.PATCHING_REPLACEMENT_PROMPTS)
    sweep = tables.frame(tables.PATCHING_PROMPTS, ci_config, ci_workflow / layout.PATCHING_PROMPTS)
    keys = ["layer", "head_set", "prompt_id"]
    same = got.filter(pl.col("method") == "per_head", pl.col("fraction") == 1.0).select(*keys, "logit_diff").join(
        sweep.select(*keys, pl.col("logit_diff").alias("sweep")), on=keys)
    assert same.height == got.filter(pl.col("method") == "per_head", pl.col("fraction") == 1.0).height > 0
    tol = rounding_tolerance(torch.float32, scale=float(same["sweep"].abs().max()) + 1, reduction=1536, depth=31)
    assert (same["logit_diff"] - same["sweep"]).abs().max() <= tol

    ex = tables.frame(tables.PATCHING_EXHAUSTIVE, ci_config, ci_workflow / layout.PATCHING_EXHAUSTIVE)
    n = ci_config["model"]["num_heads"]
    k_sets = ex.filter(pl.col("pair_kind") == "all", pl.col("order") == "all").group_by("k").agg(pl.len())
    assert dict(k_sets.iter_rows()) == {1: math.comb(n, 1), 2: math.comb(n, 2)}
    assert set(ex["composition"].unique().to_list()) == {"even", "odd", "mixed"}

    rmap = tables.frame(tables.PATCHING_RESIDUAL_MAP, ci_config, ci_workflow / layout.PATCHING_RESIDUAL_MAP)
    assert set(rmap["layer"].unique().to_list()) == set(ci_config["layers"])
    assert rmap["rank"].min() == 0

    bi = tables.frame(tables.PATCHING_BIDIRECTIONAL, ci_config, ci_workflow / layout.PATCHING_BIDIRECTIONAL)
    assert set(bi["direction"].unique().to_list()) == {"fix", "break"}
    listed = tables.frame(tables.PATCHING_LISTED_PAIRS, ci_config, ci_workflow / layout.PATCHING_LISTED_PAIRS)
    assert set(zip(listed["correct"], listed["wrong"])) == {("9.8", "9.11")}
    for name in ("replacement", "residual_map", "subsets_exhaustive"):
        assert (ci_workflow / layout.figure(name, "svg")).stat().st_size > 1000


@pytest.mark.parametrize("n_heads", [9, 12])
def test_enumeration_yields_exactly_c_n_k_distinct_sets_per_size(n_heads):
    n_even, n_odd = (n_heads + 1) // 2, n_heads // 2
    sets = exhaustive_head_sets(n_heads, pools=["even", "odd", "all", "mixed"], budget=10 ** 6, samples=20, seed=0,
                                layer=1)
    for pool, members in (("even", n_even), ("odd", n_odd), ("all", n_heads)):
        for k in range(1, members + 1):
            got = [s.heads for s in sets if s.pool == pool and s.k == k]
            assert len(got) == len(set(got)) == math.comb(members, k), (pool, k)
    for k in range(2, n_heads + 1):
        for j in range(max(1, k - n_even), min(k - 1, n_odd) + 1):
            got = [s.heads for s in sets if s.pool == "mixed" and s.k == k and head_composition(s.heads)[1] == j]
            assert len(got) == len(set(got)) == math.comb(n_odd, j) * math.comb(n_even, k - j), (k, j)


@pytest.mark.numerical
def test_eligibility_from_the_baseline_stage_is_that_of_the_sweeps_own_unpatched_run(patcher, prompts, ci_config):
    # The eligible-only experiments read eligibility off the baseline stage's scores instead of
    # rerunning the model: the two unpatched runs must agree on every prompt, within the forward's
    # rounding, and so pick the same targets in both directions.
    rows = prompts.to_dicts()
    scores = score_prompts(patcher.model, rows, batch_size=8, pad_token_id=patcher.pad_token_id)
    from_baseline = logit_diffs_by_prompt(scores)
    layered = patcher.unpatched_logit_diffs(rows)
    tol = forward_tolerance(patcher.model, scale=max(abs(v) for v in layered.values()) + 1)
    assert max(abs(from_baseline[k] - layered[k]) for k in layered) <= tol
    n_eligible = 0
    for direction in DIRECTIONS:
        target, source = direction_formats(ci_config["prompts"], direction)
        all_pairs = make_pairs(prompts, target, source, "decision")
        picked = eligible_pairs(all_pairs, direction, from_baseline)
        assert picked == eligible_pairs(all_pairs, direction, layered)
        n_eligible += len(picked)
    assert 0 < n_eligible  # the comparison decided something
