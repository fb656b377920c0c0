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


def _display_rows(ledger: pl.DataFrame) -> list[dict]:
    rows = []
    for r in ledger.to_dicts():
        ci = f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]" if r["ci_low"] is not None else ""
        rows.append({**{k: _fmt(r[k]) if k in r else "" for k, _ in DISPLAY if k != "ci"}, "ci": ci})
    return rows


def _by_source(ledger: pl.DataFrame) -> list[tuple[str, pl.DataFrame]]:
    """The ledger's rows grouped by where the claims come from (the seed document, then the paper)."""
    if "source" not in ledger.columns:
        return [("", ledger)]
    sources = list(dict.fromkeys(ledger["source"].to_list()))
    return [(src, ledger.filter(pl.col("source") == src)) for src in sources]


def to_markdown(ledger: pl.DataFrame, title: str) -> str:
    counts = ledger["verdict"].value_counts().sort("verdict")
    lines = [f"# {title}", "", ", ".join(f"{v}: {c}" for v, c in counts.iter_rows())]
    for source, rows in _by_source(ledger):
        lines += ["", f"## Claims of the {source}" if source else "", "",
                  "| " + " | ".join(h for _, h in DISPLAY) + " |", "|" + "---|" * len(DISPLAY)]
        for r in _display_rows(rows):
            lines.append("| " + " | ".join(str(r[k]).replace("|", "\\|").replace("\n", " ") for k, _ in DISPLAY)
                         + " |")
    return "\n".join(lines) + "\n"


def to_html(ledger: pl.DataFrame, title: str) -> str:
    import html

    colours = {"holds": "#009E73", "fails": "#D55E00", "not testable here": "#999999"}
    counts = ", ".join(f"{v}: {c}" for v, c in ledger["verdict"].value_counts().sort("verdict").iter_rows())
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in DISPLAY)
    body = []
    for source, rows in _by_source(ledger):
        if source:
            body.append(f'<tr><th colspan="{len(DISPLAY)}">Claims of the {html.escape(source)}</th></tr>')
        for r in _display_rows(rows):
            cells = []
            for k, _ in DISPLAY:
                text = html.escape(str(r[k]))
                if k == "verdict":
                    text = f'<b style="color:{colours.get(r[k], "black")}">{text}</b>'
                cells.append(f"<td>{text}</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;font-size:13px}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px;vertical-align:top;text-align:left}"
            "th{background:#eee}</style></head><body>"
            f"<h2>{html.escape(title)}</h2><p>{html.escape(counts)}</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></body></html>")
