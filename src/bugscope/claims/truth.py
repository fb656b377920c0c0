"""The ground truth: each ledger's verdicts against what is known by construction (research notes 10).

The claims file declares, next to a claim, what it must come out as on each kind of model:
`expected: {organism: holds, base: not testable}`, and under `expected_preconditions:` the same for
the precondition rows. A planted model (bugscope.organism) carries the bug in known heads at a known
layer, so some claims are true and some false by construction there; on the unedited model, which
lacks the bug, the premise precondition must make the claims about fixing it "not testable". The
expectations are only compared with the verdicts, never used to reach them.

Sensitivity: of the claims expected to hold, how many hold. Specificity: of the claims expected to
fail, how many fail. Both with how many came out inconclusive (or otherwise).
"""

from __future__ import annotations

import polars as pl

EXPECTATIONS = ("holds", "fails", "not testable", "unknown")
ROLES = ("base", "organism")

TRUTH_SCHEMA = {"claim_id": pl.String, "expected": pl.String, "obtained": pl.String, "agrees": pl.Boolean}


def obtained_outcome(verdict: str) -> str:
    """A ledger verdict in the terms of the expectations ("not testable here" -> "not testable")."""
    return "not testable" if verdict.startswith("not testable") else verdict


def expected_verdicts(ledger: list[dict], preconditions: dict, role: str) -> dict[str, str]:
    """claim id (precondition rows: precondition_<name>) -> the expectation declared for `role`."""
    out = {f"precondition_{name}": by_role[role] for name, by_role in preconditions.items() if role in by_role}
    out.update({c["id"]: c["expected"][role] for c in ledger if role in c.get("expected", {})})
    return out


def ground_truth(result: pl.DataFrame, expected: dict[str, str]) -> pl.DataFrame:
    """One row per claim with an expectation: expected, obtained, and whether they agree (null for
    an expectation of "unknown": what the pipeline finds is reported, not scored)."""
    verdicts = dict(zip(result["claim_id"].to_list(), result["verdict"].to_list()))
    rows = []
    for key, want in expected.items():
        # a precondition checked at each focus layer (ceiling) has a row per layer: each is scored
        ids = [c for c in verdicts if c == key or c.startswith(f"{key}_layer_")] or [key]
        for cid in ids:
            got = obtained_outcome(verdicts[cid]) if cid in verdicts else "absent"
            rows.append({"claim_id": cid, "expected": want, "obtained": got,
                         "agrees": None if want == "unknown" else got == want})
    return pl.DataFrame(rows, schema=TRUTH_SCHEMA)


def confusion(truth: pl.DataFrame) -> pl.DataFrame:
    """Per expectation (holds, fails, not testable): how many claims, and how many came out as each
    outcome. The `holds` row is the sensitivity, the `fails` row the specificity."""
    scored = truth.filter(pl.col("expected") != "unknown")
    if scored.height == 0:
        return pl.DataFrame(schema={"expected": pl.String, "n": pl.Int64, "agree": pl.Int64, "holds": pl.Int64,
                                    "fails": pl.Int64, "inconclusive": pl.Int64, "other": pl.Int64})
    return (scored.group_by("expected", maintain_order=True)
            .agg(pl.len().cast(pl.Int64).alias("n"), pl.col("agrees").sum().cast(pl.Int64).alias("agree"),
                 *[(pl.col("obtained") == v).sum().cast(pl.Int64).alias(v) for v in ("holds", "fails", "inconclusive")],
                 (~pl.col("obtained").is_in(["holds", "fails", "inconclusive"])).sum().cast(pl.Int64).alias("other"))
            .sort("expected"))


def summary(truth: pl.DataFrame) -> str:
    """Sensitivity and specificity in words, with their counts."""
    table = {r["expected"]: r for r in confusion(truth).to_dicts()}
    parts = []
    for want, name in (("holds", "sensitivity"), ("fails", "specificity"), ("not testable", "premise control")):
        if want in table:
            r = table[want]
            parts.append(f"{name}: {r['agree']} of {r['n']} claims expected to come out {want} do "
                         f"({r['inconclusive']} inconclusive, {r['n'] - r['agree'] - r['inconclusive']} otherwise)")
    return "; ".join(parts)


def to_markdown(truth: pl.DataFrame, role: str) -> str:
    """The ground-truth section of a ledger's Markdown."""
    if truth.height == 0:
        return ""
    lines = ["", f"## Ground truth ({role} model)", "", summary(truth) + ".", "",
             "| claim | expected | obtained | agrees |", "|---|---|---|---|"]
    for r in truth.to_dicts():
        agrees = {True: "yes", False: "**no**", None: "(not scored)"}[r["agrees"]]
        lines.append(f"| {r['claim_id']} | {r['expected']} | {r['obtained']} | {agrees} |")
    return "\n".join(lines) + "\n"


def to_html(truth: pl.DataFrame, role: str) -> str:
    """The ground-truth section of a ledger's HTML page."""
    import html

    if truth.height == 0:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(r['claim_id'])}</td><td>{r['expected']}</td><td>{html.escape(r['obtained'])}</td>"
        f"<td>{ {True: 'yes', False: '<b>no</b>', None: '(not scored)'}[r['agrees']] }</td></tr>"
        for r in truth.to_dicts())
    return (f"<h3>Ground truth ({role} model)</h3><p>{html.escape(summary(truth))}.</p>"
            "<table><thead><tr><th>claim</th><th>expected</th><th>obtained</th><th>agrees</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>")
