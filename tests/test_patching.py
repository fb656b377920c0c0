"""Head patching on the real embedded model and real prompts: exactness, the original method, config errors."""

import math

import polars as pl
import pytest
import torch

from bugscope import layout
from bugscope.config import ConfigError, validate_config
from bugscope.focus import choice_layers, resolve_focus_layers
from bugscope.io import read_table
from bugscope.model.forward import decision_logits, logit_diff, make_batch
from bugscope.model.sites import head_input_module, site_module
from bugscope.patching.engine import HeadPatcher
from bugscope.patching.head_sets import (
    CEILING,
    HeadSet,
    PatchingConfigError,
    check_head_set,
    named_head_sets,
    subset_head_sets,
)
from bugscope.patching.pairs import ORIGINAL_METHOD, PatchPair, PatchSpec, make_pairs
from bugscope.patching.summary import bug_kind_rows, summarise
from tests.numerics import forward_tolerance, max_abs
from tests.oracle import sweep_naive

LAYER = 10


@pytest.fixture(scope="module")
def logit_scale(prompts, embedded):
    """The largest |decision logit| over the prompt set: the scale of a logit difference's rounding."""
    model, tok = embedded
    rows = prompts.to_dicts()
    return max(max_abs(decision_logits(model, make_batch(rows[i:i + 16], tok.pad_token_id, "cpu")))
               for i in range(0, len(rows), 16))


@pytest.fixture(scope="module")
def patcher(embedded):
    model, tok = embedded
    return HeadPatcher(model, pad_token_id=tok.pad_token_id, max_prompts=2, batch_rows=5, progress=False)


def _all_heads(n):
    return HeadSet("all", "all", tuple(range(n)), "all")


def _capture(model, layer):
    """Hooks recording the o_proj input and the attention output ([b, pos, width]) of `layer`."""
    got = {}
    h1 = head_input_module(model, layer).register_forward_pre_hook(lambda m, a: got.__setitem__("o_in", a[0].clone()))
    h2 = site_module(model, layer, "attn_out").register_forward_hook(
        lambda m, i, o: got.__setitem__("attn_out", (o[0] if isinstance(o, tuple) else o).clone()))
    return got, (h1, h2)


@pytest.mark.numerical
def test_identity_patch_leaves_logits_unchanged(prompts, patcher, embedded, logit_scale):
    model, tok = embedded
    tol = forward_tolerance(model, scale=logit_scale)
    rows = prompts.filter(pl.col("question_id") < 3).to_dicts()
    pairs = [PatchPair(r, r, list(range(r["n_tokens"])), list(range(r["n_tokens"]))) for r in rows]
    patched, base = patcher.sweep(pairs, {LAYER: [_all_heads(patcher.n_heads)], 0: [_all_heads(patcher.n_heads)]},
                                  PatchSpec(positions="aligned"))
    plain = {}
    for start in range(0, len(rows), patcher.max_prompts):  # the patcher's batches: same padding
        batch = make_batch(rows[start:start + patcher.max_prompts], tok.pad_token_id, "cpu")
        plain.update(zip(batch.prompt_ids.tolist(), logit_diff(decision_logits(model, batch), batch).tolist()))
    for row in patched.join(base, on="prompt_id").iter_rows(named=True):
        assert abs(row["logit_diff"] - row["baseline_logit_diff"]) <= tol
        # The engine's own unpatched run matches a plain model forward (readout of two logits only).
        assert abs(row["baseline_logit_diff"] - plain[row["prompt_id"]]) <= tol


@pytest.mark.numerical
def test_all_heads_all_positions_reproduce_source_attention_output(prompts, embedded):
    model, tok = embedded
    qa = prompts.filter(pl.col("format") == "qa")
    n = qa.group_by("n_tokens").len().filter(pl.col("len") >= 2)["n_tokens"][0]
    a, b = qa.filter(pl.col("n_tokens") == n).head(2).to_dicts()
    assert a["input_ids"] != b["input_ids"]
    patcher = HeadPatcher(model, pad_token_id=tok.pad_token_id, progress=False)
    got, handles = _capture(model, LAYER)
    try:
        patcher.capture([a], [LAYER], "z")
        clean_a = got["attn_out"]
        prep = patcher.prepare([PatchPair(b, a, list(range(n)), list(range(n)))], [LAYER], PatchSpec())
        patcher.run_patched(prep, LAYER, [_all_heads(patcher.n_heads)], "z")
        patched_b = got["attn_out"]
    finally:
        for h in handles:
            h.remove()
    assert patched_b.shape == clean_a.shape
    tol = forward_tolerance(model, scale=max_abs(clean_a), depth=LAYER + 1)
    assert (patched_b - clean_a).abs().max() <= tol


@pytest.mark.parametrize("spec", [PatchSpec(positions="aligned"), PatchSpec(positions="decision", operation="mean"),
                                  PatchSpec(positions="suffix", operation="zero"), ORIGINAL_METHOD],
                         ids=["aligned-patch", "decision-mean", "suffix-zero", "original-method"])
@pytest.mark.numerical
def test_optimised_equals_naive(prompts, patcher, spec, embedded, logit_scale):
    pairs = make_pairs(prompts.filter(pl.col("question_id") < 3), "qa", "simple", spec.positions)
    sets = named_head_sets(patcher.n_heads)
    plan = {2: [sets[1], sets[-1]], 20: sets[:3]}
    fast, _ = patcher.sweep(pairs, plan, spec)
    slow = sweep_naive(patcher, pairs, plan, spec)
    joined = fast.join(slow, on=["layer", "head_set", "prompt_id"], suffix="_naive")
    assert joined.height == fast.height == slow.height == len(pairs) * 5
    assert (joined["logit_diff"] - joined["logit_diff_naive"]).abs().max() <= forward_tolerance(
        embedded[0], scale=logit_scale)


def test_patched_run_reuses_keys_and_values_at_every_layer(prompts, patcher, monkeypatch):
    """With decision positions only, a patched run starts at the last column: every layer it runs
    must take the earlier columns' keys and values from the stand-in cache, or its attention would
    see one position only. A transformers release that stops passing our cache would fail here."""
    from bugscope.model import forward

    calls = []
    update = forward.KVPrefix.update
    monkeypatch.setattr(forward.KVPrefix, "update", lambda self, k, v, layer_idx, *a, **kw: (
        calls.append(layer_idx), update(self, k, v, layer_idx, *a, **kw))[1])
    pairs = make_pairs(prompts.filter(pl.col("question_id") < 2), "qa", "simple", "decision")
    prep = patcher.prepare(pairs, [LAYER], PatchSpec(positions="decision"))
    patcher.run_patched(prep, LAYER, [_all_heads(patcher.n_heads)], "z")
    assert calls == list(range(LAYER, patcher.n_layers))


def test_scores_and_records_shared_between_sweeps_change_no_bit(prompts, embedded, monkeypatch):
    """A sweep scores its sources in the one pass that reads them, and within `reusing_records` a
    second method reuses the targets' unpatched runs. Same batches on one machine: the numbers must
    be exactly those of running everything again, and nothing may be run twice."""
    model, tok = embedded
    pairs = make_pairs(prompts.filter(pl.col("question_id") < 3), "qa", "simple", "decision")
    n = HeadPatcher(model, pad_token_id=tok.pad_token_id, progress=False).n_heads
    plan = {LAYER: [*named_head_sets(n)[:3], CEILING]}

    def fresh():
        return HeadPatcher(model, pad_token_id=tok.pad_token_id, max_prompts=2, batch_rows=5, progress=False)

    sources = [p.source for p in pairs]
    expected_sources = fresh().unpatched_logit_diffs(sources)
    alone = [fresh().sweep(pairs, {LAYER: plan[LAYER][:3]}, spec)[0] for spec in (PatchSpec(positions="decision"),
                                                                                   ORIGINAL_METHOD)]

    shared = fresh()
    records = []
    record = shared.runner.record
    monkeypatch.setattr(shared.runner, "record", lambda *a, **kw: (records.append(1), record(*a, **kw))[1])
    scored = []  # the unpatched passes that score a batch (`unpatched_logit_diffs` runs one for a batch it lacks)
    unpatched_pass = shared.runner.unpatched_pass
    monkeypatch.setattr(shared.runner, "unpatched_pass", lambda *a, **kw: (
        scored.append(1) if kw.get("score") else None, unpatched_pass(*a, **kw))[1])
    with shared.reusing_records():
        first, _ = shared.sweep(pairs, plan, PatchSpec(positions="decision"))
        second, _ = shared.sweep(pairs, {LAYER: plan[LAYER][:3]}, ORIGINAL_METHOD)
    assert len(records) == math.ceil(len(pairs) / shared.max_prompts)  # one unpatched run per target batch
    n_scored = len(scored)
    assert shared.unpatched_logit_diffs(sources) == expected_sources  # scored in the sweep, no run left to do
    assert len(records) == math.ceil(len(pairs) / shared.max_prompts) and len(scored) == n_scored
    assert first.filter(pl.col("head_set") != CEILING.name).sort("head_set", "prompt_id").equals(
        alone[0].sort("head_set", "prompt_id"))
    assert second.sort("head_set", "prompt_id").equals(alone[1].sort("head_set", "prompt_id"))


@pytest.mark.numerical
def test_original_method_slices_after_o_proj(prompts, embedded):
    model, tok = embedded
    (pair,) = make_pairs(prompts.filter(pl.col("question_id") == 0), "qa", "simple", "original")
    patcher = HeadPatcher(model, pad_token_id=tok.pad_token_id, progress=False)
    width = patcher.d_model // patcher.n_heads
    m, h = len(pair.target_positions), 2
    block = model.model.layers[LAYER]
    got, handles = _capture(model, LAYER)
    # The residual after the attention block (input of post_attention_layernorm) sees the patched output.
    handles += (block.post_attention_layernorm.register_forward_pre_hook(
        lambda mod, a: got.__setitem__("mid", a[0].clone())),)
    try:
        patcher.capture([pair.target], [LAYER], "z")
        clean_t = {k: v[0] for k, v in got.items() if k != "mid"}
        patcher.capture([pair.source], [LAYER], "z")
        clean_s = {k: v[0] for k, v in got.items() if k != "mid"}
        prep = patcher.prepare([pair], [LAYER], ORIGINAL_METHOD)
        clean_mid = got["mid"][0]
        patcher.run_patched(prep, LAYER, [HeadSet("head2", "single", (h,), "even")], "attn_out")
        out = {k: v[0] for k, v in got.items()}
    finally:
        for hd in handles:
            hd.remove()
    cols = slice(h * width, (h + 1) * width)
    # The o_proj input (the true heads) is untouched ...
    assert torch.equal(out["o_in"], clean_t["o_in"])
    # ... and the attention output changes exactly in slice h of the o_proj *output*, at [:min_len],
    # by source minus target.
    change = out["mid"] - clean_mid
    expected = torch.zeros_like(change)
    expected[:m, cols] = clean_s["attn_out"][:m, cols] - clean_t["attn_out"][:m, cols]
    # Rounding scales with each position's residual norm (the sink at position 0 is ~100x the rest).
    tol = torch.tensor([forward_tolerance(model, scale=max_abs(row), depth=LAYER + 1) for row in clean_mid])
    assert ((change - expected).abs().amax(-1) <= tol).all()
    assert (change[:m, cols].abs().amax(-1) / tol[:m]).max() > 100


def test_clear_errors_for_heads_layers_and_empty_sets(patcher, prompts):
    n, layers = patcher.n_heads, patcher.n_layers
    with pytest.raises(PatchingConfigError, match=rf"heads 0\.\.{n - 1}"):
        check_head_set([0, n], n_heads=n, layer=3, n_layers=layers)
    with pytest.raises(PatchingConfigError, match=rf"layers 0\.\.{layers - 1}"):
        check_head_set([0], n_heads=n, layer=layers, n_layers=layers)
    with pytest.raises(PatchingConfigError, match="empty"):
        check_head_set([], n_heads=n, layer=3, n_layers=layers)
    pairs = make_pairs(prompts.filter(pl.col("question_id") == 0), "qa", "simple", "decision")
    with pytest.raises(PatchingConfigError, match="names head"):
        patcher.sweep(pairs, {3: [HeadSet("bad", "subset", (n + 3,), "all")]}, PatchSpec())
    with pytest.raises(PatchingConfigError, match="outside the model"):
        patcher.sweep(pairs, {layers + 2: [HeadSet("all", "all", (0,), "all")]}, PatchSpec())
    with pytest.raises(PatchingConfigError, match="sizes must be >= 1|empty head set"):
        subset_head_sets(n, pools=["even"], sizes=[0], samples=3, seed=0, layer=3)
    assert issubclass(PatchingConfigError, ConfigError)


def test_config_section_defaults_and_validation(ci_config):
    cfg = validate_config({"model": ci_config["model"]})
    assert cfg["patching"]["positions"] == "aligned" and cfg["patching"]["subsets"]["samples"] == 20
    with pytest.raises(ConfigError, match="patching"):
        validate_config({"model": ci_config["model"], "patching": {"subsets": {"sizes": [0]}}})
    with pytest.raises(ConfigError, match="patching"):
        validate_config({"model": ci_config["model"], "patching": {"positions": "everywhere"}})
    layers, source = resolve_focus_layers(cfg, None)
    assert layers == [cfg["model"]["num_layers"] // 2] and source == "fallback_middle_layer"


def test_focus_only_stages_run_at_the_two_most_chosen_layers(ci_config):
    """With auto, the focus layer is the all-pairs argmax; the exhaustive subsets, the interventions
    and the head-set features also run at the layer the overlap bootstrap chooses most often after
    it, if it is chosen often enough; never at more than two layers."""
    cfg = validate_config({"model": ci_config["model"]})

    def overlap(freqs: dict[int, float], marked: int) -> pl.DataFrame:
        return pl.DataFrame({"layer": list(freqs), "variant": ["per_pair"] * len(freqs),
                             "is_max_overlap_middle": [layer == marked for layer in freqs],
                             "argmax_middle_frequency": list(freqs.values())})

    split = overlap({3: 0.02, 4: 0.55, 6: 0.40, 7: 0.03}, marked=4)
    assert choice_layers(cfg, split) == ([4, 6], "overlap+bootstrap_choice")
    assert resolve_focus_layers(cfg, split) == ([4], "overlap")
    clear = overlap({4: 0.97, 6: 0.03}, marked=4)
    assert choice_layers(cfg, clear) == ([4], "overlap")
    assert choice_layers({**cfg, "focus_min_frequency": 0.01}, clear)[0] == [4, 6]
    assert choice_layers({**cfg, "focus_layers": [2, 5]}, split) == ([2, 5], "config")


def test_subsets_are_seeded_distinct_and_complete_when_small():
    kw = {"pools": ["even", "odd", "all"], "sizes": None, "samples": 20, "seed": 0, "layer": 10}
    a, b = subset_head_sets(9, **kw), subset_head_sets(9, **kw)
    assert a == b
    by = {}
    for s in a:
        by.setdefault((s.pool, s.k), []).append(s.heads)
    assert len(by[("even", 2)]) == math.comb(5, 2)  # 10 <= 20: every subset
    assert len(by[("all", 4)]) == 20 and len(set(by[("all", 4)])) == 20
    assert all(h % 2 == 1 for heads in by[("odd", 3)] for h in heads)
    assert subset_head_sets(9, **{**kw, "seed": 1}) != a


def test_success_counts_only_eligible_targets():
    # Four number pairs; the patch fixes targets 0 and 1, but target 1's source is wrong, so it is
    # not eligible; target 2 is eligible and stays wrong; target 3 is right unpatched.
    per_prompt = pl.DataFrame({
        "layer": [0] * 4, "head_set": ["even"] * 4, "prompt_id": [0, 1, 2, 3], "pair_id": [0, 1, 2, 3],
        "baseline_logit_diff": [-1.0, -1.0, -2.0, 1.0], "source_logit_diff": [1.0, -0.5, 2.0, 1.0],
        "logit_diff": [0.5, 0.2, -1.0, 1.0]})
    row = summarise(per_prompt, keys=["layer", "head_set"], n_resamples=200, confidence=0.95, seed=0).row(0, named=True)
    assert row["n_eligible"] == 2 and row["n_baseline_wrong"] == 3
    assert row["success_rate"] == 0.5  # 1 of the 2 eligible; the original's measure says 2 of 3
    assert abs(row["fixed_rate_all_wrong"] - 2 / 3) < 1e-12
    # recovery: ((0.5 + 1) + (-1 + 2)) / ((1 + 1) + (2 + 2)): a ratio of sums
    assert abs(row["recovery"] - 2.5 / 6) < 1e-12
    assert row["flip_rate"] == 0.5 and row["broken_rate"] == 0.0


def test_workflow_tables(ci_workflow):
    summary, meta = read_table(ci_workflow / layout.PATCHING_SUMMARY, kind="patching_summary")
    summary = pl.from_arrow(summary)
    assert {"config_hash", "model", "focus_layers", "focus_layer_source", "seed"} <= set(meta)
    # Every pair kind and order, each pooled too; the ledger and figures read the bug's kind pooled.
    assert set(summary["pair_kind"]) == {"all", "shorter_bigger", "longer_bigger", "same_length"}
    assert set(summary["order"]) == {"all", "correct_first", "wrong_first"}
    pooled = bug_kind_rows(summary)
    named = pooled.filter(pl.col("family").is_in(["all", "even", "odd", "single", "ceiling"]))
    # all, even, odd, 9 single heads and the ceiling at every layer
    assert named.group_by("layer").len()["len"].to_list() == [13] * named["layer"].n_unique()
    assert sorted(pooled.filter(pl.col("family") == "subset")["layer"].unique().to_list()) == meta["focus_layers"]
    control = pooled.filter(pl.col("family") == "random_control")
    assert sorted(control["head_set"].unique().to_list()) == ["random_k4", "random_k5"]  # odd and even pool sizes
    assert (pooled["n_eligible"] <= pooled["n_baseline_wrong"]).all()
    for col, (lo, hi) in {"success_rate": ("success_low", "success_high"), "broken_rate": ("broken_low", "broken_high"),
                          "recovery": ("recovery_low", "recovery_high"),
                          "mean_logit_diff": ("logit_diff_low", "logit_diff_high")}.items():
        ok = summary.filter(pl.col(col).is_not_nan() & pl.col(lo).is_not_nan())
        assert (ok[lo] <= ok[col] + 1e-12).all() and (ok[col] <= ok[hi] + 1e-12).all()
    # The ceiling at the last layer, decision position: the source's final residual, so the
    # target's logit difference becomes the source's and every eligible target is fixed.
    last = pooled.filter(pl.col("family") == "ceiling", pl.col("layer") == 29).row(0, named=True)
    assert last["success_rate"] == 1.0 and abs(last["recovery"] - 1) < 1e-3
    seed, _ = read_table(ci_workflow / layout.PATCHING_ORIGINAL_METHOD, kind="patching_summary")
    assert set(pl.from_arrow(seed)["method"].unique()) == {"original", "per_head"}


def test_ceiling_share_is_what_a_set_fixes_over_what_the_whole_residual_fixes():
    """20 eligible targets (10 pairs x 2 orders); at layer 3 the ceiling fixes 16, the even heads 16 of
    them (share 1 where success is only 0.8), the odd heads 8 (share 0.5); layer 4 has no ceiling row."""
    import numpy as np
    import polars as pl

    from bugscope.patching.summary import summary_table

    fixed = {"resid_post": set(range(16)), "even": set(range(16)), "odd": set(range(8))}
    rows = []
    for layer, sets in ((3, ("resid_post", "even", "odd")), (4, ("even",))):
        for name in sets:
            for p in range(20):
                rows.append({"layer": layer, "head_set": name, "prompt_id": p, "pair_id": p // 2,
                             "family": "ceiling" if name == "resid_post" else "named",
                             "logit_diff": 1.0 if p in fixed[name] else -1.0})
    per_prompt = pl.DataFrame(rows).with_columns(
        method=pl.lit("per_head"), positions=pl.lit("decision"), operation=pl.lit("patch"), direction=pl.lit("fix"),
        target_format=pl.lit("qa"), source_format=pl.lit("simple"), pool=pl.lit(None, pl.String), k=pl.lit(0),
        sample=pl.lit(0), heads=pl.lit([], pl.List(pl.Int64)), pair_kind=pl.lit("shorter_bigger"),
        order=pl.when(pl.col("prompt_id") % 2 == 0).then(pl.lit("correct_first")).otherwise(pl.lit("wrong_first")),
        baseline_logit_diff=pl.lit(-1.0), source_logit_diff=pl.lit(1.0))
    out = summary_table(per_prompt, n_resamples=500, confidence=0.95, seed=0).filter(
        pl.col("pair_kind") == "all", pl.col("order") == "all")
    share = {(r["layer"], r["head_set"]): r for r in out.iter_rows(named=True)}
    assert share[(3, "even")]["success_rate"] == pytest.approx(0.8)
    assert share[(3, "even")]["ceiling_share"] == pytest.approx(1.0)
    assert share[(3, "even")]["ceiling_share_low"] == pytest.approx(1.0)  # fixes every target the ceiling fixes
    assert share[(3, "resid_post")]["ceiling_share"] == pytest.approx(1.0)
    odd = share[(3, "odd")]
    assert odd["ceiling_share"] == pytest.approx(0.5) and odd["ceiling_share_low"] < 0.5 < odd["ceiling_share_high"]
    assert np.isnan(share[(4, "even")]["ceiling_share"])
