"""Figures of the head patching (bugscope.patching): the sweep over layers and head sets (figure 6),
recovery against the number of heads patched (figure 7) and the original method beside true per-head
patching (figure 9). The row selection, rate columns and subtitle lines here are shared with the
focus-layer experiments' figures (bugscope.figures.experiments)."""

from __future__ import annotations

from typing import Sequence

import altair as alt
import polars as pl

from bugscope.figures.style import (
    HEIGHT,
    KIND_NOTE,
    OKABE_ITO,
    SEQUENTIAL,
    WIDTH,
    Labels,
    by_kind,
    chart_title,
    head_order,
    kind_column,
    kind_order,
    n_label,
    null_nan,
)

RATE_COLUMNS = ("success_rate", "success_low", "success_high", "recovery", "recovery_low", "recovery_high")
CEILING_LABEL = "ceiling: whole residual stream"
SERIES_COLOURS = {"all heads": OKABE_ITO["black"], "even heads": OKABE_ITO["blue"], "odd heads": OKABE_ITO["orange"],
                  CEILING_LABEL: OKABE_ITO["grey"]}
CONTROL_COLOURS = [OKABE_ITO["purple"], OKABE_ITO["green"]]
REFERENCE_FAMILIES = ["ceiling", "random_control"]


def eligible_text(df: pl.DataFrame) -> list[str]:
    """Two subtitle lines: the eligible targets (source right, target wrong) of all, per pair kind; the rates."""
    per_kind = ", ".join(f"{k} {n_label(d['n_eligible'])} of {n_label(d['n_prompts'])}"
                         for k in kind_order(df) for d in [df.filter(pl.col("pair_kind") == k)])
    return [f"eligible target prompts (source right, target wrong unpatched), both question orders pooled: {per_kind}",
            "success rate: the fraction of them the patch makes right; recovery: sum(LD patched - LD target) / "
            "sum(LD source - LD target) over them, 1 = the source's logit difference"]


def direction_text(df: pl.DataFrame) -> str:
    """The subtitle line of the patch: formats, direction, method, positions, and the pair kinds."""
    row = df.row(0, named=True)
    return (f"{row['source_format']} -> {row['target_format']} ({row['direction']}), {row['method']} patch "
            f"at {row['positions']} positions; {KIND_NOTE}")


def head_set_order(n_heads: int) -> list[str]:
    """Head-set labels of the sweep heatmap: all, even, odd, then single heads even first then odd."""
    return ["all", "even", "odd", *head_order(n_heads)]


def _patch_rows(summary: pl.DataFrame) -> pl.DataFrame:
    """by_kind rows with head_set_label (all / even / odd / h<i>), the heads list as text (for
    tooltips), NaN rates as nulls and `series`: '<pool> heads', the ceiling or 'random k heads (control)'."""
    return null_nan(by_kind(summary), *RATE_COLUMNS).with_columns(
        pl.when(pl.col("family") == "single").then(pl.format("h{}", pl.col("heads").list.first()))
        .otherwise(pl.col("head_set")).alias("head_set_label"),
        pl.col("heads").cast(pl.List(pl.String)).list.join(",").alias("heads"),
        pl.when(pl.col("family") == "ceiling").then(pl.lit(CEILING_LABEL))
        .when(pl.col("family") == "random_control").then(pl.format("random {} heads (control)", "k"))
        .otherwise(pl.format("{} heads", "head_set")).alias("series"))


def rate_tooltip(*extra) -> list:
    """The tooltip of a patching row: `extra` fields, then its keys, rates and counts."""
    return [*extra, "pair_kind", "layer", "head_set", "heads", *(alt.Tooltip(f"{c}:Q", format=".3f") for c in RATE_COLUMNS),
            alt.Tooltip("broken_rate:Q", format=".3f"), "n_eligible", "n_prompts"]


def _recovery_by_layer(df: pl.DataFrame, labels: Labels) -> alt.FacetChart:
    """Recovery per layer (CI bars) of all / even / odd with the ceiling and the random-head control
    (dashed), one column per pair kind; the series sit side by side around each layer."""
    present = df["series"].unique().to_list()
    domain = [s for s in SERIES_COLOURS if s in present] + sorted(s for s in present if s not in SERIES_COLOURS)
    controls = [s for s in domain if s not in SERIES_COLOURS]
    spread = {s: 0.5 * (i - (len(domain) - 1) / 2) / max(len(domain), 1) for i, s in enumerate(domain)}
    df = df.with_columns((pl.col("layer") + pl.col("series").replace_strict(spread, default=0.0)).alias("layer_x"))
    colour = alt.Color("series:N", title=None, sort=domain, legend=alt.Legend(orient="top", labelLimit=400),
                       scale=alt.Scale(domain=domain, range=[SERIES_COLOURS.get(s) or CONTROL_COLOURS[
                           controls.index(s) % len(CONTROL_COLOURS)] for s in domain]))
    x = alt.X("layer_x:Q", title="layer", axis=alt.Axis(tickMinStep=1, format="d"))
    dash = alt.condition(alt.FieldOneOfPredicate(field="family", oneOf=REFERENCE_FAMILIES), alt.value([5, 3]),
                         alt.value([1, 0]))
    line = alt.Chart().mark_line(point=True).encode(
        x=x, y=alt.Y("recovery:Q", title=f"recovery ({labels.ci})"), color=colour, strokeDash=dash,
        tooltip=rate_tooltip("series"))
    err = alt.Chart().mark_errorbar(ticks=True).encode(
        x=x, y=alt.Y("recovery_low:Q", title=""), y2="recovery_high:Q", color=colour)
    return alt.layer(err, line, data=df).properties(width=WIDTH // 2 + 40, height=HEIGHT).facet(
        column=kind_column(df))


def head_sweep(summary: pl.DataFrame, labels: Labels, n_heads: int) -> alt.VConcatChart:
    """Top: recovery per layer of all / even / odd beside the ceiling and the random-head control;
    bottom: heatmap layer x head set (all / even / odd / single heads), coloured by the success rate;
    one column (top) or row (bottom) per pair kind, both question orders pooled."""
    df = _patch_rows(summary)
    lines = _recovery_by_layer(df.filter(pl.col("family").is_in(["all", "even", "odd", *REFERENCE_FAMILIES])), labels)
    cells = df.filter(pl.col("family").is_in(["all", "even", "odd", "single"]))
    order = head_set_order(n_heads)
    base = alt.Chart().encode(
        x=alt.X("head_set_label:N", sort=order, title="head set patched (all, even, odd, then single heads: even, odd)",
                axis=alt.Axis(labelAngle=0)),
        y=alt.Y("layer:O", title="layer", sort="ascending"))
    rect = base.mark_rect().encode(
        color=alt.Color("success_rate:Q", title="success rate", scale=alt.Scale(scheme=SEQUENTIAL, domain=[0, 1])),
        tooltip=rate_tooltip())
    layers = cells["layer"].n_unique()
    marks = [rect]
    if layers * len(order) <= 400:  # small grids: print the rates in the cells
        marks.append(base.mark_text(fontSize=9).encode(
            text=alt.Text("success_rate:Q", format=".2f"),
            color=alt.condition(alt.datum.success_rate > 0.6, alt.value("black"), alt.value("white"))))
    heat = alt.layer(*marks, data=cells).properties(width=max(26 * len(order), 300), height=max(18 * layers, 120)).facet(
        row=alt.Row("pair_kind:N", title="pair kind", sort=kind_order(cells)))
    return alt.vconcat(lines, heat).resolve_scale(color="independent").properties(title=chart_title(
        f"Head patching sweep: recovery and success rate per layer and head set ({labels.model})",
        [*eligible_text(df), "top: recovery with " + labels.ci + " (bootstrap over number pairs); dashed: the ceiling "
         "(whole residual stream patched) and the random-head control (mean over random all-head sets of as many heads "
         "as the even / the odd pool, where the subsets were run); bottom: success rate", direction_text(df)]))


def head_subsets(summary: pl.DataFrame, labels: Labels, focus: Sequence[int]) -> alt.FacetChart:
    """Recovery vs the number of heads patched (k) for the even, odd and all pools, one row per focus
    layer and one column per pair kind (both orders pooled).

    Points: each random k-subset with its bootstrap CI; diamonds: the whole pools (the named even /
    odd / all sets); squares: the random-head control; line: mean over the subsets of each k;
    dashed rule: the ceiling (whole residual stream).
    """
    kinds = {"subset": "random subset", "all": "whole pool", "even": "whole pool", "odd": "whole pool",
             "random_control": "random-head control", "ceiling": "ceiling"}
    df = _patch_rows(summary).filter(pl.col("layer").is_in(list(focus)), pl.col("family").is_in(list(kinds)))
    df = df.with_columns(pl.col("family").replace_strict(kinds).alias("kind"), pl.col("sample").clip(lower_bound=0).alias("_s"))
    keys = ["layer", "pair_kind", "pool", "k"]
    points = df.filter(pl.col("kind") != "ceiling").join(df.group_by(*keys, "kind").agg(pl.len().alias("_m")),
                                                          on=[*keys, "kind"], maintain_order="left")
    offset = {"even": -0.12, "odd": 0.12, "all": 0.0}
    points = points.with_columns((pl.col("k") + pl.col("pool").replace_strict(offset, default=0.0)
                                  + pl.col("kind").replace_strict({"whole pool": 0.08, "random-head control": 0.3},
                                                                  default=0.0)
                                  + (pl.col("_s") - (pl.col("_m") - 1) / 2) * 0.05).alias("k_jitter"))
    subsets = df.filter(pl.col("kind") == "random subset")
    means = subsets.group_by(keys).agg(pl.col("recovery").mean().alias("mean_recovery"), pl.len().alias("n_subsets")
                                       ).with_columns(pl.lit("subset mean").alias("kind")).sort(keys)
    pools = [p for p in ("even", "odd", "all") if p in df["pool"].unique().to_list()]
    colour = alt.Color("pool:N", title="heads drawn from",
                       scale=alt.Scale(domain=["even", "odd", "all"],
                                       range=[OKABE_ITO["blue"], OKABE_ITO["orange"], OKABE_ITO["black"]]))
    k_max = int(points["k"].max() or 1)
    k_scale = alt.Scale(domain=[0, k_max + 0.5], nice=False)
    x = alt.X("k_jitter:Q", title="number of heads patched (k)", axis=alt.Axis(tickMinStep=1, format="d"), scale=k_scale)
    drawn = alt.FieldOneOfPredicate(field="kind", oneOf=["random subset", "whole pool", "random-head control"])
    line = alt.Chart().mark_line(opacity=0.7).transform_filter(alt.FieldEqualPredicate(field="kind", equal="subset mean")
                                                               ).encode(
        x=alt.X("k:Q", title="number of heads patched (k)", scale=k_scale),
        y=alt.Y("mean_recovery:Q", title=""), color=colour, detail="pool:N")
    err = alt.Chart().mark_errorbar(ticks=False, opacity=0.6).transform_filter(drawn).encode(
        x=x, y=alt.Y("recovery_low:Q", title=""), y2="recovery_high:Q", color=colour)
    pts = alt.Chart().mark_point(filled=True, size=45).transform_filter(drawn).encode(
        x=x, y=alt.Y("recovery:Q", title=f"recovery ({labels.ci})"), color=colour,
        shape=alt.Shape("kind:N", title=None, scale=alt.Scale(domain=["random subset", "whole pool", "random-head control"],
                                                              range=["circle", "diamond", "square"])),
        tooltip=rate_tooltip("pool", "k"))
    ceiling = alt.Chart().mark_rule(strokeDash=[5, 3], color=OKABE_ITO["grey"]).transform_filter(
        alt.FieldEqualPredicate(field="kind", equal="ceiling")).encode(y=alt.Y("recovery:Q", title=""),
                                                                       tooltip=rate_tooltip("kind"))
    data = pl.concat([points, df.filter(pl.col("kind") == "ceiling"), means], how="diagonal_relaxed")
    per_k = subsets.group_by(keys).agg(pl.len().alias("n"))["n"]
    return alt.layer(ceiling, line, err, pts, data=data).properties(width=WIDTH // 2 + 60, height=HEIGHT).facet(
        row=alt.Row("layer:O", title="focus layer"), column=kind_column(df)).properties(title=chart_title(
            f"Recovery vs number of heads patched at focus layer {', '.join(map(str, focus))} ({labels.model})",
            [*eligible_text(df),
             f"pools: {', '.join(pools)}; points: random k-subsets ({n_label(per_k)} per pool and k) with {labels.ci} "
             "(bootstrap over number pairs); diamonds: the whole pool; squares: the random-head control; line: mean "
             "over subsets; dashed: the ceiling (whole residual stream)",
             direction_text(df)]))


def original_method(comparison: pl.DataFrame, labels: Labels, n_heads: int) -> alt.FacetChart:
    """The original method (post-o_proj slices, positions [:min_len]) beside true per-head patching, same
    prompts: recovery per head set, one row per layer and one column per pair kind (both orders pooled)."""
    df = _patch_rows(comparison).with_columns(
        pl.when(pl.col("method") == "original").then(pl.lit("original method: attn output slices, positions [:min_len]"))
        .otherwise(pl.format("per-head: o_proj input, {} positions", "positions")).alias("method_label"))
    methods = (df.select("method", "positions", "method_label").unique()
               .sort(pl.col("method") == "original", "positions", descending=[True, False])["method_label"].to_list())
    palette = [OKABE_ITO["vermillion"], OKABE_ITO["blue"], OKABE_ITO["sky_blue"], OKABE_ITO["green"]]
    colour = alt.Color("method_label:N", title=None, sort=methods, legend=alt.Legend(orient="top", labelLimit=500,
                                                                                      direction="vertical"),
                       scale=alt.Scale(domain=methods, range=palette[:len(methods)]))
    order = [h for h in head_set_order(n_heads) if h in df["head_set_label"].to_list()]
    x = alt.X("head_set_label:N", sort=order, title="head set patched", axis=alt.Axis(labelAngle=0))
    offset = alt.XOffset("method_label:N", sort=methods)
    bars = alt.Chart().mark_bar().encode(
        x=x, xOffset=offset, color=colour, y=alt.Y("recovery:Q", title=f"recovery ({labels.ci})"),
        tooltip=rate_tooltip("method", "positions"))
    err = alt.Chart().mark_errorbar(ticks=True, color="black").encode(
        x=x, xOffset=offset, y=alt.Y("recovery_low:Q", title=""), y2="recovery_high:Q")
    layered = alt.layer(bars, err, data=df).properties(width=max(22 * len(order) * len(methods) // 2, 240),
                                                        height=HEIGHT * 2 // 3)
    row = df.row(0, named=True)
    return layered.facet(row=alt.Row("layer:O", title="focus layer"), column=kind_column(df)).properties(title=chart_title(
        f"The seed's head patching vs true per-head patching, same prompts ({labels.model})",
        [*eligible_text(df),
         f"{row['source_format']} -> {row['target_format']} ({row['direction']}); bars: {labels.ci} "
         f"(bootstrap over number pairs); the ceiling and the random-head control: the sweep figure; {KIND_NOTE}"]))
