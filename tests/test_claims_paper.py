"""The ledger rows of the published paper's claims (config/claims.yaml, source: paper), each on a
made-up table where the claim holds and on one where it is false."""

from __future__ import annotations

import polars as pl

from bugscope.claims.evaluate import evaluate_claim
from bugscope.claims.spec import load_ledger
from bugscope.patching.head_sets import head_composition
from tests.conftest import REPO
from tests.test_claims import ctx

PAPER = {c["id"]: c for c in load_ledger(REPO / "config" / "claims.yaml") if c.get("source") == "paper"}
FOCUS = 5  # ctx()'s focus layer; ctx() has 9 heads: 5 even (0, 2, 4, 6, 8) and 4 odd


def verdict(claim_id: str, **tables) -> str:
    return evaluate_claim(PAPER[claim_id], tables, ctx())["verdict"]


def rows(records: list[dict], **fixed) -> pl.DataFrame:
    """Summary rows of the bug's kind, both orders pooled, with a CI around each success rate."""
    out = [{"pair_kind": "shorter_bigger", "order": "all", "layer": FOCUS, "n_eligible": 10, **fixed, **r}
           for r in records]
    return pl.DataFrame(out).with_columns(success_low=pl.col("success_rate") - 0.1,
                                          success_high=pl.col("success_rate") + 0.1)


def exhaustive(success) -> pl.DataFrame:
    """One row per head set of 1-3 heads of the 9, success_rate = success(heads)."""
    import itertools

    recs = []
    for k in (1, 2, 3, 9):
        for heads in itertools.combinations(range(9), k):
            n_even, n_odd, comp = head_composition(heads)
            recs.append({"head_set": f"s{heads}", "k": k, "n_even": n_even, "n_odd": n_odd, "composition": comp,
                         "k_of_even_pool": k / 5, "k_of_heads": k / 9, "success_rate": success(heads)})
    return rows(recs)


def even_threshold(heads):  # even-only sets of >= 3 (half of 5, rounded up) heads work
    return 1.0 if all(h % 2 == 0 for h in heads) and len(heads) >= 3 else 0.0


def test_threshold_claims_hold_on_a_sharp_even_threshold():
    table = exhaustive(even_threshold)
    assert verdict("paper_exhaustive_threshold", head_subsets_exhaustive=table) == "holds"
    assert verdict("paper_mixed_sets_fail", head_subsets_exhaustive=table) == "holds"


def test_threshold_claims_fail_where_small_sets_work_or_mixed_sets_work():
    small = exhaustive(lambda h: 1.0 if all(x % 2 == 0 for x in h) and len(h) >= 2 else 0.0)
    assert verdict("paper_exhaustive_threshold", head_subsets_exhaustive=small) == "fails"
    mixed = exhaustive(lambda h: 1.0 if len(h) >= 3 else 0.0)
    assert verdict("paper_mixed_sets_fail", head_subsets_exhaustive=mixed) == "fails"
    # one even-only set of the threshold size that does not work breaks "every one works"
    one_bad = exhaustive(lambda h: 0.5 if h == (0, 2) else (1.0 if all(x % 2 == 0 for x in h) else 0.0))
    assert verdict("paper_all_12870", head_subsets_exhaustive=one_bad) == "fails"
    assert verdict("paper_all_12870", head_subsets_exhaustive=exhaustive(
        lambda h: 1.0 if all(x % 2 == 0 for x in h) else 0.0)) == "holds"


def test_all_heads_needed_contradicts_a_working_subset():
    patching = rows([{"head_set": "all", "success_rate": 1.0}])
    only_all = exhaustive(lambda h: 1.0 if len(h) == 9 else 0.0)
    assert verdict("paper_all_heads_needed", head_subsets_exhaustive=only_all, head_patching=patching) == "holds"
    assert verdict("paper_all_heads_needed", head_subsets_exhaustive=exhaustive(even_threshold),
                   head_patching=patching) == "fails"


def replacement(success_of_fraction) -> pl.DataFrame:
    return rows([{"method": m, "head_set": "all", "fraction": a / 10, "success_rate": success_of_fraction(a / 10)}
                 for m in ("per_head", "original") for a in range(11)])


def test_replacement_step_at_0_6():
    assert verdict("paper_replacement_threshold", head_replacement=replacement(lambda a: float(a >= 0.6))) == "holds"
    # a gradual rise (the blend is linear in the attention output) is not a step at 0.6
    assert verdict("paper_replacement_threshold", head_replacement=replacement(lambda a: a)) == "fails"
    assert verdict("paper_replacement_threshold", head_replacement=replacement(lambda a: float(a >= 0.3))) == "fails"


def test_bidirectional():
    def table(break_success):
        return rows([{"direction": "fix", "head_set": "all", "success_rate": 1.0},
                     {"direction": "break", "head_set": "all", "success_rate": break_success}])
    assert verdict("paper_bidirectional", head_bidirectional=table(1.0)) == "holds"
    assert verdict("paper_bidirectional", head_bidirectional=table(0.3)) == "fails"


def test_listed_pairs():
    def table(rates):
        return pl.DataFrame([{"direction": "fix", "layer": FOCUS, "head_set": "all", "correct": c, "wrong": w,
                              "n_eligible": 2, "success_rate": r, "works": r == 1.0}
                             for (c, w), r in zip([("9.8", "9.11"), ("3.4", "3.25")], rates)])
    assert verdict("paper_four_of_five_pairs", listed_pairs=table([1.0, 1.0])) == "holds"
    assert verdict("paper_four_of_five_pairs", listed_pairs=table([1.0, 0.5])) == "fails"
