"""The version-or-date reading (bugscope.data.reading): the model's accuracy on each reading family,
how close each format of the decimal prompts sits to the reading (the closeness probe by layer), and
the reading direction projected out against random directions."""

from __future__ import annotations

import altair as alt
import polars as pl

from bugscope.data.prompts import ALL, BUG_PAIR_KIND, DECIMAL
from bugscope.data.reading import RANDOM, RANDOM_FEATURES, READING, READING_FEATURES
from bugscope.figures.style import HEIGHT, OKABE_ITO, WIDTH, Labels, chart_title, n_label, null_nan


def _bars(df: pl.DataFrame, x: str, x_title: str, colour: alt.Color, y_title: str, domain=None,
          label_angle: int = 0) -> alt.LayerChart:
    y = alt.Y("value:Q", title=y_title, scale=alt.Scale(domain=domain) if domain else alt.Undefined)
    bars = alt.Chart().mark_bar(opacity=0.8).encode(
        x=alt.X(f"{x}:N", title=x_title, axis=alt.Axis(labelAngle=label_angle, labelLimit=200)), xOffset="series:N",
        color=colour, y=y,
        tooltip=[x, "series", "n_pairs", alt.Tooltip("value:Q", format=".3f"), alt.Tooltip("low:Q", format=".3f"),
                 alt.Tooltip("high:Q", format=".3f")])
    err = alt.Chart().mark_errorbar(ticks=True, color="black").encode(
        x=alt.X(f"{x}:N"), xOffset="series:N", y=alt.Y("low:Q", title=""), y2="high:Q")
    return alt.layer(bars, err, data=null_nan(df, "value", "low", "high"))


def reading(accuracy: pl.DataFrame, closeness: pl.DataFrame, labels: Labels) -> alt.HConcatChart:
    """Left: accuracy per family by its own reading (both wordings pooled) per format. Right: per
    layer, the share of the bug's pairs the closeness probe reads as a version, per format (decision
    and number positions), with the probe's accuracy on the held-out wording and pairs."""
    acc = accuracy.filter(pl.col("wording") == ALL, pl.col("format") != ALL).with_columns(
        labels.format_role().alias("series"), pl.col("accuracy").alias("value"), pl.col("accuracy_low").alias("low"),
        pl.col("accuracy_high").alias("high"))
    colour = alt.Color("series:N", title=None, legend=alt.Legend(orient="top"))
    left = _bars(acc, "family", "family (decimal: X.Y is right; the others: the version order)", colour,
                 f"accuracy by the family's own reading ({labels.ci})", [0, 1]).properties(
        width=WIDTH // 2, height=HEIGHT, title="does the model answer each reading?")
    per_layer = closeness.filter(pl.col("variant") == "all_pairs")
    rates = per_layer.filter(pl.col("measure") == "version_rate", pl.col("pair_kind") == BUG_PAIR_KIND).with_columns(
        (pl.col("format") + " @ " + pl.col("position")).alias("series"))
    transfer = per_layer.filter(pl.col("measure") == "transfer_accuracy", pl.col("family") == ALL).with_columns(
        ("probe accuracy, held-out wording @ " + pl.col("position")).alias("series"))
    rows = null_nan(pl.concat([rates, transfer]).select("layer", "series", "n_pairs", "value", pl.col("value_low").alias("low"),
                                                        pl.col("value_high").alias("high")), "value", "low", "high")
    x = alt.X("layer:Q", title="layer (residual stream after it)", axis=alt.Axis(tickMinStep=1))
    line_colour = alt.Color("series:N", title=None, legend=alt.Legend(orient="right", labelLimit=320))
    line = alt.Chart().mark_line(point=True).encode(
        x=x, color=line_colour, y=alt.Y("value:Q", title="share read as a version / probe accuracy",
                                        scale=alt.Scale(domain=[0, 1])),
        tooltip=["series", "layer", "n_pairs", alt.Tooltip("value:Q", format=".3f"), alt.Tooltip("low:Q", format=".3f"),
                 alt.Tooltip("high:Q", format=".3f")])
    band = alt.Chart().mark_area(opacity=0.12).encode(x=x, color=line_colour, y=alt.Y("low:Q", title=""), y2="high:Q")
    right = alt.layer(band, line, data=rows).properties(width=WIDTH // 2, height=HEIGHT,
                                                        title="closeness of each format to the version reading")
    return alt.hconcat(left, right).resolve_scale(color="independent").properties(title=chart_title(
        f"Version or date reading? ({labels.model})",
        [f"families: number pairs per family {n_label(accuracy['n_pairs'])}; decimal prompts: the bug's pairs "
         f"({n_label(rates['n_pairs'])}); {labels.ci} (bootstrap over number pairs)",
         "the probe tells the reading families from the decimal family: trained on one wording (even pair ids), "
         "tested on another (odd pair ids), then applied to the decimal prompts of each format"]))


def reading_steering(steering: pl.DataFrame, labels: Labels) -> alt.LayerChart:
    """The accuracy change in the buggy format when the reading direction is projected out, against
    random directions, per subject: the decimal pairs per kind, and each reading family."""
    rows = steering.filter(pl.col("measure") == "accuracy_change").with_columns(
        pl.when(pl.col("subject") == DECIMAL).then(pl.lit("decimal: ") + pl.col("pair_kind"))
        .otherwise(pl.col("subject") + pl.lit(" (family)")).alias("target"),
        pl.col("condition").alias("series"), pl.col("value_low").alias("low"), pl.col("value_high").alias("high"))
    conditions = [c for c in (READING, RANDOM, READING_FEATURES, RANDOM_FEATURES) if c in set(rows["series"])]
    palette = {READING: OKABE_ITO["vermillion"], RANDOM: OKABE_ITO["grey"], READING_FEATURES: OKABE_ITO["blue"],
               RANDOM_FEATURES: OKABE_ITO["sky_blue"]}
    colour = alt.Color("series:N", title="removed", legend=alt.Legend(orient="top"), sort=conditions,
                       scale=alt.Scale(domain=conditions, range=[palette[c] for c in conditions]))
    chart = _bars(rows, "target", "prompts (buggy format)", colour,
                  f"accuracy change, steered - unsteered ({labels.ci})", label_angle=-30)
    zero = alt.Chart().mark_rule(color="black").encode(y=alt.datum(0))
    eligible = steering.filter(pl.col("subject") == "eligible", pl.col("condition") == READING)
    notes = ", ".join(f"{r['measure']} {r['value']:.2f} [{r['value_low']:.2f}, {r['value_high']:.2f}] (n={r['n_prompts']})"
                      for r in eligible.iter_rows(named=True) if r["value"] is not None) or "no eligible targets"
    width = max(WIDTH, 40 * len(conditions) * rows["target"].n_unique())
    return alt.layer(chart, zero).properties(width=width, height=HEIGHT, title=chart_title(
        f"Removing the version reading in the {labels.buggy_format} format, against random controls ({labels.model})",
        ["reading: the difference of the family means, projected out at the decision position of every steered layer; "
         "random: unit directions of the same layers",
         "reading_features: the SAE features every reading family shares, ablated there; random_features: as many "
         f"random features; draws pooled; {labels.ci} (bootstrap over number pairs)",
         f"eligible targets of the bug's kind (reading direction): {notes}",
         "a drop on the families is evidence that what was removed is the reading, not damage"]))
