"""The original procedure and the per-head method, one factor at a time (bugscope.patching.original_method):
the success of each setting of the decomposition at the focus layer(s), chain first.

It uses the palette, sizes, `Labels` and title helpers of bugscope.figures.style, whose `save_chart`
saves it like every other figure.
"""

from __future__ import annotations

import altair as alt
import polars as pl

from bugscope.figures.style import HEIGHT, OKABE_ITO, Labels, chart_title, n_label, null_nan

MEASURES = {"original_success": "the original's success: all targets judged right after the patch",
            "success_rate": "success on eligible targets (source right, target wrong unpatched)"}
HEAD_SET_COLOURS = {"all": OKABE_ITO["vermillion"], "even": OKABE_ITO["blue"], "odd": OKABE_ITO["green"]}


def setting_labels(table: pl.DataFrame) -> list[str]:
    """'<step>. <setting>: <changed>' in chain order, then the departures ('-. ...')."""
    rows = table.select("step", "setting", "changed").unique("setting").sort(pl.col("step").replace(-1, 1000), "setting")
    return [_label(r) for r in rows.iter_rows(named=True)]


def _label(r: dict) -> str:
    step = f"{r['step']}." if r["step"] >= 0 else "departure:"
    return f"{step} {r['setting']} ({r['changed']})"


def original_decomposition(table: pl.DataFrame, labels: Labels) -> alt.FacetChart:
    """Points with CIs: each setting's success (both measures) per head set, one row per focus layer."""
    order = setting_labels(table)
    long = pl.concat([
        table.select("step", "setting", "changed", "layer", "head_set", "n_prompts", "n_eligible",
                     pl.lit(MEASURES[m]).alias("measure"), pl.col(m).alias("rate"),
                     pl.col(f"{m.replace('_rate', '')}_low").alias("low"),
                     pl.col(f"{m.replace('_rate', '')}_high").alias("high"))
        for m in MEASURES])
    long = null_nan(long.with_columns(pl.struct("step", "setting", "changed").map_elements(
        _label, return_dtype=pl.String).alias("setting_label")), "rate", "low", "high")
    sets = [h for h in HEAD_SET_COLOURS if h in long["head_set"].to_list()]
    colour = alt.Color("head_set:N", title="head set", sort=sets,
                       scale=alt.Scale(domain=sets, range=[HEAD_SET_COLOURS[h] for h in sets]))
    y = alt.Y("setting_label:N", sort=order, title=None, axis=alt.Axis(labelLimit=640))
    offset = alt.YOffset("head_set:N", sort=sets)
    x = alt.X("rate:Q", title=f"success ({labels.ci}, bootstrap over number pairs)", scale=alt.Scale(domain=[0, 1]))
    tip = ["setting", "changed", "layer", "head_set", "measure", alt.Tooltip("rate:Q", format=".3f"),
           alt.Tooltip("low:Q", format=".3f"), alt.Tooltip("high:Q", format=".3f"), "n_prompts", "n_eligible"]
    points = alt.Chart().mark_point(filled=True, size=50).encode(x=x, y=y, yOffset=offset, color=colour, tooltip=tip)
    err = alt.Chart().mark_rule().encode(x=alt.X("low:Q", title=""), x2="high:Q", y=y, yOffset=offset, color=colour)
    layered = alt.layer(err, points, data=long).properties(width=320, height=alt.Step(6 * max(1, len(sets))))
    chain = table.filter(pl.col("step") > 0)
    return layered.facet(row=alt.Row("layer:O", title="focus layer"),
                         column=alt.Column("measure:N", title=None, sort=list(MEASURES.values()))).properties(
        title=chart_title(
            f"From the original procedure to the per-head method, one factor at a time ({labels.model})",
            [f"the same {labels.buggy_format} targets in every setting ({n_label(chain['n_prompts'])} prompts; the seed "
             f"pair alone: 1); eligible targets per setting: {n_label(table['n_eligible'])}",
             "each step changes the factor in brackets from the step above; departures change one factor of "
             "their reference setting only"])).configure_view(continuousHeight=HEIGHT)
