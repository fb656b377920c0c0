"""Figure 1, the model's behaviour without intervention: baseline accuracy per prompt format, question
order and pair kind (bugscope.data.baseline)."""

from __future__ import annotations

import altair as alt
import polars as pl

from bugscope.data.lens import FORMAT_GAP
from bugscope.data.probes import ALL_PAIRS, PROBE, SHUFFLED
from bugscope.data.prompts import ALL, BUG_PAIR_KIND, ORDERS
from bugscope.figures.style import (
    HEIGHT,
    KIND_NOTE,
    OKABE_ITO,
    WIDTH,
    Labels,
    chart_title,
    kind_column,
    kind_order,
    n_label,
    null_nan,
)

ORDERS_POOLED = "both orders"


def baseline_accuracy(accuracy: pl.DataFrame, labels: Labels) -> alt.FacetChart:
    """Accuracy per prompt format (x) and question order (bars: each order and both pooled), one
    column per pair kind, decision-logit metric, with the pair-level CIs."""
    df = null_nan(accuracy.filter(pl.col("pair_kind") != ALL), "accuracy", "accuracy_low", "accuracy_high").with_columns(
        labels.format_role(), pl.col("order").replace({ALL: ORDERS_POOLED}).alias("order_label"))
    orders = [o for o in (ORDERS_POOLED, *ORDERS) if o in df["order_label"].to_list()]
    colour = alt.Color("order_label:N", title="question order", sort=orders, legend=alt.Legend(orient="top"),
                       scale=alt.Scale(domain=orders, range=[OKABE_ITO["black"], OKABE_ITO["sky_blue"],
                                                            OKABE_ITO["orange"]][:len(orders)]))
    x = alt.X("format_role:N", title="prompt format", sort=sorted(df["format_role"].unique().to_list()),
              axis=alt.Axis(labelAngle=0))
    offset = alt.XOffset("order_label:N", sort=orders)
    bars = alt.Chart().mark_bar(opacity=0.8).encode(
        x=x, xOffset=offset, color=colour,
        y=alt.Y("accuracy:Q", title=f"accuracy (fraction answered right, {labels.ci})", scale=alt.Scale(domain=[0, 1])),
        tooltip=["format", "pair_kind", "order", "n_prompts", "n_pairs", alt.Tooltip("accuracy:Q", format=".3f"),
                 alt.Tooltip("accuracy_low:Q", format=".3f"), alt.Tooltip("accuracy_high:Q", format=".3f"),
                 alt.Tooltip("mean_logit_diff:Q", format=".3f")])
    err = alt.Chart().mark_errorbar(ticks=True, color="black").encode(
        x=x, xOffset=offset, y=alt.Y("accuracy_low:Q", title=""), y2="accuracy_high:Q")
    chance = alt.Chart().mark_rule(strokeDash=[4, 4], color=OKABE_ITO["grey"]).encode(y=alt.datum(0.5))
    pooled = df.filter(pl.col("order") == ALL)
    n_pairs = ", ".join(f"{k} {n_label(pooled.filter(pl.col('pair_kind') == k)['n_pairs'])}" for k in kind_order(df))
    return alt.layer(bars, err, chance, data=df).properties(width=WIDTH // 2, height=HEIGHT).facet(
        column=kind_column(df)).properties(title=chart_title(
            f"Baseline accuracy per prompt format, question order and pair kind ({labels.model})",
            [f"decision-token logit difference > 0; number pairs: {n_pairs}; {KIND_NOTE}",
             f"bars: {labels.ci} (bootstrap over number pairs); dashed: chance"]))


def lens(summary: pl.DataFrame, labels: Labels) -> alt.HConcatChart:
    """The logit lens by layer on the bug's pair kind (both orders pooled): the decision logit
    difference each format's residual stream would give if the model stopped after that layer, and
    which blocks write the format gap (the correct format minus the buggy one, direct attribution)."""
    bug = summary.filter(pl.col("pair_kind") == BUG_PAIR_KIND, pl.col("order") == ALL)
    formats = null_nan(bug.filter(pl.col("format") != FORMAT_GAP), "lens_logit_diff", "lens_logit_diff_low",
                       "lens_logit_diff_high").with_columns(labels.format_role())
    x = alt.X("layer:Q", title="layer (residual stream after it)", axis=alt.Axis(tickMinStep=1))
    colour = alt.Color("format_role:N", title="prompt format", legend=alt.Legend(orient="top"))
    band = alt.Chart().mark_area(opacity=0.2).encode(x=x, y=alt.Y("lens_logit_diff_low:Q", title=""),
                                                     y2="lens_logit_diff_high:Q", color=colour)
    line = alt.Chart().mark_line(point=True).encode(
        x=x, color=colour, y=alt.Y("lens_logit_diff:Q", title="logit lens: correct - wrong logit"),
        tooltip=["format", "layer", "n_pairs", alt.Tooltip("lens_logit_diff:Q", format=".3f"),
                 alt.Tooltip("lens_accuracy:Q", format=".3f")])
    zero = alt.Chart().mark_rule(strokeDash=[4, 4], color=OKABE_ITO["grey"]).encode(y=alt.datum(0))
    left = alt.layer(band, line, zero, data=formats).properties(width=WIDTH // 2, height=HEIGHT,
                                                                 title="logit lens per format")
    gap = bug.filter(pl.col("format") == FORMAT_GAP)
    blocks = pl.concat([
        gap.select("layer", "n_pairs", pl.lit(block).alias("block"), pl.col(f"{block}_attribution").alias("value"),
                   pl.col(f"{block}_attribution_low").alias("low"), pl.col(f"{block}_attribution_high").alias("high"))
        for block in ("attn", "mlp")])
    blocks = null_nan(blocks, "value", "low", "high")
    bar_colour = alt.Color("block:N", title="block", legend=alt.Legend(orient="top"),
                           scale=alt.Scale(domain=["attn", "mlp"], range=[OKABE_ITO["sky_blue"], OKABE_ITO["orange"]]))
    bars = alt.Chart().mark_bar(opacity=0.8).encode(
        x=alt.X("layer:O", title="layer"), xOffset="block:N", color=bar_colour,
        y=alt.Y("value:Q", title=f"direct attribution to the gap ({labels.correct_format} - {labels.buggy_format})"),
        tooltip=["layer", "block", "n_pairs", alt.Tooltip("value:Q", format=".3f"), alt.Tooltip("low:Q", format=".3f"),
                 alt.Tooltip("high:Q", format=".3f")])
    err = alt.Chart().mark_errorbar(ticks=True, color="black").encode(
        x=alt.X("layer:O"), xOffset="block:N", y=alt.Y("low:Q", title=""), y2="high:Q")
    right = alt.layer(bars, err, data=blocks).properties(width=WIDTH // 2, height=HEIGHT,
                                                          title="which blocks write the format gap")
    return alt.hconcat(left, right).resolve_scale(color="independent").properties(title=chart_title(
        f"Logit lens and direct logit attribution at the decision position ({labels.model}, {BUG_PAIR_KIND})",
        [f"number pairs: {n_label(bug['n_pairs'])}; both question orders pooled; bands and bars: {labels.ci} "
         "(bootstrap over number pairs)",
         "attribution: each block's write through the final norm (its scale fixed) onto the correct - wrong "
         "unembedding; the gap is paired per question"]))


def probes(summary: pl.DataFrame, labels: Labels) -> alt.LayerChart:
    """Knows vs says on the bug's pair kind (both orders pooled), per layer: the accuracy of a probe
    trained on each format and tested on the held-out pairs of a format, beside the model's own
    accuracy on those prompts; the shuffled-label control stays at chance."""
    bug = summary.filter(pl.col("pair_kind") == BUG_PAIR_KIND, pl.col("order") == ALL, pl.col("variant") == ALL_PAIRS)
    probe = bug.filter(pl.col("family").is_in([PROBE, SHUFFLED])).with_columns(
        (pl.col("family") + ": train " + pl.col("train_format") + ", test " + pl.col("test_format")).alias("series"),
        pl.col("probe_accuracy").alias("accuracy"), pl.col("probe_accuracy_low").alias("low"),
        pl.col("probe_accuracy_high").alias("high"))
    said = bug.filter(pl.col("family") == PROBE).unique(["layer", "test_format"], keep="first").with_columns(
        ("model's answer: " + pl.col("test_format")).alias("series"), pl.col("output_accuracy").alias("accuracy"),
        pl.col("output_accuracy_low").alias("low"), pl.col("output_accuracy_high").alias("high"))
    keep = ["layer", "series", "family", "train_format", "test_format", "n_pairs", "accuracy", "low", "high"]
    rows = null_nan(pl.concat([probe.select(keep), said.select(keep)]), "accuracy", "low", "high")
    x = alt.X("layer:Q", title="layer (residual stream after it, decision position)", axis=alt.Axis(tickMinStep=1))
    colour = alt.Color("series:N", title=None, legend=alt.Legend(orient="right", labelLimit=320))
    line = alt.Chart().mark_line(point=True).encode(
        x=x, color=colour, y=alt.Y("accuracy:Q", title=f"accuracy ({labels.ci})", scale=alt.Scale(domain=[0, 1])),
        tooltip=["series", "layer", "n_pairs", alt.Tooltip("accuracy:Q", format=".3f"),
                 alt.Tooltip("low:Q", format=".3f"), alt.Tooltip("high:Q", format=".3f")])
    band = alt.Chart().mark_area(opacity=0.12).encode(x=x, color=colour, y=alt.Y("low:Q", title=""), y2="high:Q")
    chance = alt.Chart().mark_rule(strokeDash=[4, 4], color=OKABE_ITO["grey"]).encode(y=alt.datum(0.5))
    return alt.layer(band, line, chance, data=rows).properties(width=WIDTH, height=HEIGHT, title=chart_title(
        f"Knows vs says: a linear probe for 'the first-named number is bigger' against the model's answer "
        f"({labels.model}, {BUG_PAIR_KIND})",
        [f"number pairs: {n_label(bug['n_pairs'])}; both question orders pooled; cross-validated over number pairs, "
         "every pair kind weighing the same in training; bands: " + labels.ci + " (bootstrap over number pairs)",
         "shuffled_labels: the same probe on labels flipped per number pair at random (chance)"]))
