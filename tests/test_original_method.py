"""The original procedure in full (bugscope.patching.original_method): batched generation against the original
code one prompt at a time, the string criterion, the decomposition summary, its ledger rows (made-up
tables, with the precondition tables, where each claim holds, fails, is inconclusive or is not testable)
and the real ci.yaml tables."""

from __future__ import annotations

import math

import polars as pl
import pytest
import torch

from bugscope import layout, tables
from bugscope.claims.evaluate import Context, evaluate_claim
from bugscope.claims.spec import load_ledger
from bugscope.io import read_table
from bugscope.patching import original_decomposition, original_method
from bugscope.patching.head_sets import HeadSet
from bugscope.stats import clopper_pearson
from tests.conftest import REPO
from tests.test_claims_paper import preconditions
from tests.test_claims_paper import rows as summary_rows

LAYER = 10
LEDGER = {c["id"]: c for c in load_ledger(REPO / "config" / "claims.yaml")}


def test_string_criterion_is_the_originals_with_the_pairs_numbers():
    ok = original_method.string_success
    assert ok("So 9.8 is bigger than 9.11.", "9.8", "9.11")
    assert ok("13.8 IS LARGER", "13.8", "13.15")  # lower-cased, as the original
    assert not ok("9.11 is bigger", "9.8", "9.11")
    assert not ok("9.8 is bigger, no, 9.11 is greater", "9.8", "9.11")  # names the wrong one too
    assert not ok("The answer is 9.8.", "9.8", "9.11")  # a number alone is not the phrase
    assert not ok("9.8 is bigger", "13.8", "13.15")  # not hard-coded to the seed's pair
    assert original_method.judge(" 9.8\n\nThe answer", "9.8", "9.11", "parse_answer")


def test_decomposition_pairs_start_with_the_seed_pair(prompts):
    pairs = original_method.decomposition_pairs(prompts, "qa", "simple", 2)
    assert len(pairs) == 4 and {p.target["pair_kind"] for p in pairs} == {"shorter_bigger"}
    assert sum(original_method.is_seed_prompt(p.target) for p in pairs) == 1
    assert all(p.target["question_id"] == p.source["question_id"] and p.source["format"] == "simple" for p in pairs)


@pytest.mark.numerical
@pytest.mark.parametrize("input_kind,decode_patch", [("prompt", True), ("scoring", True)])
def test_batched_generation_equals_the_original_one_prompt_at_a_time(prompts, embedded, input_kind, decode_patch):
    """Left-padded rows of different lengths, several head sets (and none) in one batch: every row's
    new tokens are the original code's on its unpadded prompt pair, hook live on every decoding step."""
    model, tok = embedded
    pairs = original_method.decomposition_pairs(prompts, "qa", "simple", 2)
    assert len({len(p.target["input_ids"]) for p in pairs}) > 1  # padding is exercised
    sets = [HeadSet("even", "even", (0, 2, 4, 6, 8), "even"), HeadSet("none", "none", (), "all")]
    got = original_method.generate_patched(model, tok, pairs, LAYER, sets, site="attn_out", positions="original",
                                           decode_patch=decode_patch, input_kind=input_kind, max_new_tokens=5,
                                           batch_rows=16)
    assert got.height == len(pairs) * len(sets)
    heads = {s.name: s.heads for s in sets}
    by_pid = {p.target["prompt_id"]: p for p in pairs}
    for hs, pid, new in got.select("head_set", "prompt_id", "new_tokens").iter_rows():
        p = by_pid[pid]
        ids = [original_method.generation_ids(r, input_kind, tok, True) for r in (p.target, p.source)]
        ref = original_method.generate_one_original(model, tok, *ids, LAYER, heads[hs], max_new_tokens=5,
                                                    decode_patch=decode_patch)
        assert new == ref, (hs, pid, input_kind, decode_patch)
        if hs == "none":  # the empty head set is the unpatched target
            plain = model.generate(input_ids=torch.tensor([ids[0]]), max_new_tokens=5, do_sample=False,
                                   pad_token_id=tok.pad_token_id)[0, len(ids[0]):].tolist()
            assert new == original_method.until_eos(plain, original_method.eos_ids(model, tok))


def test_decode_writer_replaces_generated_positions_by_the_source_first_position():
    n_heads, w = 3, 2
    values = torch.zeros(1, 4, n_heads, w)
    pos_mask = torch.tensor([[False, True, True, False]])
    head_mask = torch.tensor([[True, False, True]])
    first = torch.full((1, n_heads, w), 7.0)
    write = original_method._GenerationWriter(values, pos_mask, head_mask, first, True, n_heads)
    prefill = write(torch.ones(1, 4, n_heads * w)).reshape(1, 4, n_heads, w)
    assert (prefill[0, [0, 3]] == 1).all() and (prefill[0, 1:3, 1] == 1).all() and (prefill[0, 1:3, [0, 2]] == 0).all()
    step = write(torch.ones(1, 1, n_heads * w)).reshape(1, 1, n_heads, w)
    assert (step[0, 0, [0, 2]] == 7).all() and (step[0, 0, 1] == 1).all()
    off = original_method._GenerationWriter(values, pos_mask, head_mask, first, False, n_heads)
    off(torch.ones(1, 4, n_heads * w))
    assert (off(torch.ones(1, 1, n_heads * w)) == 1).all()


def _per_prompt(judged: dict[str, list[bool]], base=(False, False, True, False), src=(True, True, True, False)):
    """Four targets (pair 0 = the seed pair, both orders; pair 1) judged per setting."""
    plan = {s.name: s for s in original_method.settings("decision")}
    rows = []
    targets = [(0, 0, "9.8", "9.11", "correct_first"), (1, 0, "9.8", "9.11", "wrong_first"),
               (2, 1, "13.8", "13.15", "correct_first"), (3, 1, "13.8", "13.15", "wrong_first")]
    for name, values in judged.items():
        s = plan[name]
        for (pid, pair, c, w, order), v, b, sj in zip(targets, values, base, src):
            if s.pairs == "seed" and pid != 0:
                continue
            rows.append({**original_decomposition.setting_columns(s), "layer": 5, "head_set": "all", "heads": [0, 1],
                         "prompt_id": pid, "source_prompt_id": pid + 10, "question_id": pid, "pair_id": pair,
                         "pair_kind": "shorter_bigger", "order": order, "correct": c, "wrong": w, "generated": None,
                         "logit_diff": None, "judged": v, "baseline_judged": b, "source_judged": sj})
    return pl.DataFrame(rows, schema=original_decomposition.PER_PROMPT_SCHEMA)


def decomposition_summary_of(judged, **kw):
    """original_decomposition.summarise of hand-made per-prompt judgements (`_per_prompt`)."""
    return original_decomposition.summarise(_per_prompt(judged, **kw), n_resamples=200, confidence=0.95, seed=0)


def test_summary_rates_eligibility_and_paired_deltas():
    s = decomposition_summary_of({"original": [True] * 4, "all_pairs": [True, False, True, False],
                  "scoring_input": [True, True, True, False]})
    row = {r["setting"]: r for r in s.iter_rows(named=True)}
    assert row["original"]["n_prompts"] == 1 and row["original"]["original_success"] == 1.0
    assert row["original"]["n_eligible"] == 1 and row["original"]["success_rate"] == 1.0
    # all pairs: eligible = source right and target wrong unpatched: targets 0, 1 (2 is right, 3's source wrong)
    a = row["all_pairs"]
    assert (a["n_prompts"], a["n_pairs"], a["n_eligible"]) == (4, 2, 2)
    assert a["success_rate"] == 0.5 and a["original_success"] == 0.5
    assert a["delta_original_success"] == pytest.approx(-0.5)  # 0.5 minus the seed pair's single 1.0
    b = row["scoring_input"]  # paired with all_pairs on the same four targets: +1 of 4
    assert b["delta_original_success"] == pytest.approx(0.25) and b["delta_low"] <= 0.25 <= b["delta_high"]
    assert b["original_success_low"] <= b["original_success"] <= b["original_success_high"]
    assert math.isnan(row["original"]["delta_original_success"])  # no reference
    assert set(tables.ORIGINAL_DECOMPOSITION_COLUMNS) <= set(s.columns)


# --- ledger rows ------------------------------------------------------------------------------------
# The three claims need the bug (premise: baseline_contrast), a working whole-residual patch at the
# claim's layer (ceiling: head_patching) and sources judged right on every row they read
# (sources_judged). Rates are decided on intervals: success_rate on its exact interval over the
# n_eligible targets, original_success / delta_original_success on a bootstrap over n_pairs number
# pairs (fewer than 10 decide nothing). "100 %" is $all (0.8).

PAIRS = 20  # number pairs of the made-up decomposition: 40 targets, both orders


def _ctx(model="SmolLM2-135M-Instruct", focus=(5,)):
    return Context(model, "embedded", 14, 9, "qa", "simple", list(focus))


LLAMA = _ctx("Llama-3.1-8B-Instruct", (LAYER,))


def _needs(gap_low: float = 0.3, ceiling: float = 1.0) -> dict[str, pl.DataFrame]:
    """The precondition tables, passing by default: a format gap with lower bound `gap_low`, and at
    layers 5 and 10 a whole-residual patch fixing `ceiling` of 40 targets against 0/40 random heads."""
    ceil = [{"head_set": "resid_post", "family": "ceiling", "success_rate": ceiling},
            {"head_set": "random_k4", "family": "random_control", "success_rate": 0.0}]
    return {"baseline_contrast": preconditions(gap_low=gap_low)["baseline_contrast"],
            "head_patching": pl.concat([summary_rows(ceil, positions="decision", layer=layer) for layer in (5, 10)])}


def _table(**by_setting) -> pl.DataFrame:
    """A decomposition table at layers 5 and 10, head set all: setting -> {column: value} overrides
    (`ci`: the half-width of the bootstrap intervals, 0.02 unless given). Every setting judges 40
    targets of 20 pairs (the seed pair's settings one), sources right half of the time; a success
    rate is k of n_eligible targets with its exact interval."""
    rows = []
    for layer in (5, 10):
        for s in original_method.settings("decision"):
            seed = s.pairs == "seed"
            v = {"success_rate": 0.0, "original_success": 0.0, "delta_original_success": 0.0, "ci": 0.02,
                 "n_pairs": 1 if seed else PAIRS, "n_eligible": 1 if seed else 2 * PAIRS,
                 "source_success": 0.5, **by_setting.get(s.name, {})}
            n, ci, rate = v["n_eligible"], v["ci"], v["success_rate"]
            low, high = clopper_pearson(round(rate * n) if rate == rate else 0, n, 0.95)
            rows.append({**original_decomposition.setting_columns(s), "layer": layer, "head_set": "all",
                         "n_prompts": 1 if seed else 2 * PAIRS, "n_pairs": v["n_pairs"], "n_eligible": n,
                         "n_eligible_pairs": min(n, v["n_pairs"]), "success_rate": rate,
                         "success_low": float(low), "success_high": float(high),
                         "original_success": v["original_success"],
                         "original_success_low": max(v["original_success"] - ci, 0.0),
                         "original_success_high": min(v["original_success"] + ci, 1.0),
                         "delta_original_success": v["delta_original_success"],
                         "delta_low": v["delta_original_success"] - ci, "delta_high": v["delta_original_success"] + ci,
                         "baseline_success": 0.5, "source_success": v["source_success"]})
    return pl.DataFrame(rows)


def _result(claim_id, table, ctx=None, **needs) -> dict:
    return evaluate_claim(LEDGER[claim_id], {**_needs(**needs), "original_decomposition": table}, ctx or _ctx())


def _verdict(claim_id, table, ctx=None, **needs) -> str:
    return _result(claim_id, table, ctx, **needs)["verdict"]


def _not_testable(r: dict, why: str) -> None:
    assert r["verdict"] == "not testable here" and r["measured"] is None, r["detail"]
    assert r["detail"].startswith(f"not testable: {why}"), r["detail"]


def test_whole_attention_output_rows():
    # 40/40 eligible targets fixed, [0.91, 1]: holds; 20/40 [0.34, 0.66]: fails; 36/40 [0.76, 0.97]: neither
    holds = _result("whole_attention_output", _table(all_pairs={"success_rate": 1.0}))
    assert holds["verdict"] == "holds" and holds["form"] == "agnostic" and "setting=all_pairs" in holds["selected"]
    assert holds["n"] == PAIRS and "premise: format gap" in holds["detail"] and "ceiling: " in holds["detail"]
    r = _result("whole_attention_output", _table(all_pairs={"success_rate": 0.5}))
    assert r["verdict"] == "fails" and r["ci_high"] < 0.8, r["detail"]
    r = _result("whole_attention_output", _table(all_pairs={"success_rate": 0.9}))
    assert r["verdict"] == "inconclusive" and r["ci_low"] < 0.8 < r["ci_high"], r["detail"]
    # no eligible target (every target already right unpatched): the original's own measure decides
    none = {"success_rate": float("nan"), "n_eligible": 0}
    r = _result("whole_attention_output", _table(all_pairs={**none, "original_success": 0.0}))
    assert r["verdict"] == "fails" and r["metric"] == "original_success" and "null" in r["detail"], r["detail"]
    r = _result("whole_attention_output", _table(all_pairs={**none, "original_success": 1.0}))
    assert r["verdict"] == "holds" and r["metric"] == "original_success" and r["n"] == PAIRS
    r = _result("whole_attention_output", _table(all_pairs={**none, "original_success": 0.85, "ci": 0.1}))
    assert r["verdict"] == "inconclusive"
    # ... but not where the string criterion judges no source right: that measures the criterion
    r = _result("whole_attention_output", _table(all_pairs={**none, "original_success": 0.0, "source_success": 0.0}))
    _not_testable(r, "sources_judged: 0 of the sources")
    # a failing precondition withholds the verdict, whatever the decomposition says
    fixed = _table(all_pairs={"success_rate": 1.0})
    _not_testable(_result("whole_attention_output", fixed, gap_low=0.05), "premise: format gap on shorter_bigger")
    _not_testable(_result("whole_attention_output", fixed, ceiling=0.3), "ceiling: whole-residual patch at layer 5")
    # the literal form: the seed pair at layer 10 on Llama, one target judged. Its bootstrap is over
    # one number pair, so it decides nothing either way (the ledger would need `exact: true` for it)
    for value in (1.0, 0.0):
        r = _result("whole_attention_output", _table(original={"original_success": value}), LLAMA)
        assert r["verdict"] == "inconclusive" and r["form"] == "literal" and r["n"] == 1, r["detail"]
        assert "fewer than 10" in r["detail"]


def test_decode_time_row():
    def result(delta, **kw):
        return _result("whole_attention_output_decode_time", _table(no_decode_patch={"delta_original_success": delta,
                                                                                     **kw}))

    r = result(0.02)  # [0, 0.04] inside +/- 0.05
    assert r["verdict"] == "holds" and r["n"] == PAIRS and r["n_unit"] == "number pairs", r["detail"]
    r = result(-0.6)  # [-0.62, -0.58]
    assert r["verdict"] == "fails" and r["measured"] == pytest.approx(-0.6)
    assert result(0.02, ci=0.1)["verdict"] == "inconclusive"  # [-0.08, 0.12]: neither inside nor outside
    # 8 number pairs: a degenerate bootstrap decides nothing, however narrow
    r = result(0.02, n_pairs=8)
    assert r["verdict"] == "inconclusive" and "fewer than 10" in r["detail"]
    assert result(-0.6, n_pairs=8)["verdict"] == "inconclusive"
    r = _result("whole_attention_output_decode_time", _table(no_decode_patch={"delta_original_success": 0.02}),
                ceiling=0.3)
    _not_testable(r, "ceiling: whole-residual patch at layer 5")


def test_procedure_is_sound_row_names_the_factor_that_carries_the_gap():
    # the step of largest |delta| is read, its interval flipped to |delta|: [0.05, 0.09] <= 0.10
    small = _table(parse_answer={"delta_original_success": 0.05}, o_proj_input={"delta_original_success": -0.07})
    r = _result("original_procedure_is_sound", small)
    assert r["verdict"] == "holds" and "setting=o_proj_input" in r["selected"], r["detail"]
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((0.05, 0.09))
    big = _table(parse_answer={"delta_original_success": 0.05}, o_proj_input={"delta_original_success": -0.7})
    r = _result("original_procedure_is_sound", big)
    assert r["verdict"] == "fails" and r["measured"] == pytest.approx(0.7) and "setting=o_proj_input" in r["selected"]
    # |delta| 0.08 in [0.03, 0.13]: not shown to stay within 10 points, nor to leave them
    wide = _table(o_proj_input={"delta_original_success": -0.08, "ci": 0.05})
    assert _verdict("original_procedure_is_sound", wide) == "inconclusive"
    # departures (step -1) are not on the chain and never decide it
    off_chain = _table(per_head_generation_string={"delta_original_success": -0.9})
    assert _verdict("original_procedure_is_sound", off_chain) == "holds"
    # every step the claim reads must judge some source right, not only the one it selects
    unjudged = _table(o_proj_input={"delta_original_success": -0.7}, scoring_input={"source_success": 0.0})
    _not_testable(_result("original_procedure_is_sound", unjudged), "sources_judged: 0 of the sources")
    _not_testable(_result("original_procedure_is_sound", big, gap_low=0.05), "premise: format gap")


# --- the real ci.yaml run -----------------------------------------------------------------------------


def test_ci_workflow_decomposition(ci_workflow, ci_config):
    summary, meta = read_table(ci_workflow / layout.PATCHING_ORIGINAL_DECOMPOSITION,
                               kind=tables.PATCHING_ORIGINAL_DECOMPOSITION.kind)
    s = pl.from_arrow(summary)
    focus = meta["focus_layers"]
    plan = original_method.settings(ci_config["patching"]["positions"])
    assert set(s["setting"]) == {p.name for p in plan}
    assert s.height == len(plan) * len(focus) * 3 and set(s["head_set"]) == {"all", "even", "odd"}
    n = 2 * ci_config["patching"]["original_generation"]["n_pairs"]
    assert set(s.filter(pl.col("pairs") == "all")["n_prompts"]) == {n}
    assert set(s.filter(pl.col("pairs") == "seed")["n_prompts"]) == {1}
    assert (s["n_eligible"] <= s["n_prompts"]).all()
    ok = s.filter(pl.col("original_success_low").is_not_nan())
    assert ((ok["original_success_low"] <= ok["original_success"] + 1e-12)
            & (ok["original_success"] <= ok["original_success_high"] + 1e-12)).all()
    per_prompt = pl.from_arrow(read_table(ci_workflow / layout.PATCHING_ORIGINAL_DECOMPOSITION_PROMPTS,
                                          kind=tables.PATCHING_ORIGINAL_DECOMPOSITION_PROMPTS.kind)[0])
    gen = per_prompt.filter(pl.col("metric") != "logit_diff")
    assert gen["generated"].null_count() == 0 and per_prompt.filter(pl.col("metric") == "logit_diff")[
        "logit_diff"].null_count() == 0
    # the scoring input's judged text starts with the forced answer tokens (" 9." for the seed pair)
    seed = gen.filter(pl.col("input") == "scoring", pl.col("correct") == "9.8")
    assert seed["generated"].str.starts_with(" 9.").all()
    ledger = pl.from_arrow(read_table(ci_workflow / layout.CLAIMS, kind=tables.CLAIMS.kind)[0])
    rows = ledger.filter(pl.col("claim_id").is_in(["whole_attention_output", "whole_attention_output_decode_time",
                                                   "original_procedure_is_sound"]))
    # decided, or not testable with the precondition that failed and its numbers (the ci model lacks the bug)
    assert rows.height == 3 and ((rows["verdict"] != "not testable here")
                                 | rows["detail"].str.starts_with("not testable: premise")).all(), rows.select(
        "claim_id", "detail")
    assert (ci_workflow / layout.figure("original_decomposition", "svg")).stat().st_size > 1000


def test_figure_draws_every_setting_in_chain_order(tmp_path):
    from bugscope.figures import style
    from bugscope.figures.original import original_decomposition, setting_labels

    s = decomposition_summary_of({"original": [True] * 4, "all_pairs": [True, False, True, False],
                  "scoring_input": [True, True, True, False], "per_head_seed_pair": [True] * 4})
    labels = style.Labels("SmolLM2-135M-Instruct", "qa", "simple", 0.95)
    chart = original_decomposition(s, labels)
    order = setting_labels(s)
    assert [o.split(" ")[1] for o in order] == ["original", "all_pairs", "scoring_input", "per_head_seed_pair"]
    spec = chart.to_dict()
    rows = [r for d in spec["datasets"].values() for r in d]
    assert {r["setting"] for r in rows} == set(s["setting"]) and all(r["rate"] == r["rate"] for r in rows
                                                                      if r["rate"] is not None)  # no NaN
    out = style.save_chart(chart, {ext: tmp_path / f"f.{ext}" for ext in style.FIGURE_EXTS}, png_scale=1)
    assert out and (tmp_path / "f.svg").stat().st_size > 1000


@pytest.mark.numerical
def test_decode_time_patching_changes_generation_on_a_real_prompt(prompts, embedded):
    """The original keeps its hook live while it generates: each generated token's attention output
    at the layer is replaced by the source's first (sink) position. On the seed's own prompt pair,
    with all heads patched, that changes the generated tokens; the first new token (from the
    prefill, where both runs patch the same positions) is the same, so the change is in decoding."""
    model, tok = embedded
    pair = next(p for p in original_method.decomposition_pairs(prompts, "qa", "simple", 2)
                if original_method.is_seed_prompt(p.target))
    ids = [original_method.generation_ids(r, "scoring", tok, True) for r in (pair.target, pair.source)]
    heads = tuple(range(model.config.num_attention_heads))
    live, prefill = (original_method.generate_one_original(model, tok, *ids, LAYER, heads, max_new_tokens=8,
                                                           decode_patch=d) for d in (True, False))
    assert live[0] == prefill[0]
    differ = [i for i, (a, b) in enumerate(zip(live, prefill)) if a != b]
    assert differ and differ[0] >= 1, (tok.decode(live), tok.decode(prefill))
