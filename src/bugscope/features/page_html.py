"""The HTML of the feature pages (bugscope.features.pages): self-contained, no script, no external file."""

from __future__ import annotations

import html
from typing import Sequence

import numpy as np
import polars as pl

# Token roles, in the order the pages list them (bugscope.features.pages assigns them).
ROLES = ("number", "decimal_point", "comparison", "format", "answer", "other")
NEURONPEDIA_URL = "https://www.neuronpedia.org/{neuronpedia_id}/{feature_id}"

# --- the HTML pages ----------------------------------------------------------------------------------

CSS = ("body{font-family:sans-serif;font-size:13px;max-width:1100px;margin:1em auto;color:#222}"
       "table{border-collapse:collapse;margin:.4em 0 1em}td,th{border:1px solid #ccc;padding:2px 6px;"
       "text-align:left;vertical-align:top}th{background:#eee}td.num{text-align:right}"
       ".ctx{font-family:monospace;white-space:pre-wrap}.hit{background:#ffd54f;font-weight:bold;"
       "border:1px solid #e0a800}.note{color:#555}section{border-top:2px solid #999;margin-top:1.5em}"
       "h2{margin-bottom:.2em}")


def _esc(s) -> str:
    return html.escape("" if s is None else str(s))


def _show(s: str) -> str:
    """A token or context for display: whitespace made visible where it would vanish."""
    return _esc(s).replace("\n", "⏎")


def _num(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return ""
    return f"{v:.{digits}g}"


def _ci(r: dict, col: str) -> str:
    lo, hi = r.get(f"{col}_low"), r.get(f"{col}_high")
    return f"{_num(r[col])} [{_num(lo)}, {_num(hi)}]" if lo is not None and hi is not None else _num(r[col])


def _role_table(rows: pl.DataFrame, formats: list[str]) -> str:
    role_rows = rows.filter(pl.col("level") == "role", pl.col("pairs") == "all")
    head = "<tr><th>role</th>" + "".join(f"<th>{_esc(f)}: mean activation [CI]</th><th>{_esc(f)}: firing rate</th>"
                                         f"<th>{_esc(f)}: share</th><th>{_esc(f)}: tokens</th>" for f in formats) + "</tr>"
    body = []
    for role in ROLES:
        cells = []
        for fmt in formats:
            r = role_rows.filter(pl.col("role") == role, pl.col("format") == fmt)
            if r.height == 0:
                cells.append("<td colspan=4 class=note>not cached</td>")
                continue
            d = r.row(0, named=True)
            cells.append(f"<td class=num>{_ci(d, 'mean_activation')}</td><td class=num>{_num(d['firing_rate'])}</td>"
                         f"<td class=num>{_num(d['activation_share'])}</td><td class=num>{d['n_tokens']}</td>")
        body.append(f"<tr><td>{role}</td>{''.join(cells)}</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def _token_list(rows: pl.DataFrame, formats: list[str], n: int = 8) -> str:
    tok = rows.filter(pl.col("level") == "token", pl.col("pairs") == "all")
    items = []
    for fmt in formats:
        top = tok.filter(pl.col("format") == fmt).sort("mean_activation", "role", "token",
                                                       descending=[True, False, False]).head(n)
        shown = ", ".join(f"<span class=ctx>'{_show(r['token'])}'</span> ({r['role']}, {_num(r['mean_activation'])})"
                          for r in top.iter_rows(named=True) if r["mean_activation"] > 0)
        items.append(f"<li>{_esc(fmt)}: {shown or '<span class=note>fires on none of the cached tokens</span>'}</li>")
    return "<ul>" + "".join(items) + "</ul>"


def _contexts_table(ctx: pl.DataFrame) -> str:
    if ctx.height == 0:
        return "<p class=note>It fires on no token of the corpus text.</p>"
    body = "".join(
        f"<tr><td class=num>{r['rank'] + 1}</td><td class=num>{_num(r['activation'])}</td><td>{_esc(r['source'])} "
        f"#{r['corpus_id']}, pos {r['position']}</td><td class=ctx>{_show(r['left'])}<span class=hit>"
        f"{_show(r['token'])}</span>{_show(r['right'])}</td></tr>" for r in ctx.sort("rank").iter_rows(named=True))
    return f"<table><tr><th>#</th><th>activation</th><th>where</th><th>context</th></tr>{body}</table>"


def render_page(*, layer: int, header: dict, features: pl.DataFrame, tokens: pl.DataFrame, contexts: pl.DataFrame,
                firing: pl.DataFrame, formats: list[str], neuronpedia_id: str | None, no_neuronpedia_reason: str) -> str:
    """One layer's page: a header (`header`: title, then key -> text lines) and one section per feature."""
    order = features.with_row_index("_i").group_by("feature_id").agg(
        pl.col("_i").min(), (pl.col("selection") + " #" + (pl.col("rank") + 1).cast(pl.String)).alias("chosen")
    ).sort("_i")
    items = "".join(f"<li><a href='#f{r['feature_id']}'>feature {r['feature_id']}</a>: {_esc('; '.join(r['chosen']))}</li>"
                    for r in order.iter_rows(named=True))
    lines = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in header.items() if k != "title")
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_esc(header['title'])}</title>"
             f"<style>{CSS}</style></head><body><h1>{_esc(header['title'])}</h1><table>{lines}</table>",
             f"<h3>Features ({order.height})</h3><ul>{items}</ul>"]
    for r in order.iter_rows(named=True):
        f = r["feature_id"]
        if neuronpedia_id:
            url = NEURONPEDIA_URL.format(neuronpedia_id=neuronpedia_id, feature_id=f)
            link = f"<a href='{_esc(url)}'>{_esc(url)}</a>"
        else:
            link = f"<span class=note>none: {_esc(no_neuronpedia_reason)}</span>"
        fire = firing.filter(pl.col("feature_id") == f)
        rate = (f"fires on {100 * fire['corpus_firing_rate'][0]:.2f} % of {fire['n_corpus_tokens'][0]} corpus tokens"
                if fire.height and fire["n_corpus_tokens"][0] else "no corpus tokens encoded")
        rows = tokens.filter(pl.col("feature_id") == f).unique(
            subset=["pairs", "format", "level", "role", "token"], keep="first", maintain_order=True)
        parts.append(
            f"<section id='f{f}'><h2>Feature {f}</h2><p>Chosen as: {_esc('; '.join(r['chosen']))}. "
            f"Neuronpedia: {link}. {rate}.</p>"
            f"<h3>Top-activating corpus contexts</h3>{_contexts_table(contexts.filter(pl.col('feature_id') == f))}"
            "<h3>Activation on the analysis prompts, by token role</h3>"
            "<p class=note>Mean over prompts of the mean activation on the role's tokens, with a 95 % CI resampling "
            "number pairs; firing rate = share of those tokens where it is active; share = the role's part of the "
            "feature's summed activation in that format.</p>"
            f"{_role_table(rows, formats)}<h3>Tokens it fires on most (mean activation)</h3>{_token_list(rows, formats)}"
            "</section>")
    parts.append("</body></html>")
    return "".join(parts)


def render_index(title: str, pages: dict[int, str], notes: Sequence[str]) -> str:
    items = "".join(f"<li><a href='{_esc(name)}'>layer {layer}</a></li>" for layer, name in sorted(pages.items()))
    text = "".join(f"<p>{_esc(n)}</p>" for n in notes)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_esc(title)}</title><style>{CSS}</style>"
            f"</head><body><h1>{_esc(title)}</h1>{text}<ul>{items or '<li>no page layer</li>'}</ul></body></html>")
