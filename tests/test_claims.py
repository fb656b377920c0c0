"""The claims ledger: verdicts on hand-made tables, the shipped ledger resolves to real columns, and
the ledger table of the real ci.yaml run."""

from __future__ import annotations

import polars as pl
import pytest

from bugscope import layout, tables
from bugscope.claims.evaluate import VERDICTS, Context, evaluate_claim
from bugscope.claims.select import resolve_value
from bugscope.claims.spec import TABLES, LedgerError, load_ledger, referenced_columns
from bugscope.config import load_config
from bugscope.features.attribution import PARITY_COLUMNS
from bugscope.features.discriminative import DISCRIMINATIVE_COLUMNS
from bugscope.features.named import NAMED_SCHEMA
from bugscope.features.pages import TOKEN_SCHEMA
from bugscope.io import read_metadata, read_table
from tests.conftest import REPO
from tests.figure_tables import accuracy_table, overlap_table, patching_summary

LEDGER = REPO / "config" / "claims.yaml"


# The SAE sets of config/llama31_8b.yaml: the literal forms read the MLP-output set.
LLAMA_SETS = Context.from_config(load_config(REPO / "config" / "llama31_8b.yaml"), None).sae_sets


def ctx(model="SmolLM2-135M-Instruct", focus=(5,), num_heads=9, num_layers=14) -> Context:
    sets = {"sae_sets": LLAMA_SETS} if "llama" in model.lower() else {}
    return Context(model, "embedded", num_layers, num_heads, "qa", "simple", list(focus) if focus else None,
                          **sets)


def overlap_rows(values: dict[int, float], ci: float = 2.0) -> pl.DataFrame:
    """A hand-made per_pair overlap table; marks the min layer and the max of layers 3..10."""
    layers = sorted(values)
    mids = [layer for layer in layers if 3 <= layer <= 10]
    lo = min(layers, key=values.get)
    hi = max(mids, key=values.get)
    return pl.DataFrame({
        "layer": layers, "variant": ["per_pair"] * len(layers), "n_pairs": [20] * len(layers),
        "n_number_pairs": [20] * len(layers),
        "is_min_overlap": [layer == lo for layer in layers], "is_max_overlap_middle": [layer == hi for layer in layers],
        "overlap_pct": [values[layer] for layer in layers],
        "overlap_pct_low": [values[layer] - ci for layer in layers],
        "overlap_pct_high": [values[layer] + ci for layer in layers],
    })


def claim(*forms, study_value=10) -> dict:
    return {"id": "c", "section": "test", "claim": "a claim", "study_value": study_value, "forms": list(forms)}


NEAR_MIN = {"form": "agnostic", "description": "min overlap about 10",
            "checks": [{"table": "feature_overlap", "where": {"variant": "per_pair", "is_min_overlap": True},
                        "metric": "overlap_pct", "near": {"tolerance": 10}}]}
LITERAL_L7 = {"form": "literal", "requires_model": "Llama-3.1-8B", "description": "layer 7",
              "checks": [{"table": "feature_overlap", "where": {"variant": "per_pair", "layer": 7},
                          "metric": "overlap_pct", "near": {"tolerance": 10}}]}


def test_near_holds_and_fails():
    holds = evaluate_claim(claim(NEAR_MIN), {"feature_overlap": overlap_rows({0: 50, 2: 12, 5: 70, 12: 40})}, ctx())
    assert holds["verdict"] == "holds" and holds["measured"] == 12 and holds["form"] == "agnostic"
    assert (holds["ci_low"], holds["ci_high"], holds["n"]) == (10, 14, 20) and "layer=2" in holds["selected"]
    fails = evaluate_claim(claim(NEAR_MIN), {"feature_overlap": overlap_rows({0: 50, 2: 35, 5: 70, 12: 40})}, ctx())
    assert fails["verdict"] == "fails" and fails["measured"] == 35 and "-> fail" in fails["detail"]
    # 19 [17, 21] straddles the window's edge (20): neither inside nor outside
    edge = evaluate_claim(claim(NEAR_MIN), {"feature_overlap": overlap_rows({0: 50, 2: 19, 5: 70, 12: 40})}, ctx())
    assert edge["verdict"] == "inconclusive" and "requires |overlap_pct - 10| <= 10 -> inconclusive" in edge["detail"]


def test_literal_form_needs_the_model_and_falls_back_to_the_agnostic_form():
    tables = {"feature_overlap": overlap_rows({0: 50, 2: 12, 7: 45, 12: 40})}
    small = evaluate_claim(claim(LITERAL_L7, NEAR_MIN), tables, ctx())
    # the literal form's reason for not being tested stays off a row the agnostic form decided
    assert small["form"] == "agnostic" and small["verdict"] == "holds" and "Llama-3.1-8B" not in small["detail"]
    llama = evaluate_claim(claim(LITERAL_L7, NEAR_MIN), tables, ctx(model="Llama-3.1-8B-Instruct"))
    assert llama["form"] == "literal" and llama["verdict"] == "fails" and llama["measured"] == 45


def test_not_testable_here():
    # feature ids of another model, with no agnostic form
    only_literal = evaluate_claim(claim(LITERAL_L7), {"feature_overlap": overlap_rows({0: 50, 7: 10})}, ctx())
    assert only_literal["verdict"] == "not testable here" and only_literal["measured"] is None
    # the table was not produced (stage missing)
    missing = evaluate_claim(claim(NEAR_MIN), {}, ctx())
    assert missing["verdict"] == "not testable here" and "not produced" in missing["detail"]
    # the literal layer was not analysed
    llama = evaluate_claim(claim(LITERAL_L7), {"feature_overlap": overlap_rows({0: 50, 8: 10})},
                                  ctx(model="meta-llama/Llama-3.1-8B-Instruct"))
    assert llama["verdict"] == "not testable here" and "no row" in llama["detail"]
    # $focus unresolved
    focus = {"form": "agnostic", "description": "d", "checks": [
        {"table": "feature_overlap", "where": {"layer": "$focus"}, "metric": "overlap_pct", "at_least": 0}]}
    unresolved = evaluate_claim(claim(focus), {"feature_overlap": overlap_rows({0: 1, 5: 2})}, ctx(focus=None))
    assert unresolved["verdict"] == "not testable here" and "focus" in unresolved["detail"]


def test_local_max_below_and_abs():
    form = {"form": "agnostic", "description": "re-entanglement", "checks": [
        {"table": "feature_overlap", "where": {"variant": "per_pair", "is_max_overlap_middle": True},
         "metric": "overlap_pct", "local_max": True}]}
    valley_peak = overlap_rows({0: 50, 2: 10, 6: 80, 12: 45})
    assert evaluate_claim(claim(form), {"feature_overlap": valley_peak}, ctx())["verdict"] == "holds"
    # not shown to be a local maximum is not shown to be none: inconclusive, never "fails"
    monotone = overlap_rows({0: 10, 2: 20, 6: 80, 12: 85})
    assert evaluate_claim(claim(form), {"feature_overlap": monotone}, ctx())["verdict"] == "inconclusive"

    below = {"form": "agnostic", "description": "bug", "checks": [
        {"table": "baseline_accuracy", "where": {"format": "$buggy_format"}, "metric": "accuracy",
         "below": {"where": {"format": "$correct_format"}}}]}
    acc = pl.DataFrame({"format": ["qa", "simple"], "n_prompts": [40, 40], "accuracy": [0.3, 0.7],
                        "accuracy_low": [0.2, 0.6], "accuracy_high": [0.4, 0.8]})
    assert evaluate_claim(claim(below), {"baseline_accuracy": acc}, ctx())["verdict"] == "holds"
    swapped = acc.with_columns(pl.Series("accuracy", [0.7, 0.3]), pl.Series("accuracy_low", [0.6, 0.2]),
                               pl.Series("accuracy_high", [0.8, 0.4]))
    assert evaluate_claim(claim(below), {"baseline_accuracy": swapped}, ctx())["verdict"] == "fails"
    # overlapping intervals: the point estimates differ, and decide nothing
    close = acc.with_columns(pl.Series("accuracy_high", [0.65, 0.8]))
    assert evaluate_claim(claim(below), {"baseline_accuracy": close}, ctx())["verdict"] == "inconclusive"

    corr = {"form": "agnostic", "description": "r", "checks": [
        {"table": "head_parity", "where": {"layer": "$focus", "statistic": "point_biserial_r"}, "metric": "value",
         "aggregate": "max_abs", "at_least": 0.85, "exact": True, "also": {"p_value": {"at_most": 0.05}}}]}
    parity = pl.DataFrame({"layer": [5, 5, 5], "statistic": ["point_biserial_r"] * 3, "feature_id": [1, 2, 3],
                           "value": [0.2, -0.9, 0.5], "p_value": [0.5, 0.02, 0.3], "n_heads": [9, 9, 9]})
    r = evaluate_claim(claim(corr), {"head_parity": parity}, ctx())
    assert r["verdict"] == "holds" and r["measured"] == pytest.approx(0.9) and "feature_id=2" in r["selected"]
    # strong but not significant: the test withholds the verdict; weak and exact: fails
    weak = parity.with_columns(pl.Series("p_value", [0.5, 0.2, 0.3]))
    assert evaluate_claim(claim(corr), {"head_parity": weak}, ctx())["verdict"] == "inconclusive"
    small = parity.with_columns(pl.Series("value", [0.2, -0.5, 0.4]))
    assert evaluate_claim(claim(corr), {"head_parity": small}, ctx())["verdict"] == "fails"


def test_above_on_head_patching_tables():
    """Two arms of success counts are compared by Fisher's exact test (Holm within the section), on a
    real summary table whose rates and eligible counts are overwritten."""
    table = patching_summary(layers=(0, 5, 10), focus=(5,))
    even_odd = {"form": "agnostic", "description": "even above odd", "checks": [
        {"table": "head_patching", "where": {"layer": "$focus", "head_set": "even"}, "metric": "success_rate",
         "above": {"where": {"layer": "$focus", "head_set": "odd"}}, "ci": ["success_low", "success_high"]}]}

    def with_counts(counts: dict) -> pl.DataFrame:
        """Overwrite (layer, head_set) -> (fixed, eligible); the rest keep 0 of 20."""
        df = table.with_columns(pl.lit(20, dtype=pl.Int64).alias("n_eligible"), pl.lit(0.0).alias("success_rate"))
        for (layer, hs), (k, n) in counts.items():
            m = (pl.col("layer") == layer) & (pl.col("head_set") == hs)
            df = df.with_columns(pl.when(m).then(k / n).otherwise(pl.col("success_rate")).alias("success_rate"),
                                 pl.when(m).then(n).otherwise(pl.col("n_eligible")).alias("n_eligible"))
        return df

    apart = with_counts({(5, "even"): (18, 20), (5, "odd"): (2, 20)})
    r = evaluate_claim(claim(even_odd), {"head_patching": apart}, ctx())
    assert r["verdict"] == "holds" and r["measured"] == 0.9 and "18/20 vs 2/20" in r["detail"]
    assert "Fisher" in r["detail"] and "head_set=even" in r["selected"]
    close = with_counts({(5, "even"): (18, 20), (5, "odd"): (15, 20)})  # p = 0.41
    assert evaluate_claim(claim(even_odd), {"head_patching": close}, ctx())["verdict"] == "inconclusive"
    reversed_ = with_counts({(5, "even"): (2, 20), (5, "odd"): (18, 20)})
    assert evaluate_claim(claim(even_odd), {"head_patching": reversed_}, ctx())["verdict"] == "fails"
    # 0 against 0 is no comparison at all
    zeros = with_counts({(5, "even"): (0, 6), (5, "odd"): (0, 6)})
    assert evaluate_claim(claim(even_odd), {"head_patching": zeros}, ctx())["verdict"] == "inconclusive"

    best = {"form": "agnostic", "description": "unique best layer", "checks": [
        {"table": "head_patching", "where": {"layer": "$focus", "head_set": "even"}, "metric": "success_rate",
         "above": {"where": {"layer": {"not": "$focus"}, "head_set": "even"}}}]}
    unique = with_counts({(0, "even"): (2, 20), (5, "even"): (19, 20), (10, "even"): (5, 20)})
    assert evaluate_claim(claim(best), {"head_patching": unique}, ctx())["verdict"] == "holds"
    tie = with_counts({(0, "even"): (2, 20), (5, "even"): (18, 20), (10, "even"): (17, 20)})
    r = evaluate_claim(claim(best), {"head_patching": tie}, ctx())
    assert r["verdict"] == "inconclusive" and "layer=10" in r["detail"]


def test_head_count_tokens():
    assert resolve_value("$half_even_heads", ctx(num_heads=32)) == 8
    assert resolve_value("$quarter_even_heads", ctx(num_heads=32)) == 4
    assert resolve_value("$half_even_heads", ctx(num_heads=9)) == 2


def test_ledger_shape_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("claims:\n  - {id: a, section: s, claim: c, study_value: 1, forms: "
                   "[{form: literal, description: d, checks: [{table: nope, metric: x, at_least: 1}]}]}\n")
    with pytest.raises(LedgerError, match="table 'nope'"):
        load_ledger(bad)


# --- the shipped ledger ---------------------------------------------------------------------------

REQUIRED_IDS = {"overlap_layer_7", "overlap_layer_8", "overlap_layer_10", "overlap_layer_25", "feature_25523_ratio",
                "feature_22441_ratio", "even_heads_16", "even_heads_8", "even_heads_4", "even_heads_0",
                "odd_heads_never", "only_layer_10", "even_head_feature_correlation", "re_entanglement"}


def decomposition_summary() -> pl.DataFrame:
    """The original-decomposition summary of a made-up per-prompt table (bugscope.patching.original_method)."""
    from tests.test_original_method import decomposition_summary_of

    return decomposition_summary_of({"original": [True] * 4, "all_pairs": [True, False, True, False]})


def producer_columns() -> dict[str, set[str]]:
    """Columns of each ledger table as its producer writes them."""
    from bugscope.sae.quality import QUALITY_SCHEMA

    return {
        "feature_overlap": set(overlap_table().columns),
        "baseline_accuracy": set(accuracy_table().columns),
        "baseline_contrast": set(_contrast(1, 0).columns),
        "discriminative_features": set(DISCRIMINATIVE_COLUMNS),
        "named_features": set(NAMED_SCHEMA),
        "feature_tokens": set(TOKEN_SCHEMA),
        "head_parity": set(PARITY_COLUMNS),
        "head_patching": set(patching_summary().columns),
        "original_decomposition": set(decomposition_summary().columns),
        "sae_quality": set(QUALITY_SCHEMA.names),
    }


def test_every_claim_resolves_to_a_table_column():
    ledger = load_ledger(LEDGER)
    assert REQUIRED_IDS <= {c["id"] for c in ledger}
    assert all(spec.path for spec in TABLES.values())  # every stage has landed: no pending table
    known = producer_columns()
    for c in ledger:
        assert c["study_value"] is not None
        for form in c["forms"]:
            for check in form["checks"]:
                table = check["table"]
                if table not in known:  # baseline_scores: checked on the real run below
                    continue
                missing = set(referenced_columns(check)) - known[table]
                assert not missing, (c["id"], form["form"], table, missing)
        for spec in {check["table"] for form in c["forms"] for check in form["checks"]}:
            assert TABLES[spec].n_column is None or TABLES[spec].n_column in known.get(spec, {TABLES[spec].n_column})


def test_ci_ledger(ci_workflow):
    table, meta = read_table(ci_workflow / layout.CLAIMS, kind=tables.CLAIMS.kind)
    full = pl.from_arrow(table)
    # the precondition rows open the ledger: the premise, then the ceiling at each focus layer
    pre = full.filter(pl.col("section") == "preconditions")
    assert pre["claim_id"].to_list()[0] == "precondition_premise" and pre.height >= 2
    assert full["claim_id"].to_list()[:pre.height] == pre["claim_id"].to_list()
    assert (pre["detail"].str.contains("needs")).all()
    ledger = full.filter(pl.col("section") != "preconditions")
    ids = [c["id"] for c in load_ledger(LEDGER)]
    assert ledger["claim_id"].to_list() == ids
    assert set(full["verdict"].unique()) <= set(VERDICTS)
    # a claim whose precondition failed says which, with its numbers
    blocked = ledger.filter(pl.col("detail").str.starts_with("not testable:"))
    assert (blocked["verdict"] == "not testable here").all()
    tested = ledger.filter(pl.col("verdict") != "not testable here")
    assert tested["measured"].null_count() == 0 and tested["form"].null_count() == 0
    untested = ledger.filter(pl.col("verdict") == "not testable here")
    assert (untested["detail"].str.len_chars() > 0).all()
    # literal Llama forms are never tested on the embedded model
    assert tested.filter(pl.col("form") == "literal")["claim_id"].to_list() == ["bug_seed_prompt"]
    # the tested forms read the primary set; an agnostic one on a per-set table is compared with the mlp set
    assert set(tested["sae_set"].drop_nulls()) == {"main"}
    assert tested.filter(pl.col("sae_set") == "main")["detail"].str.contains("on the other SAE sets: mlp: ").all()
    # every real table the ledger read has the columns its checks name
    for name in meta["tables"]:
        path = layout.per_set(TABLES[name].path, "main")
        cols = set(pl.from_arrow(read_table(ci_workflow / path, kind=TABLES[name].kind)[0]).columns)
        if name == "baseline_scores":
            cols |= {"correct", "wrong"}
        for c in load_ledger(LEDGER):
            for form in c["forms"]:
                for check in form["checks"]:
                    if check["table"] == name:
                        assert set(referenced_columns(check)) <= cols, (c["id"], name)
    assert read_metadata(ci_workflow / layout.CLAIMS)["model"]
    assert (ci_workflow / layout.CLAIMS_MARKDOWN).read_text().startswith("# Claims ledger")


def _contrast(gap_shorter: float, gap_longer: float) -> pl.DataFrame:
    """Scores of 20 number pairs per kind (two orders each) whose correct format is right on every
    prompt of a kind, or wrong on all, so that the two kinds' gaps are the given ones (each in {-1, 0, 1})."""
    from bugscope.data.baseline import format_contrast

    rows = []
    for p in range(40):
        kind, gap = ("shorter_bigger", gap_shorter) if p < 20 else ("longer_bigger", gap_longer)
        for o in range(2):
            q = 2 * p + o
            correct_right, buggy_right = {1: (True, False), 0: (True, True), -1: (False, True)}[gap]
            rows += [{"question_id": q, "pair_id": p, "pair_kind": kind, "format": "simple", "is_correct": correct_right},
                     {"question_id": q, "pair_id": p, "pair_kind": kind, "format": "qa", "is_correct": buggy_right}]
    return format_contrast(pl.DataFrame(rows), buggy_format="qa", correct_format="simple", n_resamples=200,
                           confidence=0.95, seed=0)


def test_length_heuristic_control_fails_when_the_format_only_flips_the_heuristic():
    rule = next(c for c in load_ledger(LEDGER) if c["id"] == "format_effect_not_length_heuristic")
    flipped = _contrast(1, -1)  # buggy format wrong on shorter_bigger, as much better on longer_bigger
    assert flipped.filter(pl.col("pair_kind") == "shorter_bigger+longer_bigger")["accuracy_gap"][0] == 0
    r = evaluate_claim(rule, {"baseline_contrast": flipped}, ctx())
    assert r["verdict"] == "fails"
    genuine = _contrast(1, 0)  # worse on shorter_bigger, no better on longer_bigger
    assert evaluate_claim(rule, {"baseline_contrast": genuine}, ctx())["verdict"] == "holds"
    # no format gap: the premise fails, so the control is not testable (it is not "fails")
    no_bug = evaluate_claim(rule, {"baseline_contrast": _contrast(0, 0)}, ctx())
    assert no_bug["verdict"] == "not testable here" and no_bug["detail"].startswith("not testable: premise")
    # a gap on shorter_bigger, and a sum whose interval straddles 0
    noisy = genuine.with_columns(
        pl.when(pl.col("pair_kind") == "shorter_bigger+longer_bigger").then(-0.05).otherwise(
            pl.col("accuracy_gap_low")).alias("accuracy_gap_low"))
    assert evaluate_claim(rule, {"baseline_contrast": noisy}, ctx())["verdict"] == "inconclusive"


def _parity(r_by_feature: dict[int, float], layer: int = 10, familywise: float = 0.001) -> pl.DataFrame:
    """A hand-made head_parity table: point-biserial r (odd heads = 1) per feature, all significant
    on their own (p_value) and, unless `familywise` says otherwise, after the max-statistic correction."""
    return pl.DataFrame([{"layer": layer, "target": "difference", "feature_id": f, "statistic": "point_biserial_r",
                          "value": r, "p_value": 0.001, "familywise_p_value": familywise, "n_permutations": 10000,
                          "exact": False, "n_heads": 32}
                         for f, r in r_by_feature.items()])


def test_correlation_rules_are_signed_and_need_every_listed_id():
    ledger = {c["id"]: c for c in load_ledger(LEDGER)}
    even, odd = ledger["even_head_feature_correlation"], ledger["odd_head_feature_correlation"]
    llama = ctx(model="Llama-3.1-8B-Instruct", focus=(10,), num_heads=32, num_layers=32)
    even_ids = [10049, 11664, 8234, 15789, 22156]
    # The seed's values with the sign of "tied to the even heads" (odd = 1, so r < 0): holds.
    tied_even = _parity(dict(zip(even_ids, [-0.85, -0.88, -0.9, -0.92, -0.86])))
    r = evaluate_claim(even, {"head_parity": tied_even}, llama)
    assert r["verdict"] == "holds" and r["form"] == "literal"
    # The same strengths tied to the *odd* heads: |r| would pass; the signed rule fails.
    tied_odd = _parity(dict(zip(even_ids, [0.85, 0.88, 0.9, 0.92, 0.86])))
    assert evaluate_claim(even, {"head_parity": tied_odd}, llama)["verdict"] == "fails"
    assert evaluate_claim(odd, {"head_parity": _parity(dict(zip(
        [25523, 22441, 18967, 7823, 13492], [-0.85] * 5)))}, llama)["verdict"] == "fails"
    # Four of the five ids present: not scored on the subset, not testable (the agnostic form then
    # decides, on the focus layer's rows: here the same rows, which hold).
    partial = tied_even.filter(pl.col("feature_id") != 22156)
    r = evaluate_claim(even, {"head_parity": partial}, llama)
    assert r["form"] == "agnostic" and "[22156]" in r["detail"]


# --- selection: the most extreme of many features is tested with a correction, or on held-out pairs


def test_correlation_agnostic_rules_need_the_familywise_p_of_the_selected_feature():
    ledger = {c["id"]: c for c in load_ledger(LEDGER)}
    focus = ctx(focus=(5,))  # not Llama: the agnostic forms decide
    # 40 attributed features; the most negative r is -0.9, its own p 0.001 (it was chosen for it)
    rs = {f: 0.02 * (f - 20) for f in range(40)}
    for cid, extreme in (("even_head_feature_correlation", {7: -0.9}), ("odd_head_feature_correlation", {7: 0.9})):
        corrected = _parity({**rs, **extreme}, layer=5, familywise=0.01)
        r = evaluate_claim(ledger[cid], {"head_parity": corrected}, focus)
        assert r["form"] == "agnostic" and r["verdict"] == "holds" and "feature_id=7" in r["selected"], r["detail"]
        assert "familywise" in r["form_tested"]
        # by chance among 40: significant alone (p_value 0.001), not after the max-statistic correction
        # (absence of significance shows no absence of the effect: inconclusive)
        chance = _parity({**rs, **extreme}, layer=5, familywise=0.3)
        r = evaluate_claim(ledger[cid], {"head_parity": chance}, focus)
        assert r["verdict"] == "inconclusive" and "familywise_p_value: p=0.3" in r["detail"], r["detail"]
        # the most extreme feature is weaker than the claim: fails
        weak = _parity({**rs, 7: extreme[7] / 2}, layer=5, familywise=0.01)
        assert evaluate_claim(ledger[cid], {"head_parity": weak}, focus)["verdict"] == "fails"


def _heldout_features(direction: str, rates: list[tuple[float, float, tuple, tuple]], layer: int = 5) -> pl.DataFrame:
    """buggy_vs_correct_heldout rows of one direction: (firing_rate_a, firing_rate_b) on the ranking
    (even) pairs and the held-out firing-rate intervals ((low, high) of a, (low, high) of b), per rank."""
    rows = [{"layer": layer, "comparison": "buggy_vs_correct_heldout", "direction": direction, "rank": i,
             "feature_id": 100 + i, "effect_size": 1.0 if direction == "up" else -1.0, "mean_diff": 0.0,
             "mean_a": 1.0, "mean_b": 1.0, "firing_rate_a": fa, "firing_rate_b": fb, "p_value": 0.001,
             "q_value": 0.01, "significant": True, "n_a": 20, "n_b": 20, "n_tested": 300, "n_pairs": 20,
             "ratio": 1.0, "ratio_low": 0.9, "ratio_high": 1.1, "heldout_mean_a": 1.0, "heldout_mean_b": 1.0,
             "heldout_firing_rate_a": sum(ha) / 2, "heldout_firing_rate_b": sum(hb) / 2, "n_heldout_pairs": 20,
             "heldout_ratio": 1.0, "heldout_ratio_low": 0.9, "heldout_ratio_high": 1.1,
             "heldout_firing_rate_a_low": ha[0], "heldout_firing_rate_a_high": ha[1],
             "heldout_firing_rate_b_low": hb[0], "heldout_firing_rate_b_high": hb[1]}
            for i, (fa, fb, ha, hb) in enumerate(rates)]
    return pl.DataFrame(rows).select(DISCRIMINATIVE_COLUMNS)


def test_single_format_feature_rules_test_the_selected_feature_on_held_out_pairs():
    ledger = {c["id"]: c for c in load_ledger(LEDGER)}
    # buggy-only (up): the feature picked on the even pairs fires in 80 % / 5 % there; the held-out
    # firing-rate intervals decide
    for cid, direction, swap in (("feature_18967_qa_only", "up", False), ("feature_31205_simple_only", "down", True)):
        def table(held_a: tuple, held_b: tuple) -> pl.DataFrame:
            rates = [(0.8, 0.05, held_a, held_b), (0.6, 0.3, (0.5, 0.7), (0.2, 0.4)), (0.3, 0.02, (0.2, 0.4), (0, 0.1))]
            if swap:  # correct-only: the same with the formats exchanged
                rates = [(b, a, hb, ha) for a, b, ha, hb in rates]
            return _heldout_features(direction, rates)

        r = evaluate_claim(ledger[cid], {"discriminative_features": table((0.6, 0.9), (0.0, 0.08))}, ctx())
        assert r["form"] == "agnostic" and r["verdict"] == "holds" and "feature_id=100" in r["selected"], r["detail"]
        assert "held-out" in r["form_tested"] and "selection step" in r["detail"]
        # the same pick on the even pairs, but on the held-out pairs it fires in at most a third: fails
        r = evaluate_claim(ledger[cid], {"discriminative_features": table((0.1, 0.35), (0.0, 0.08))}, ctx())
        assert r["verdict"] == "fails" and r["measured"] == 0.8, r["detail"]
        # ... or fires in the other format too on the held-out pairs: fails
        assert evaluate_claim(ledger[cid], {"discriminative_features": table((0.6, 0.9), (0.2, 0.4))},
                              ctx())["verdict"] == "fails"
        # held-out intervals that straddle the thresholds: inconclusive
        assert evaluate_claim(ledger[cid], {"discriminative_features": table((0.4, 0.8), (0.0, 0.15))},
                              ctx())["verdict"] == "inconclusive"


def test_heldout_feature_ratio_rules_fail_when_the_top_feature_regresses_to_one():
    ledger = {c["id"]: c for c in load_ledger(LEDGER)}

    def table(low: float, high: float) -> pl.DataFrame:
        df = _heldout_features("up", [(0.9, 0.9, (0.8, 1.0), (0.8, 1.0))] * 3)
        return df.with_columns(pl.Series("mean_a", [3.0, 2.5, 2.0]), pl.Series("mean_b", [1.0, 1.0, 1.0]),
                               pl.Series("heldout_ratio", [(low + high) / 2] * 3),
                               pl.Series("heldout_ratio_low", [low] * 3), pl.Series("heldout_ratio_high", [high] * 3))
    for cid in ("feature_25523_ratio", "feature_22441_ratio"):
        assert evaluate_claim(ledger[cid], {"discriminative_features": table(1.55, 1.8)}, ctx())["verdict"] == "holds"
        # ranked first on the even pairs at 3x / 2.5x, about 1x on the held-out pairs
        assert evaluate_claim(ledger[cid], {"discriminative_features": table(0.95, 1.15)}, ctx())["verdict"] == "fails"
        assert evaluate_claim(ledger[cid], {"discriminative_features": table(1.3, 1.7)},
                              ctx())["verdict"] == "inconclusive"
        # fewer than 10 held-out number pairs: the bootstrap interval decides nothing
        few = table(1.55, 1.8).with_columns(pl.lit(6).alias("n_heldout_pairs"))
        r = evaluate_claim(ledger[cid], {"discriminative_features": few}, ctx())
        assert r["verdict"] == "inconclusive" and "fewer than 10" in r["detail"]


def test_a_literal_form_reads_the_sae_set_it_requires(tmp_path):
    """requires_sae picks the set by release and site; a run without it cannot test the form, and the
    primary set's rows never stand in for it."""
    claim = {"id": "x", "section": "sae", "claim": "k", "study_value": "50", "forms": [
        {"form": "literal", "requires_model": "Llama-3.1-8B",
         "requires_sae": {"release": "llama_scope_lxm_8x", "site": "mlp_out"}, "description": "literal",
         "checks": [{"table": "sae_quality", "where": {"layer": 10}, "metric": "l0_corpus", "range": [45, 60],
                    "exact": True}]},
        {"form": "agnostic", "description": "agnostic",
         "checks": [{"table": "sae_quality", "where": {"layer": 10}, "metric": "l0_corpus", "at_least": 1, "exact": True}]}]}
    quality = pl.DataFrame({"sae_set": ["residual", "mlp_out"], "layer": [10, 10], "l0_corpus": [120.0, 52.0],
                            "n_tokens_corpus": [100, 100]})
    llama = ctx("Llama-3.1-8B-Instruct", num_layers=32, num_heads=32)
    r = evaluate_claim(claim, {"sae_quality": quality}, llama)
    assert (r["verdict"], r["form"], r["measured"], r["sae_set"]) == ("holds", "literal", 52.0, "mlp_out")
    # the MLP-output set's L0 out of range: the literal form fails (the residual set's would not be read)
    r = evaluate_claim(claim, {"sae_quality": quality.with_columns(
        pl.when(pl.col("sae_set") == "mlp_out").then(200.0).otherwise(pl.col("l0_corpus")).alias("l0_corpus"))}, llama)
    assert (r["verdict"], r["form"]) == ("fails", "literal")
    # a run with only the residual set: the literal form is not testable; the agnostic one reads the primary set
    only_residual = Context(llama.model_name, "x", 32, 32, "qa", "simple", [10], LLAMA_SETS[:1])
    r = evaluate_claim(claim, {"sae_quality": quality}, only_residual)
    assert (r["form"], r["measured"], r["sae_set"]) == ("agnostic", 120.0, "residual")
    assert "llama_scope_lxm_8x at mlp_out" in r["detail"]
    import yaml

    bad = {**claim, "forms": [{**claim["forms"][0], "requires_sae": "llama_scope_lxm_8x"}]}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"claims": [bad]}))
    with pytest.raises(LedgerError, match="requires_sae"):
        load_ledger(tmp_path / "bad.yaml")


def test_an_agnostic_verdict_is_compared_across_sae_sets():
    """The same agnostic rule on every SAE set: agreement is reported, and a disagreement is visible."""
    claim = {"id": "x", "section": "sae", "claim": "l0", "study_value": "1", "forms": [
        {"form": "agnostic", "description": "agnostic",
         "checks": [{"table": "sae_quality", "where": {"layer": 10}, "metric": "l0_corpus", "at_most": 60, "exact": True}]}]}
    sets = LLAMA_SETS
    run = Context("m", "x", 32, 32, "qa", "simple", [10], sets)
    agree = pl.DataFrame({"sae_set": ["residual", "mlp_out"], "layer": [10, 10], "l0_corpus": [40.0, 52.0],
                          "n_tokens_corpus": [100, 100]})
    r = evaluate_claim(claim, {"sae_quality": agree}, run)
    assert (r["verdict"], r["sae_set"], r["agrees_across_sae_sets"]) == ("holds", "residual", True)
    r = evaluate_claim(claim, {"sae_quality": agree.with_columns(pl.Series("l0_corpus", [40.0, 90.0]))}, run)
    assert (r["verdict"], r["agrees_across_sae_sets"]) == ("holds", False) and "mlp_out: fails" in r["detail"]
    one = Context("m", "x", 32, 32, "qa", "simple", [10], sets[:1])
    assert evaluate_claim(claim, {"sae_quality": agree.head(1)}, one)["agrees_across_sae_sets"] is None


def test_a_set_without_the_claims_layer_is_not_testable_on_it():
    """config/llama31_8b.yaml's andyrdt Instruct set covers layers 3, 7, ..., 27 only: an agnostic claim
    at layer 10 is "not testable" on it, and agrees_across_sae_sets compares the sets that can test it."""
    claim = {"id": "x", "section": "sae", "claim": "l0", "study_value": "1", "forms": [
        {"form": "agnostic", "description": "agnostic",
         "checks": [{"table": "sae_quality", "where": {"layer": 10}, "metric": "l0_corpus", "at_most": 60, "exact": True}]}]}
    assert [s["name"] for s in LLAMA_SETS] == ["residual", "mlp_out", "instruct"]
    run = Context("m", "x", 32, 32, "qa", "simple", [10], LLAMA_SETS)
    instruct = [3, 7, 11, 15, 19, 23, 27]
    quality = pl.DataFrame({"sae_set": ["residual", "mlp_out", *["instruct"] * 7], "layer": [10, 10, *instruct],
                            "l0_corpus": [40.0, 52.0, *[30.0] * 7], "n_tokens_corpus": [100] * 9})
    r = evaluate_claim(claim, {"sae_quality": quality}, run)
    assert (r["verdict"], r["sae_set"], r["agrees_across_sae_sets"]) == ("holds", "residual", True)
    assert "instruct: not testable" in r["detail"] and "mlp_out: holds" in r["detail"]
    r = evaluate_claim(claim, {"sae_quality": quality.with_columns(
        pl.when(pl.col("sae_set") == "mlp_out").then(90.0).otherwise(pl.col("l0_corpus")).alias("l0_corpus"))}, run)
    assert (r["verdict"], r["agrees_across_sae_sets"]) == ("holds", False)
    # at a layer the Instruct set covers, it is tested like the others
    at7 = {**claim, "forms": [{**claim["forms"][0], "checks": [{**claim["forms"][0]["checks"][0], "where": {"layer": 7}}]}]}
    with_7 = pl.concat([quality, pl.DataFrame({"sae_set": ["residual"], "layer": [7], "l0_corpus": [45.0],
                                               "n_tokens_corpus": [100]})])
    r = evaluate_claim(at7, {"sae_quality": with_7}, run)
    assert (r["verdict"], r["agrees_across_sae_sets"]) == ("holds", True)
    assert "instruct: holds" in r["detail"] and "mlp_out: not testable" in r["detail"]
