"""Results tables as small self-contained HTML pages for `snakemake --report`, and the claims
ledger as Markdown and HTML."""

from __future__ import annotations

import html
import math

import polars as pl


def table_html(df: pl.DataFrame, title: str, caption: str = "") -> str:
    """A results table as a small self-contained HTML page for the report (floats to 4 significant digits)."""
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return html.escape("" if v is None else str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in df.columns)
    rows = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in df.iter_rows())
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;font-size:12px}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 5px;text-align:right}th{background:#eee}</style></head><body>"
            f"<h3>{html.escape(title)}</h3><p>{html.escape(caption)}</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></body></html>")


# --- the claims ledger (bugscope.claims) ---------------------------------------------------------


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


DISPLAY = [("claim_id", "claim"), ("claim", "what the study asserts"), ("study_value", "study value"),
           ("verdict", "verdict"), ("form", "form"), ("form_tested", "form tested"), ("rule", "decision rule"),
           ("selected", "row"), ("sae_set", "SAE set"), ("measured", "measured"), ("ci", "CI"), ("n", "n"),
           ("agrees_across_sae_sets", "same verdict on the other SAE sets"), ("detail", "detail")]
COLOURS = {"holds": "#009E73", "fails": "#D55E00", "inconclusive": "#E69F00", "layer-dependent": "#CC79A7",
           "not testable here": "#999999"}


def _display_rows(ledger: pl.DataFrame) -> list[dict]:
    rows = []
    for r in ledger.to_dicts():
        ci = f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]" if r["ci_low"] is not None else ""
        row = {k: _fmt(r[k]) if k in r else "" for k, _ in DISPLAY if k != "ci"}
        if r.get("n") is not None and r.get("n_unit"):
            row["n"] = f"{r['n']} {r['n_unit']}"
        rows.append({**row, "ci": ci})
    return rows


def _by_source(ledger: pl.DataFrame) -> list[tuple[str, pl.DataFrame]]:
    """The ledger's rows grouped under headings: this run's preconditions, then the claims by where
    they come from (the seed document, then the paper)."""
    if "source" not in ledger.columns:
        return [("", ledger)]
    sources = list(dict.fromkeys(ledger["source"].to_list()))
    return [("Preconditions of this run" if src == "this run" else f"Claims of the {src}",
             ledger.filter(pl.col("source") == src)) for src in sources]


def _counts(ledger: pl.DataFrame) -> str:
    """Verdict counts of the claims (the precondition rows apart), and the tests per family."""
    claims = ledger.filter(pl.col("section") != "preconditions") if "section" in ledger.columns else ledger
    text = ", ".join(f"{v}: {c}" for v, c in claims["verdict"].value_counts().sort("verdict").iter_rows())
    if "family_tests" in ledger.columns:
        fam = claims.group_by("section", maintain_order=True).agg(pl.col("family_tests").max())
        tests = ", ".join(f"{s} {n}" for s, n in fam.iter_rows() if n)
        if tests:
            text += f". Tests per family (Holm within each): {tests}"
    return text


def premise_statement(ledger: pl.DataFrame) -> str:
    """What this run found about the study's premise, from the ledger's precondition row."""
    rows = ledger.filter(pl.col("claim_id") == "precondition_premise") if "claim_id" in ledger.columns else ledger[:0]
    if rows.height == 0:
        return ""
    r = rows.row(0, named=True)
    found = {"holds": "This run finds the format-dependent bug",
             "fails": "This run does not find the format-dependent bug the study is about",
             }.get(r["verdict"], "This run could not test the study's premise")
    return f"{found} ({r['detail']})."


def to_markdown(ledger: pl.DataFrame, title: str) -> str:
    lines = [f"# {title}", "", premise_statement(ledger), "", _counts(ledger)]
    for heading, rows in _by_source(ledger):
        lines += ["", f"## {heading}" if heading else "", "",
                  "| " + " | ".join(h for _, h in DISPLAY) + " |", "|" + "---|" * len(DISPLAY)]
        for r in _display_rows(rows):
            lines.append("| " + " | ".join(str(r[k]).replace("|", "\\|").replace("\n", " ") for k, _ in DISPLAY)
                         + " |")
    return "\n".join(lines) + "\n"


def to_html(ledger: pl.DataFrame, title: str, appendix: str = "") -> str:
    """The ledger as a page; `appendix` (HTML) goes after its table (the ground truth)."""
    import html

    counts = html.escape(_counts(ledger))
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in DISPLAY)
    body = []
    for heading, rows in _by_source(ledger):
        if heading:
            body.append(f'<tr><th colspan="{len(DISPLAY)}">{html.escape(heading)}</th></tr>')
        for r in _display_rows(rows):
            cells = []
            for k, _ in DISPLAY:
                text = html.escape(str(r[k]))
                if k == "verdict":
                    text = f'<b style="color:{COLOURS.get(r[k], "black")}">{text}</b>'
                cells.append(f"<td>{text}</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;font-size:13px}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px;vertical-align:top;text-align:left}"
            "th{background:#eee}</style></head><body>"
            f"<h2>{html.escape(title)}</h2><p>{html.escape(premise_statement(ledger))}</p><p>{counts}</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{appendix}</body></html>")
