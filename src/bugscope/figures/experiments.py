"""Figures of the focus-layer patching experiments (bugscope.patching.study): the replacement
fraction, the residual-stream patching map and every head set by size and composition. Conventions:
bugscope.figures.style."""

from __future__ import annotations

import altair as alt
import polars as pl

from bugscope.figures.patching import RATE_COLUMNS, direction_text, eligible_text, rate_tooltip
from bugscope.figures.style import (
    DIVERGING,
    HEIGHT,
    OKABE_ITO,
    WIDTH,
    Labels,
    by_kind,
    chart_title,
    kind_column,
    n_label,
    null_nan,
)


def _rows(summary: pl.DataFrame) -> pl.DataFrame:
    """by_kind rows with NaN rates as nulls and list columns (the heads) as text, which Vega-Lite takes."""
    df = null_nan(by_kind(summary), *RATE_COLUMNS)
    lists = [c for c, t in df.schema.items() if isinstance(t, pl.List)]
    return df.with_columns(pl.col(c).cast(pl.List(pl.String)).list.join(",") for c in lists)


HEAD_SET_COLOURS = {"all": OKABE_ITO["black"], "even": OKABE_ITO["blue"], "odd": OKABE_ITO["orange"]}
METHOD_LABELS = {"per_head": "per-head (o_proj input)", "original": "original (attn output slices, [:min_len])"}


def replacement(summary: pl.DataFrame, labels: Labels) -> alt.FacetChart:
    """Success rate vs the replacement fraction a (a * source + (1 - a) * target) of the all / even /
    odd head sets, solid per-head and dashed original method; one row per focus layer, one column
    per pair kind (both orders pooled)."""
    df = _rows(summary).with_columns(
        pl.col("method").replace_strict(METHOD_LABELS, default=pl.col("method")).alias("method_label"))
    colour = alt.Color("head_set:N", title="heads", scale=alt.Scale(domain=list(HEAD_SET_COLOURS),
                                                                     range=list(HEAD_SET_COLOURS.values())))
    dash = alt.StrokeDash("method_label:N", title="method", legend=alt.Legend(orient="top", labelLimit=400))
    x = alt.X("fraction:Q", title="replacement fraction a", scale=alt.Scale(domain=[0, 1]))
    line = alt.Chart().mark_line(point=True).encode(
        x=x, y=alt.Y("success_rate:Q", title=f"success rate ({labels.ci})", scale=alt.Scale(domain=[0, 1])),
        color=colour, strokeDash=dash, tooltip=rate_tooltip("method", "fraction"))
    err = alt.Chart().mark_errorbar(opacity=0.5).encode(x=x, y=alt.Y("success_low:Q", title=""),
                                                         y2="success_high:Q", color=colour)
    return alt.layer(err, line, data=df).properties(width=WIDTH // 2 + 40, height=HEIGHT * 2 // 3).facet(
        row=alt.Row("layer:O", title="focus layer"), column=kind_column(df)).properties(title=chart_title(
            f"Replacement fraction: a * source + (1 - a) * target in the patched heads ({labels.model})",
            [*eligible_text(df), "a = 1 is the plain patch; the paper reports a sharp step at a = 0.6",
             direction_text(df.filter(pl.col("method") == "per_head"))]))


def residual_map(summary: pl.DataFrame, labels: Labels) -> alt.FacetChart:
    """Recovery of the residual stream patched at one (layer, matched position), positions counted
    back from the decision position; one column per pair kind (both orders pooled)."""
    df = _rows(summary)
    base = alt.Chart().encode(
        x=alt.X("rank:O", title="matched position, counted back from the decision position (0)", sort="descending"),
        y=alt.Y("layer:O", title="layer (residual stream after it)", sort="descending"))
    rect = base.mark_rect().encode(
        color=alt.Color("recovery:Q", title="recovery", scale=alt.Scale(scheme=DIVERGING, domainMid=0)),
        tooltip=["pair_kind", "layer", "rank", *(alt.Tooltip(f"{c}:Q", format=".3f") for c in RATE_COLUMNS),
                 "n_eligible", "n_pairs"])
    n_layers = df["layer"].n_unique()
    return alt.layer(rect, data=df).properties(width=max(16 * df["rank"].n_unique(), 200),
                                               height=max(10 * n_layers, 120)).facet(
        column=kind_column(df)).properties(title=chart_title(
            f"Residual-stream patching map: source -> target at one layer and position ({labels.model})",
            [*eligible_text(df), "the ceiling of any head patch at that layer and position; intervals: tooltip"]))


def subsets_exhaustive(summary: pl.DataFrame, labels: Labels) -> alt.FacetChart:
    """The distribution over head sets of the success rate per size k (box: quartiles, whiskers: min
    and max), per composition (even, odd, mixed); one row per focus layer and one column per pair
    kind (both orders pooled)."""
    df = _rows(summary)
    comps = [c for c in ("even", "odd", "mixed") if c in df["composition"].unique().to_list()]
    colour = alt.Color("composition:N", title="head set", scale=alt.Scale(
        domain=["even", "odd", "mixed"], range=[OKABE_ITO["blue"], OKABE_ITO["orange"], OKABE_ITO["purple"]]))
    box = alt.Chart().mark_boxplot(extent="min-max", size=8).encode(
        x=alt.X("k:O", title="number of heads patched (k)"), xOffset=alt.XOffset("composition:N", sort=comps),
        y=alt.Y("success_rate:Q", title="success rate over the eligible targets", scale=alt.Scale(domain=[0, 1])),
        color=colour)
    n_sets = df.group_by("layer", "pair_kind").agg(pl.len())["len"]
    return alt.layer(box, data=df).properties(width=WIDTH, height=HEIGHT * 2 // 3).facet(
        row=alt.Row("layer:O", title="focus layer"), column=kind_column(df)).properties(title=chart_title(
            f"Every head set by size and composition: success rate over sets ({labels.model})",
            [*eligible_text(df), f"{n_label(n_sets)} head sets per layer and pair kind (every one where a size and "
             "composition has at most patching.exhaustive.budget); box: quartiles over sets, whiskers: min and max",
             direction_text(df)]))


def head_set_features(summary: pl.DataFrame, labels: Labels) -> alt.FacetChart:
    """The critical SAE features active at the decision position after each even-head set is patched
    (bugscope.interventions.head_set_features), over sets per size k (box: quartiles, whiskers: min and max), with
    the unpatched buggy prompt's and the source prompt's counts as rules; one row per (SAE set,
    focus layer), one column per feature set, on all pairs."""
    df = summary.filter(pl.col("pairs") == "all", pl.col("k") > 0).with_columns(
        pl.format("{} L{}", "sae_set", "layer").alias("sae_layer"),
        pl.format("{} ({} features)", "feature_set", "n_features").alias("features"))
    # Sorted: group_by keeps no row order, and the figure's bytes must not change between reruns.
    refs = df.group_by("sae_layer", "features").agg(
        pl.col("unpatched_active").first().alias("unpatched buggy prompt"),
        pl.col("source_active").first().alias("source (correct format)")).sort("sae_layer", "features").unpivot(
        index=["sae_layer", "features"], variable_name="reference", value_name="active")
    # Quartiles over the sets of each size, computed here: an 8B run has up to 12,870 sets per size.
    boxes = df.group_by("sae_layer", "features", "k").agg(
        lo=pl.col("mean_active").min(), q1=pl.col("mean_active").quantile(0.25, "linear"),
        median=pl.col("mean_active").median(), q3=pl.col("mean_active").quantile(0.75, "linear"),
        hi=pl.col("mean_active").max(), n_sets=pl.len()).sort("sae_layer", "features", "k")
    data = pl.concat([boxes, refs], how="diagonal_relaxed")
    x = alt.X("k:O", title="even heads patched (k)")
    y_title = "critical features active (mean over targets)"
    whisker = alt.Chart().transform_filter("isValid(datum.median)").mark_rule(color=OKABE_ITO["blue"]).encode(
        x=x, y=alt.Y("lo:Q", title=y_title), y2="hi:Q")
    box = alt.Chart().transform_filter("isValid(datum.median)").mark_bar(
        size=10, color=OKABE_ITO["blue"], opacity=0.6).encode(x=x, y="q1:Q", y2="q3:Q",
                                                                tooltip=["k", "n_sets", "lo", "q1", "median", "q3", "hi"])
    median = alt.Chart().transform_filter("isValid(datum.median)").mark_tick(
        color=OKABE_ITO["black"], size=12).encode(x=x, y="median:Q")
    rule = alt.Chart().transform_filter("isValid(datum.active)").mark_rule(strokeDash=[4, 3]).encode(
        y="active:Q", color=alt.Color("reference:N", title="reference", scale=alt.Scale(
            range=[OKABE_ITO["orange"], OKABE_ITO["black"]])))
    return alt.layer(whisker, box, median, rule, data=data).properties(width=WIDTH // 2, height=HEIGHT // 2).facet(
        row=alt.Row("sae_layer:N", title="SAE set, focus layer"), column=alt.Column("features:N", title=None)
    ).properties(title=chart_title(
        f"Critical SAE features each even-head set turns on at the decision position ({labels.model})",
        [f"{n_label(df['n_prompts'])} eligible targets (bug pair kind, both orders), {n_label(df['n_pairs'])} number pairs; "
         "box over head sets: quartiles, whiskers min and max",
         "the seed: any 8 of 16 even heads turn on at least 5 critical features, 4 even heads only 2-3"]))
