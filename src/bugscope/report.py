"""Results tables as small self-contained HTML pages for `snakemake --report`."""

from __future__ import annotations

import html

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
