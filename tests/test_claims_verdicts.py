"""How the ledger decides (bugscope.claims.decide, .preconditions): three outcomes on intervals,
Holm within a family, windows that contain the null, every precondition failing on a made-up
table, the layer choice inside the uncertainty, and what the report says about the premise."""

from __future__ import annotations

import polars as pl
import pytest
import yaml

from bugscope.claims.decide import FAIL, INCONCLUSIVE, PASS, PTest, adjust_family, combine, region_outcome
from bugscope.claims.evaluate import Context, evaluate, evaluate_claim
from bugscope.claims.report import premise_statement, to_markdown
from bugscope.claims.spec import LedgerError, load_ledger
from bugscope.stats import clopper_pearson
from tests.conftest import REPO

LEDGER = {c["id"]: c for c in load_ledger(REPO / "config" / "claims.yaml")}


def ctx(focus=(5,), choice=None) -> Context:
    return Context("SmolLM2-135M-Instruct", "embedded", 14, 9, "qa", "simple", list(focus), focus_choice=choice or {})


def test_region_outcomes():
    assert region_outcome(0.85, 0.95, 0.8) == PASS
    assert region_outcome(0.1, 0.7, 0.8) == FAIL
    assert region_outcome(0.7, 0.9, 0.8) == INCONCLUSIVE
    assert region_outcome(0.0, 0.46, hi=0.2) == INCONCLUSIVE  # 0 of 6 cannot show "at most 20 %"
    assert region_outcome(0.0, 0.05, hi=0.2) == PASS
    # a bound at the null is strict: [0, 5] does not show an effect above 0, [-5, 0] shows none
    assert region_outcome(0.0, 5.0, 0.0, strict_lo=True) == INCONCLUSIVE
    assert region_outcome(-5.0, 0.0, 0.0, strict_lo=True) == FAIL
    assert combine([PASS, PASS]) == PASS and combine([PASS, INCONCLUSIVE]) == INCONCLUSIVE
    assert combine([INCONCLUSIVE, FAIL]) == FAIL and combine([]) == INCONCLUSIVE


def test_p_tests_are_holm_adjusted_within_a_family():
    tests = [PTest("a", 0.03, "effect"), PTest("b", 0.02, "effect"), PTest("c", 0.01, "effect", False)]
    assert all(t.outcome(0.05) in (PASS, FAIL) for t in tests)  # each alone is significant
    adjust_family(tests)
    assert [t.adjusted for t in tests] == pytest.approx([0.04, 0.04, 0.03])
    assert [t.outcome(0.05) for t in tests] == [PASS, PASS, FAIL]  # c is significant the other way
    adjust_family(more := [PTest("x", 0.03, "effect"), PTest("y", 0.03, "significant"), PTest("z", 0.5, "effect")])
    assert [t.outcome(0.05) for t in more] == [INCONCLUSIVE, INCONCLUSIVE, INCONCLUSIVE]
    assert PTest("n", 0.001, "not_significant").outcome(0.05) == FAIL
    assert PTest("n", 0.5, "not_significant").outcome(0.05) == INCONCLUSIVE  # absence is not shown by p > alpha


def _ledger_with(tmp_path, check: dict, study_value=1.25):
    claim = {"id": "w", "section": "s", "claim": "c", "study_value": study_value,
             "forms": [{"form": "agnostic", "description": "d", "checks": [check]}]}
    (tmp_path / "l.yaml").write_text(yaml.safe_dump({"claims": [claim]}))
    return tmp_path / "l.yaml"


def test_a_window_that_contains_the_null_is_refused(tmp_path):
    amplified = {"table": "feature_overlap", "metric": "amplification_geomean", "near": {"tolerance": 0.3}}
    with pytest.raises(LedgerError, match="contains its null 1"):
        load_ledger(_ledger_with(tmp_path, amplified))
    assert load_ledger(_ledger_with(tmp_path, {**amplified, "near": {"tolerance": 0.2}}))
    # "1.0x" is an equivalence claim about the null itself: allowed
    assert load_ledger(_ledger_with(tmp_path, {**amplified, "near": {"target": 1.0, "tolerance": 0.3}}))
    gap = {"table": "baseline_contrast", "metric": "accuracy_gap", "range": [-0.05, 0.3]}
    with pytest.raises(LedgerError, match="contains its null 0"):
        load_ledger(_ledger_with(tmp_path, gap))
    with pytest.raises(LedgerError, match="needs must be a list"):
        bad = yaml.safe_load(_ledger_with(tmp_path, {**gap, "range": [0.1, 0.3]}).read_text())
        bad["claims"][0]["needs"] = ["premise", "luck"]
        (tmp_path / "b.yaml").write_text(yaml.safe_dump(bad))
        load_ledger(tmp_path / "b.yaml")


def _contrast(low: float) -> pl.DataFrame:
    return pl.DataFrame({"pair_kind": ["shorter_bigger"], "buggy_format": ["qa"], "correct_format": ["simple"],
                         "n_pairs": [64], "accuracy_gap": [low + 0.1], "accuracy_gap_low": [low],
                         "accuracy_gap_high": [low + 0.2]})


def _patching(ceiling: tuple[int, int], rows: dict[str, tuple[int, int]], layer: int = 5, pairs: int = 30):
    """head_patching rows at one layer: (fixed, eligible) per head set; eligible pairs `pairs`."""
    sets = {"ceiling": ceiling, **rows}
    out = []
    for name, (k, n) in sets.items():
        low, high = clopper_pearson(k, n, 0.95)
        out.append({"method": "per_head", "positions": "decision", "pair_kind": "shorter_bigger", "order": "all",
                    "layer": layer, "head_set": name, "family": "ceiling" if name == "ceiling" else
                    "random_control" if name.startswith("random") else name, "n_eligible": n,
                    "n_eligible_pairs": pairs, "success_rate": k / n, "success_low": float(low),
                    "success_high": float(high)})
    return pl.DataFrame(out)


ODD_NEVER = {"id": "odd", "section": "heads", "claim": "odd heads never fix it", "study_value": 0,
             "needs": ["premise", "ceiling", "eligible_pairs"],
             "forms": [{"form": "agnostic", "description": "odd heads fix at most $none",
                        "checks": [{"table": "head_patching", "where": {"layer": "$focus", "head_set": "odd"},
                                    "metric": "success_rate", "at_most": "$none"}]}]}


def test_each_patching_precondition_fails_on_its_own_table():
    good = {"baseline_contrast": _contrast(0.2),
            "head_patching": _patching((38, 40), {"odd": (0, 40), "random_k4": (5, 40)})}
    assert evaluate_claim(ODD_NEVER, good, ctx())["verdict"] == "holds"
    cases = {
        "premise": {**good, "baseline_contrast": _contrast(0.05)},
        "ceiling: whole-residual": {**good, "head_patching": _patching((10, 40), {"odd": (0, 40)})},
        "beats random_k4": {**good, "head_patching": _patching((38, 40), {"odd": (0, 40), "random_k4": (36, 40)})},
        "eligible_pairs": {**good, "head_patching": _patching((38, 40), {"odd": (0, 40)}, pairs=12)},
    }
    for why, tables in cases.items():
        r = evaluate_claim(ODD_NEVER, tables, ctx())
        assert r["verdict"] == "not testable here" and r["detail"].startswith("not testable:"), why
        assert why in r["detail"], (why, r["detail"])
    # the precondition rows open the ledger, with their numbers
    ledger = evaluate([ODD_NEVER], cases["premise"], ctx())
    assert ledger["claim_id"].to_list()[:2] == ["precondition_premise", "precondition_ceiling_layer_5"]
    assert ledger["verdict"].to_list()[:2] == ["fails", "holds"]


def test_sources_judged_and_features_can_move_fail_on_their_own_tables():
    sound = LEDGER["original_procedure_is_sound"]
    need = {"baseline_contrast": _contrast(0.2), "head_patching": _patching((38, 40), {})}
    # a chain whose first step's criterion (the original string match) judges no source right: the
    # step that changes the metric moves the unpatched baseline, not the patch
    decomposition = pl.DataFrame({"setting": ["scoring_input", "parse_answer"], "step": [1, 2], "chain": [True, True],
                                  "layer": [5, 5], "head_set": ["all", "all"], "delta_original_success": [0.0, 0.58],
                                  "delta_low": [0.0, 0.25], "delta_high": [0.0, 0.9], "source_success": [0.0, 0.5],
                                  "n_eligible": [0, 1], "n_eligible_pairs": [0, 1], "n_pairs": [30, 30]})
    r = evaluate_claim(sound, {**need, "original_decomposition": decomposition}, ctx())
    assert r["verdict"] == "not testable here" and "sources_judged: 0 of the sources" in r["detail"], r["detail"]
    judged = decomposition.with_columns(pl.Series("source_success", [0.5, 0.5]))
    assert evaluate_claim(sound, {**need, "original_decomposition": judged}, ctx())["verdict"] == "fails"
    critical = LEDGER["even_heads_activate_critical_features"]
    saturated = pl.DataFrame({"sae_set": ["main"] * 2, "layer": [5, 5], "feature_set": ["top"] * 2, "pool": ["even"] * 2,
                              "k": [2, 1], "pairs": ["heldout"] * 2, "n_features": [5, 5], "mean_active": [5.0, 5.0],
                              "active_low": [5.0, 5.0], "active_high": [5.0, 5.0], "unpatched_active": [5.0, 5.0],
                              "source_active": [5.0, 5.0], "n_pairs": [30, 30], "head_set": ["a", "b"]})
    r = evaluate_claim(critical, {**need, "head_set_features": saturated}, ctx())
    assert r["verdict"] == "not testable here" and "features_can_move: 5 features active unpatched, 5" in r["detail"]
    moving = saturated.with_columns(pl.Series("unpatched_active", [1.0, 1.0]))
    assert evaluate_claim(critical, {**need, "head_set_features": moving}, ctx())["verdict"] != "not testable here"


def test_a_claim_at_the_focus_layer_is_evaluated_at_every_often_chosen_layer():
    tables = {"baseline_contrast": _contrast(0.2),
              "head_patching": pl.concat([_patching((38, 40), {"odd": (0, 40)}, layer=5),
                                          _patching((38, 40), {"odd": (30, 40)}, layer=8),
                                          _patching((38, 40), {"odd": (1, 40)}, layer=9)])}
    split = evaluate_claim(ODD_NEVER, tables, ctx(choice={5: 0.55, 8: 0.41, 9: 0.04}))
    assert split["verdict"] == "layer-dependent"
    assert "5 (55%): holds; 8 (41%): fails" in split["detail"] and "9 (" not in split["detail"]  # 4 % < 5 %
    same = evaluate_claim(ODD_NEVER, tables, ctx(choice={5: 0.55, 9: 0.41}))
    assert same["verdict"] == "holds" and "9 (41%): holds" in same["detail"]
    assert evaluate_claim(ODD_NEVER, tables, ctx())["verdict"] == "holds"  # a fixed focus: no choice to vary


def test_the_report_states_what_the_run_found_about_the_premise():
    for low, found in ((0.2, "This run finds the format-dependent bug"),
                       (-0.05, "This run does not find the format-dependent bug")):
        ledger = evaluate([ODD_NEVER], {"baseline_contrast": _contrast(low),
                                        "head_patching": _patching((38, 40), {"odd": (0, 40)})}, ctx())
        assert premise_statement(ledger).startswith(found)
        text = to_markdown(ledger, "Claims ledger")
        assert found in text and "## Preconditions of this run" in text
        assert ("30 eligible number pairs" in text) == (low > 0.1)  # the claim's n, with its unit, once testable


def test_a_claim_about_every_row_reads_every_rows_interval():
    """min + at_least and max(_abs) + at_most are claims about every row: one row whose interval
    lies outside fails the claim, one that straddles keeps it inconclusive, whatever the extreme
    point estimate says; an interval of |x| that straddles 0 reaches from 0 to its larger end."""
    form = {"form": "agnostic", "description": "no step moves it",
            "checks": [{"table": "original_decomposition", "where": {"chain": True, "layer": 5},
                        "metric": "delta_original_success", "aggregate": "max_abs", "at_most": 0.1,
                        "ci": ["delta_low", "delta_high"]}]}
    claim = {"id": "every", "section": "heads", "claim": "c", "study_value": 0, "forms": [form]}

    def steps(*intervals):
        return pl.DataFrame({"setting": [f"s{i}" for i in range(len(intervals))], "chain": True, "layer": 5,
                             "head_set": "all", "delta_original_success": [(a + b) / 2 for a, b in intervals],
                             "delta_low": [a for a, _ in intervals], "delta_high": [b for _, b in intervals],
                             "n_pairs": 30, "pair_kind": "shorter_bigger", "order": "all"})

    assert evaluate_claim(claim, {"original_decomposition": steps((-0.02, 0.04), (0.0, 0.06))}, ctx())["verdict"] \
        == "holds"
    # the largest point estimate (0.06) is inside, but another step's interval reaches 0.55
    wide = evaluate_claim(claim, {"original_decomposition": steps((0.03, 0.09), (-0.45, 0.55))}, ctx())
    assert wide["verdict"] == "inconclusive" and "every one of 2 rows: 1 pass, 0 fail" in wide["detail"]
    # a step at 0.05 whose interval reaches -0.3: |x| may be 0.3
    assert evaluate_claim(claim, {"original_decomposition": steps((-0.3, 0.05))}, ctx())["verdict"] == "inconclusive"
    assert evaluate_claim(claim, {"original_decomposition": steps((0.0, 0.02), (-0.6, -0.4))}, ctx())["verdict"] \
        == "fails"
