"""The ground truth (bugscope.claims.truth): expectations against verdicts, on made-up ledgers."""

import polars as pl
import pytest

from bugscope.claims import truth
from bugscope.claims.spec import LedgerError, load_expected_preconditions, load_ledger
from tests.conftest import REPO

LEDGER = [
    {"id": "fix", "expected": {"organism": "holds", "base": "not testable"}},
    {"id": "odd_fix", "expected": {"organism": "fails", "base": "not testable"}},
    {"id": "half", "expected": {"organism": "unknown"}},
    {"id": "other"},
]
PRECONDITIONS = {"premise": {"organism": "holds", "base": "fails"}, "ceiling": {"organism": "holds"}}


def _result(**verdicts):
    return pl.DataFrame({"claim_id": list(verdicts), "verdict": list(verdicts.values())})


def test_expectations_are_read_per_model():
    assert truth.expected_verdicts(LEDGER, PRECONDITIONS, "organism") == {
        "precondition_premise": "holds", "precondition_ceiling": "holds", "fix": "holds", "odd_fix": "fails",
        "half": "unknown"}
    assert truth.expected_verdicts(LEDGER, PRECONDITIONS, "base") == {
        "precondition_premise": "fails", "fix": "not testable", "odd_fix": "not testable"}


@pytest.mark.parametrize("fix, odd_fix, sensitivity, specificity", [
    ("holds", "fails", (1, 0), (1, 0)),  # both found
    ("fails", "holds", (0, 0), (0, 0)),  # both missed, the wrong way
    ("inconclusive", "inconclusive", (0, 1), (0, 1)),  # neither decided
])
def test_the_confusion_counts_found_missed_and_inconclusive(fix, odd_fix, sensitivity, specificity):
    result = _result(precondition_premise="holds", precondition_ceiling_layer_9="holds", fix=fix, odd_fix=odd_fix,
                     half="fails", other="holds")
    table = truth.ground_truth(result, truth.expected_verdicts(LEDGER, PRECONDITIONS, "organism"))
    assert table["claim_id"].to_list() == ["precondition_premise", "precondition_ceiling_layer_9", "fix", "odd_fix",
                                           "half"]
    assert table.filter(pl.col("claim_id") == "half")["agrees"].to_list() == [None]  # unknown: reported, not scored
    rows = {r["expected"]: r for r in truth.confusion(table).to_dicts()}
    assert (rows["holds"]["n"], rows["fails"]["n"]) == (3, 1)
    assert (rows["holds"]["agree"] - 2, rows["holds"]["inconclusive"]) == sensitivity  # 2: the preconditions
    assert (rows["fails"]["agree"], rows["fails"]["inconclusive"]) == specificity
    assert "sensitivity: " in truth.summary(table) and "specificity: " in truth.summary(table)


def test_not_testable_here_counts_as_not_testable_on_the_unedited_model():
    result = _result(precondition_premise="fails", fix="not testable here (a precondition fails)",
                     odd_fix="not testable here", half="fails")
    table = truth.ground_truth(result, truth.expected_verdicts(LEDGER, PRECONDITIONS, "base"))
    assert table["agrees"].to_list() == [True, True, True]
    assert "premise control: 2 of 2" in truth.summary(table)


def test_a_claim_without_a_row_is_absent_and_disagrees():
    table = truth.ground_truth(_result(fix="holds"), {"fix": "holds", "gone": "fails"})
    assert table.filter(pl.col("claim_id") == "gone").row(0, named=True)["obtained"] == "absent"
    assert table["agrees"].to_list() == [True, False]


def test_the_shipped_ledger_declares_claims_true_and_false_by_construction():
    ledger = load_ledger(REPO / "config" / "claims.yaml")
    expected = truth.expected_verdicts(ledger, load_expected_preconditions(REPO / "config" / "claims.yaml"), "organism")
    assert {"holds", "fails", "unknown"} <= set(expected.values())
    assert expected["even_heads_16"] == "holds" and expected["control_odd_heads_fix"] == "fails"


def test_an_unknown_expectation_is_refused(tmp_path):
    path = tmp_path / "ledger.yaml"
    path.write_text((REPO / "config" / "claims.yaml").read_text().replace(
        "expected: {organism: holds}", "expected: {organism: true}", 1))
    with pytest.raises(LedgerError, match="expected must map a model"):
        load_ledger(path)


def test_the_html_section_lists_every_row_and_the_summary():
    table = truth.ground_truth(_result(fix="holds", half="fails"), {"fix": "holds", "half": "unknown"})
    page = truth.to_html(table, "organism")
    assert "Ground truth (organism model)" in page and "sensitivity: 1 of 1" in page
    assert page.count("<tr>") == 3 and "(not scored)" in page
    assert truth.to_html(table.head(0), "organism") == ""
