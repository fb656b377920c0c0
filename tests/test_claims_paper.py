"""The ledger rows of the published paper's claims (config/claims.yaml, source: paper), each on a
made-up table where the claim holds, one where it fails and one where it is inconclusive, and with
the preconditions the claims name (premise, ceiling, eligible pairs) passing or failing.

Every success rate is k of 40 eligible targets (both orders of 20 number pairs) with its exact
(Clopper-Pearson) 95 % interval: 40/40 is [0.91, 1], 36/40 [0.76, 0.97], 0/40 [0, 0.09],
4/40 [0.03, 0.24], 20/40 [0.34, 0.66]. The ledger's "100 %" is $all (0.8) and "0 %" $none (0.2)."""

from __future__ import annotations

import itertools

import polars as pl

from bugscope.claims.evaluate import evaluate_claim
from bugscope.claims.spec import load_ledger
from bugscope.patching.head_sets import head_composition
from bugscope.stats import clopper_pearson
from tests.conftest import REPO
from tests.test_claims import ctx

PAPER = {c["id"]: c for c in load_ledger(REPO / "config" / "claims.yaml") if c.get("source") == "paper"}
FOCUS = 5  # ctx()'s focus layer; ctx() has 9 heads: 5 even (0, 2, 4, 6, 8) and 4 odd
TARGETS, PAIRS = 40, 20


def rows(records: list[dict], n_eligible: int = TARGETS, n_eligible_pairs: int = PAIRS, **fixed) -> pl.DataFrame:
    """Summary rows of the bug's kind, both orders pooled, at the focus layer: each success_rate is
    round(rate * n_eligible) fixed targets, with the exact interval bugscope.stats gives it."""
    out = [{"pair_kind": "shorter_bigger", "order": "all", "layer": FOCUS, "n_eligible": n_eligible,
            "n_eligible_pairs": n_eligible_pairs, **fixed, **r} for r in records]
    df = pl.DataFrame(out)
    k = (df["success_rate"] * df["n_eligible"]).round().to_numpy()
    low, high = clopper_pearson(k, df["n_eligible"].to_numpy(), 0.95)
    return df.with_columns(success_low=pl.Series(low), success_high=pl.Series(high))


def preconditions(gap_low: float = 0.3, ceiling: float = 1.0, control: float = 0.0, ceiling_layer: int = FOCUS,
                  patched: tuple[dict, ...] = ()) -> dict[str, pl.DataFrame]:
    """The tables of the premise and the ceiling, passing by default: a format gap on the bug's kind
    with lower bound `gap_low`, and at the focus layer (decision position) a whole-residual patch
    fixing `ceiling` of the targets against a random-head control's `control`; `patched`: more
    head_patching rows."""
    contrast = pl.DataFrame({"pair_kind": ["shorter_bigger", "longer_bigger"], "n_pairs": [PAIRS, PAIRS],
                             "accuracy_gap": [gap_low + 0.2, 0.0], "accuracy_gap_low": [gap_low, -0.1],
                             "accuracy_gap_high": [gap_low + 0.4, 0.1]})
    ceil = [{"head_set": "resid_post", "family": "ceiling", "success_rate": ceiling, "layer": ceiling_layer},
            {"head_set": "random_k4", "family": "random_control", "success_rate": control}]
    return {"baseline_contrast": contrast, "head_patching": rows([*ceil, *patched], positions="decision")}


def result(claim_id: str, **tables) -> dict:
    """The claim's ledger row; the precondition tables pass unless `tables` replaces them."""
    return evaluate_claim(PAPER[claim_id], {**preconditions(), **tables}, ctx())


def verdict(claim_id: str, **tables) -> str:
    return result(claim_id, **tables)["verdict"]


def exhaustive(success, **fixed) -> pl.DataFrame:
    """One row per head set of 1-3 heads of the 9 and the set of all 9, success_rate = success(heads)."""
    recs = []
    for k in (1, 2, 3, 9):
        for heads in itertools.combinations(range(9), k):
            n_even, n_odd, comp = head_composition(heads)
            recs.append({"head_set": f"s{heads}", "k": k, "n_even": n_even, "n_odd": n_odd, "composition": comp,
                         "k_of_even_pool": k / 5, "k_of_heads": k / 9, "success_rate": success(heads)})
    return rows(recs, **fixed)


def even_only(heads) -> bool:
    return all(h % 2 == 0 for h in heads)


def even_threshold(heads):  # even-only sets of >= 3 (half of 5, rounded up) heads work
    return 1.0 if even_only(heads) and len(heads) >= 3 else 0.0


def near_all_rate(heads):  # the threshold, with one working set fixing 36/40 instead of 40/40
    return (0.9 if heads == (0, 2, 4) else 1.0) if even_threshold(heads) else 0.0


def test_threshold_claims_hold_on_a_sharp_even_threshold():
    table = exhaustive(even_threshold)
    r = result("paper_exhaustive_threshold", head_subsets_exhaustive=table)
    assert r["verdict"] == "holds" and r["measured"] == 1.0 and r["n"] == PAIRS
    # every precondition and check is printed with its numbers
    assert "premise: format gap on shorter_bigger" in r["detail"] and "lower bound >= 0.1 -> pass" in r["detail"]
    assert "fixes 40/40 eligible targets" in r["detail"] and "beats random_k4 (0/40)" in r["detail"]
    assert "eligible_pairs: 20 eligible number pairs; needs >= 20 -> pass" in r["detail"]
    assert "requires min(success_rate) >= 0.8 -> pass" in r["detail"]
    assert "requires max(success_rate) <= 0.2 -> pass" in r["detail"]
    assert verdict("paper_mixed_sets_fail", head_subsets_exhaustive=table) == "holds"
    assert verdict("paper_all_12870", head_subsets_exhaustive=exhaustive(
        lambda h: 1.0 if even_only(h) else 0.0)) == "holds"


def test_threshold_claims_fail_where_small_sets_work_or_mixed_sets_work():
    small = exhaustive(lambda h: 1.0 if even_only(h) and len(h) >= 2 else 0.0)
    r = result("paper_exhaustive_threshold", head_subsets_exhaustive=small)
    assert r["verdict"] == "fails" and "requires max(success_rate) <= 0.2 -> fail" in r["detail"]
    mixed = exhaustive(lambda h: 1.0 if len(h) >= 3 else 0.0)
    assert verdict("paper_mixed_sets_fail", head_subsets_exhaustive=mixed) == "fails"
    # one even-only set of the threshold size fixing half (20/40, [0.34, 0.66]) breaks "every one works"
    one_bad = exhaustive(lambda h: 0.5 if h == (0, 2) else (1.0 if even_only(h) else 0.0))
    r = result("paper_all_12870", head_subsets_exhaustive=one_bad)
    assert r["verdict"] == "fails" and r["measured"] == 0.5 and "head_set=s(0, 2)" in r["selected"]


def test_threshold_claims_are_inconclusive_where_an_interval_straddles_the_bound():
    # Under the old point-estimate rule (95 % / 5 %) these failed on 0.9 and 0.1; now 36/40 ([0.76,
    # 0.97]) and 4/40 ([0.03, 0.24]) straddle $all / $none, so neither verdict is shown.
    near_all = exhaustive(near_all_rate)
    r = result("paper_exhaustive_threshold", head_subsets_exhaustive=near_all)
    assert r["verdict"] == "inconclusive" and r["measured"] == 0.9
    assert "requires min(success_rate) >= 0.8 -> inconclusive" in r["detail"]
    assert verdict("paper_all_12870", head_subsets_exhaustive=exhaustive(
        lambda h: (0.9 if h == (0, 2) else 1.0) if even_only(h) else 0.0)) == "inconclusive"
    some_mixed = exhaustive(lambda h: 0.1 if len(h) >= 3 and not even_only(h) else even_threshold(h))
    assert verdict("paper_mixed_sets_fail", head_subsets_exhaustive=some_mixed) == "inconclusive"
    # the threshold claim fails when one check fails, whatever the other
    assert verdict("paper_exhaustive_threshold", head_subsets_exhaustive=exhaustive(
        lambda h: 0.5 if h == (0,) else near_all_rate(h))) == "fails"


def test_all_heads_needed_contradicts_a_working_subset():
    def patching(all_rate):
        return preconditions(patched=({"head_set": "all", "family": "all", "success_rate": all_rate},))

    only_all = exhaustive(lambda h: 1.0 if len(h) == 9 else 0.0)
    assert verdict("paper_all_heads_needed", head_subsets_exhaustive=only_all, **patching(1.0)) == "holds"
    r = result("paper_all_heads_needed", head_subsets_exhaustive=exhaustive(even_threshold), **patching(1.0))
    assert r["verdict"] == "fails" and "check 1: 1 [0.912, 1]" in r["detail"]
    # all heads fix 36/40: "at least $all" is neither shown nor refuted
    assert verdict("paper_all_heads_needed", head_subsets_exhaustive=only_all, **patching(0.9)) == "inconclusive"


def replacement(success_of_fraction) -> pl.DataFrame:
    return rows([{"method": m, "head_set": "all", "fraction": a / 10, "success_rate": success_of_fraction(a / 10)}
                 for m in ("per_head", "original") for a in range(11)])


def test_replacement_step_at_0_6():
    assert verdict("paper_replacement_threshold", head_replacement=replacement(lambda a: float(a >= 0.6))) == "holds"
    # a gradual rise (the blend is linear in the attention output) is not a step at 0.6
    assert verdict("paper_replacement_threshold", head_replacement=replacement(lambda a: a)) == "fails"
    assert verdict("paper_replacement_threshold", head_replacement=replacement(lambda a: float(a >= 0.3))) == "fails"
    # a step from 4/40 to 40/40: the point-estimate rule failed it (0.1 > 5 %); [0.03, 0.24] straddles $none
    r = result("paper_replacement_threshold", head_replacement=replacement(lambda a: 1.0 if a >= 0.6 else 0.1))
    assert r["verdict"] == "inconclusive" and "requires max(success_rate) <= 0.2 -> inconclusive" in r["detail"]


def test_bidirectional():
    def table(break_success):
        return rows([{"direction": "fix", "head_set": "all", "success_rate": 1.0},
                     {"direction": "break", "head_set": "all", "success_rate": break_success}])
    assert verdict("paper_bidirectional", head_bidirectional=table(1.0)) == "holds"
    assert verdict("paper_bidirectional", head_bidirectional=table(0.3)) == "fails"
    assert verdict("paper_bidirectional", head_bidirectional=table(0.9)) == "inconclusive"


def test_success_rates_stand_on_their_exact_interval_but_need_enough_eligible_pairs():
    # 9 eligible number pairs: a bootstrap would be degenerate, the exact interval is not (the check
    # still passes), but the eligible_pairs precondition makes the claim not testable
    few = exhaustive(even_threshold, n_eligible=18, n_eligible_pairs=9)
    r = result("paper_exhaustive_threshold", head_subsets_exhaustive=few)
    assert r["verdict"] == "not testable here" and r["measured"] is None
    assert r["detail"] == "not testable: eligible_pairs: 9 eligible number pairs; needs >= 20 -> fail"
    # paper_four_of_five_pairs does not need it: it is decided on 2 eligible prompts per pair
    assert verdict("paper_four_of_five_pairs", listed_pairs=listed([1.0, 1.0])) == "holds"


def test_a_failed_precondition_makes_the_claim_not_testable_rather_than_failed():
    working, broken = exhaustive(even_threshold), exhaustive(lambda h: 1.0 if len(h) >= 2 else 0.0)
    assert verdict("paper_exhaustive_threshold", head_subsets_exhaustive=broken) == "fails"

    def why(**pre) -> str:
        out = []
        for table in (working, broken):
            r = result("paper_exhaustive_threshold", head_subsets_exhaustive=table, **preconditions(**pre))
            assert r["verdict"] == "not testable here" and r["detail"].startswith("not testable: ")
            out.append(r["detail"])
        assert out[0] == out[1]  # the same reason, whether the checks would pass or fail
        return out[0]

    # no format gap to fix: the gap's lower bound 0.05 is under premise_min_gap (0.10)
    no_gap = why(gap_low=0.05)
    assert no_gap.startswith("not testable: premise: format gap on shorter_bigger") and no_gap.endswith("-> fail")
    # the whole residual fixes 12/40 ([0.17, 0.47]): nothing at this layer can fix the bug
    assert why(ceiling=0.3).startswith("not testable: ceiling: whole-residual patch at layer 5, decision position, "
                                       "fixes 12/40")
    # the ceiling is no better than 4 random heads (40/40 against 38/40, Fisher p = 0.49)
    assert "beats random_k4 (38/40): Fisher p=0.494 -> no -> fail" in why(control=0.95)
    # no ceiling row at the claim's layer, or no premise table: not evaluable, so not testable either
    assert why(ceiling_layer=0) == "not testable: ceiling: no whole-residual row at layer 5"
    r = evaluate_claim(PAPER["paper_exhaustive_threshold"],
                       {"head_subsets_exhaustive": working, "head_patching": preconditions()["head_patching"]}, ctx())
    assert r["detail"] == "not testable: premise: the baseline contrast table was not produced"
    # the ceiling's bar is a lower bound of 0.5, not $all: 27/40 ([0.51, 0.81]) is a working ceiling
    assert verdict("paper_exhaustive_threshold", head_subsets_exhaustive=working,
                   **preconditions(ceiling=0.675)) == "holds"


def listed(rates) -> pl.DataFrame:
    return pl.DataFrame([{"direction": "fix", "layer": FOCUS, "head_set": "all", "correct": c, "wrong": w,
                          "n_eligible": 2, "success_rate": r, "works": r == 1.0}
                         for (c, w), r in zip([("9.8", "9.11"), ("3.4", "3.25")], rates)])


def test_listed_pairs():
    # The checks are `exact: true` (the named pairs are the whole population): the value decides, so
    # there is no inconclusive table for them; a failed precondition still withholds the verdict.
    r = result("paper_four_of_five_pairs", listed_pairs=listed([1.0, 1.0]))
    # a named item's value has no interval to print
    assert r["verdict"] == "holds" and (r["ci_low"], r["ci_high"]) == (None, None) and r["measured"] == 1.0
    assert verdict("paper_four_of_five_pairs", listed_pairs=listed([1.0, 0.5])) == "fails"
    r = result("paper_four_of_five_pairs", listed_pairs=listed([1.0, 0.5]), **preconditions(gap_low=0.0))
    assert r["verdict"] == "not testable here" and r["detail"].startswith("not testable: premise")
