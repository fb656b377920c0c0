"""The study's figures: one function per figure, each building an Altair chart from Polars tables.

Every function takes the tables it draws (as read by `bugscope.tables.read`) plus a `Labels`
(model name, format names) and returns a chart whose title says what is plotted and on how many
prompts. `save_chart` writes the chart as SVG and PNG (rendered by vl-convert, no browser) and as
an interactive HTML page with Vega, Vega-Lite and Vega-Embed inlined, so it works offline; every
file is written atomically.

The tables split by pair kind and question order (the baseline accuracy, the patching summaries)
are drawn one column (or row) per pair kind, never the pooled kind, which mixes the bug's pairs
with the controls; the patching figures read the rows with both orders pooled (`by_kind`), the
baseline figure shows each order beside them.

Colours: the Okabe-Ito palette (distinguishable under the common colour-vision deficiencies) for
categories, `viridis` for sequential and `blueorange` for diverging heatmaps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import altair as alt
import polars as pl
import vl_convert as vlc

from bugscope.data.prompts import ALL, ORDERS, PAIR_KINDS
from bugscope.io import atomic_path

# Okabe & Ito (2008), "Color Universal Design".
OKABE_ITO = {
    "orange": "#E69F00", "sky_blue": "#56B4E9", "green": "#009E73", "yellow": "#F0E442",
    "blue": "#0072B2", "vermillion": "#D55E00", "purple": "#CC79A7", "black": "#000000", "grey": "#999999",
}
BUGGY_COLOUR = OKABE_ITO["vermillion"]
CORRECT_COLOUR = OKABE_ITO["blue"]
SEQUENTIAL = "viridis"
DIVERGING = "blueorange"
WIDTH, HEIGHT = 520, 300
FIGURE_EXTS = ("svg", "png", "html")


@dataclass(frozen=True)
class Labels:
    """What the titles need: the model and the two formats of the contrast."""

    model: str
    buggy_format: str = "qa"
    correct_format: str = "simple"
    confidence: float = 0.95

    @property
    def ci(self) -> str:
        return f"{round(100 * self.confidence)} % CI"

    @classmethod
    def from_config(cls, config) -> "Labels":
        return cls(config["model"]["name"], config["prompts"]["buggy_format"], config["prompts"]["correct_format"],
                   config["bootstrap"]["confidence"])


def chart_title(text: str, subtitle: str | Sequence[str] | None = None) -> alt.TitleParams:
    return alt.TitleParams(text, subtitle=subtitle or "", anchor="start")


def n_label(values) -> str:
    """'64' or '60-64' for a column of counts."""
    values = [int(v) for v in values if v is not None]
    if not values:
        return "?"
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


KIND_NOTE = "shorter_bigger = 9.8 vs 9.11 (the bug), longer_bigger = 9.81 vs 9.7, same_length = 9.8 vs 9.7"
ORDERS_POOLED = "both orders"


def by_kind(table: pl.DataFrame) -> pl.DataFrame:
    """The rows of each pair kind with both question orders pooled: what the patching figures draw,
    one column per pair kind. The pooled kind ("all") is left out: it mixes the bug's pairs with
    the control pairs."""
    return table.filter(pl.col("order") == ALL, pl.col("pair_kind") != ALL)


def _kinds(df: pl.DataFrame) -> list[str]:
    present = set(df["pair_kind"].to_list())
    return [k for k in PAIR_KINDS if k in present] + sorted(present - set(PAIR_KINDS))


def kind_column(df: pl.DataFrame) -> alt.Column:
    return alt.Column("pair_kind:N", title="pair kind", sort=_kinds(df))


def null_nan(df: pl.DataFrame, *columns: str) -> pl.DataFrame:
    """NaN (a rate over no rows) as null, which Vega-Lite leaves undrawn."""
    return df.with_columns(pl.when(pl.col(c).is_not_nan()).then(pl.col(c)).alias(c) for c in columns)


def head_order(n_heads: int) -> list[str]:
    """Head labels, even heads first then odd: h0, h2, ..., h1, h3, ..."""
    return [f"h{h}" for h in [*range(0, n_heads, 2), *range(1, n_heads, 2)]]


# --- 1. baseline ----------------------------------------------------------------------------------


def baseline_accuracy(accuracy: pl.DataFrame, labels: Labels) -> alt.FacetChart:
    """Accuracy per prompt format (x) and question order (bars: each order and both pooled), one
    column per pair kind, decision-logit metric, with the pair-level CIs."""
    role = {labels.buggy_format: " (buggy)", labels.correct_format: " (correct)"}
    df = null_nan(accuracy.filter(pl.col("pair_kind") != ALL), "accuracy", "accuracy_low", "accuracy_high").with_columns(
        (pl.col("format") + pl.col("format").replace_strict(role, default="")).alias("format_role"),
        pl.col("order").replace({ALL: ORDERS_POOLED}).alias("order_label"))
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
    n_pairs = ", ".join(f"{k} {n_label(pooled.filter(pl.col('pair_kind') == k)['n_pairs'])}" for k in _kinds(df))
    return alt.layer(bars, err, chance, data=df).properties(width=WIDTH // 2, height=HEIGHT).facet(
        column=kind_column(df)).properties(title=chart_title(
            f"Baseline accuracy per prompt format, question order and pair kind ({labels.model})",
            [f"decision-token logit difference > 0; number pairs: {n_pairs}; {KIND_NOTE}",
             f"bars: {labels.ci} (bootstrap over number pairs); dashed: chance"]))


# --- 2./3. overlap and amplification: bugscope.figures.overlap ----------------------------------


# --- 4. format-sensitive features -----------------------------------------------------------------


def format_features(discriminative: pl.DataFrame, named: pl.DataFrame, labels: Labels,
                    focus: Sequence[int]) -> alt.FacetChart | alt.LayerChart:
    """Mean activation in the buggy vs the correct format of the top buggy-vs-correct features."""
    disc = (discriminative.filter(pl.col("comparison") == "buggy_vs_correct", pl.col("layer").is_in(list(focus)))
            .with_columns(pl.lit("top discriminative").alias("kind"),
                          pl.when(pl.col("direction") == "up").then(pl.lit(f"higher in {labels.buggy_format}"))
                          .otherwise(pl.lit(f"higher in {labels.correct_format}")).alias("direction"),
                          pl.when(pl.col("rank") == 0).then(pl.format("f{}", "feature_id")).otherwise(pl.lit(""))
                          .alias("label"))
            .select("layer", "feature_id", pl.col("mean_a").alias("mean_buggy"), pl.col("mean_b").alias("mean_correct"),
                    "direction", "kind", "label", "effect_size", "q_value", "significant", "n_a"))
    nam = (named.filter(pl.col("layer").is_in(list(focus)))
           .with_columns(pl.lit("named").alias("kind"), pl.lit("named feature").alias("direction"),
                         pl.format("f{} ({}, {}x)", "feature_id", "category", pl.col("ratio").round(2)).alias("label"))
           .select("layer", "feature_id", "mean_buggy", "mean_correct", "direction", "kind", "label"))
    df = pl.concat([disc, nam], how="diagonal_relaxed")
    n_pairs = n_label(disc["n_a"]) if disc.height else n_label(named["n_pairs"])
    hi = max(float(df.select(pl.max_horizontal("mean_buggy", "mean_correct").max()).item() or 1.0), 1e-6)
    axis = alt.Scale(domain=[0, hi * 1.05], nice=False)
    colour = alt.Color("direction:N", title=None, legend=alt.Legend(orient="top"),
                       scale=alt.Scale(domain=[f"higher in {labels.buggy_format}", f"higher in {labels.correct_format}",
                                               "named feature"],
                                       range=[BUGGY_COLOUR, CORRECT_COLOUR, OKABE_ITO["black"]]))
    x = alt.X("mean_correct:Q", title=f"mean activation, {labels.correct_format} format (correct)", scale=axis)
    y = alt.Y("mean_buggy:Q", title=f"mean activation, {labels.buggy_format} format (buggy)", scale=axis)
    diag = alt.Chart(pl.DataFrame({"mean_correct": [0.0, hi * 1.05], "mean_buggy": [0.0, hi * 1.05]})).mark_line(
        strokeDash=[4, 4], color=OKABE_ITO["grey"]).encode(x=x, y=y)
    points = alt.Chart().mark_point(filled=True, size=70, opacity=0.85).encode(
        x=x, y=y, color=colour, shape=alt.Shape("kind:N", legend=None),
        tooltip=["layer", "feature_id", "kind", "direction", alt.Tooltip("mean_buggy:Q", format=".3f"),
                 alt.Tooltip("mean_correct:Q", format=".3f"), alt.Tooltip("effect_size:Q", format=".2f"),
                 alt.Tooltip("q_value:Q", format=".2g"), "significant"])
    text = alt.Chart().mark_text(align="left", dx=6, dy=-6, fontSize=10).encode(x=x, y=y, text="label:N")
    layered = alt.layer(diag, points, text, data=df).properties(width=WIDTH - 120, height=WIDTH - 120)
    title = chart_title(f"Format-sensitive SAE features at focus layer {', '.join(map(str, focus))} ({labels.model})",
                   f"top buggy-vs-correct features per direction and named features; means over {n_pairs} prompt "
                   "pairs; dashed: equal activation")
    if len(focus) > 1:
        return layered.facet(column=alt.Column("layer:O", title="layer")).properties(title=title)
    return layered.properties(title=title)


# --- 5. SAE quality -------------------------------------------------------------------------------


def sae_quality(quality: pl.DataFrame, labels: Labels) -> alt.HConcatChart:
    """Per layer: explained variance on held-out prompt and corpus tokens, L0, and the dead fraction."""
    q = quality.sort("layer")
    prompts_label = f"held-out analysis prompts ({n_label(q['n_tokens_prompts'])} tokens)"
    corpus_label = f"held-out corpus ({n_label(q['n_tokens_corpus'])} tokens)"
    domain = [prompts_label, corpus_label]
    colour = alt.Color("tokens:N", title="evaluated on", legend=alt.Legend(orient="top", labelLimit=400, direction="vertical"),
                       scale=alt.Scale(domain=domain, range=[BUGGY_COLOUR, CORRECT_COLOUR]))
    long = pl.concat([
        q.select("layer", pl.col("ev_prompts").alias("ev"), pl.col("l0_prompts").alias("l0"),
                 pl.lit(prompts_label).alias("tokens")),
        q.select("layer", pl.col("ev_corpus").alias("ev"), pl.col("l0_corpus").alias("l0"),
                 pl.lit(corpus_label).alias("tokens")),
    ])
    x = alt.X("layer:Q", title="layer", axis=alt.Axis(tickMinStep=1, format="d"))
    width = WIDTH * 2 // 3
    tip = ["layer", "tokens", alt.Tooltip("ev:Q", format=".3f"), alt.Tooltip("l0:Q", format=".1f")]
    ev = alt.Chart(long).mark_line(point=True).encode(
        x=x, y=alt.Y("ev:Q", title="explained variance (1 = perfect reconstruction)", scale=alt.Scale(domainMax=1)),
        color=colour, strokeDash=alt.StrokeDash("tokens:N", legend=None), tooltip=tip,
    ).properties(width=width, height=HEIGHT, title=chart_title("Explained variance"))
    l0 = alt.Chart(long).mark_line(point=True).encode(
        x=x, y=alt.Y("l0:Q", title="L0 (mean active features per token)", scale=alt.Scale(zero=True)),
        color=colour, strokeDash=alt.StrokeDash("tokens:N", legend=None), tooltip=tip,
    ).properties(width=width, height=HEIGHT, title=chart_title("L0"))
    dead = alt.Chart(q).mark_bar(color=OKABE_ITO["grey"]).encode(
        x=alt.X("layer:O", title="layer"),
        y=alt.Y("dead_fraction:Q", title="dead fraction (never active on held-out tokens)",
                scale=alt.Scale(domain=[0, 1])),
        tooltip=["layer", "d_sae", "source", alt.Tooltip("dead_fraction:Q", format=".3f"),
                 alt.Tooltip("train_dead_fraction:Q", format=".3f")],
    ).properties(width=width // 2 + 40, height=HEIGHT, title=chart_title("Dead features"))
    source = ", ".join(sorted(set(q["source"].drop_nulls().to_list()))) or "?"
    return alt.hconcat(ev, l0, dead).properties(title=chart_title(
        f"SAE quality per layer ({labels.model}; {source} SAEs, {n_label(q['d_sae'])} features)",
        f"reconstruction of held-out tokens of the {n_label(q['n_prompts'])} held-out analysis prompts and of the "
        "held-out corpus; the attention-sink position 0 is left out"))


# --- 6./7./9. head patching -----------------------------------------------------------------------

RATE_COLUMNS = ("success_rate", "success_low", "success_high", "recovery", "recovery_low", "recovery_high")
CEILING_LABEL = "ceiling: whole residual stream"
SERIES_COLOURS = {"all heads": OKABE_ITO["black"], "even heads": OKABE_ITO["blue"], "odd heads": OKABE_ITO["orange"],
                  CEILING_LABEL: OKABE_ITO["grey"]}
CONTROL_COLOURS = [OKABE_ITO["purple"], OKABE_ITO["green"]]
REFERENCE_FAMILIES = ["ceiling", "random_control"]


def eligible_text(df: pl.DataFrame) -> list[str]:
    """Two subtitle lines: the eligible targets (source right, target wrong) of all, per pair kind; the rates."""
    per_kind = ", ".join(f"{k} {n_label(d['n_eligible'])} of {n_label(d['n_prompts'])}"
                         for k in _kinds(df) for d in [df.filter(pl.col("pair_kind") == k)])
    return [f"eligible target prompts (source right, target wrong unpatched), both question orders pooled: {per_kind}",
            "success rate: the fraction of them the patch makes right; recovery: sum(LD patched - LD target) / "
            "sum(LD source - LD target) over them, 1 = the source's logit difference"]


def direction_text(df: pl.DataFrame) -> str:
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
        row=alt.Row("pair_kind:N", title="pair kind", sort=_kinds(cells)))
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


# --- 8. head -> feature attribution ---------------------------------------------------------------


def head_attribution(attribution: pl.DataFrame, labels: Labels, focus: Sequence[int]) -> alt.FacetChart:
    """Direct attribution of each head to each feature at the focus layer(s): buggy, correct, difference."""
    heads = attribution.filter(pl.col("component") == "head", pl.col("layer").is_in(list(focus)))
    n_heads = int(heads["head"].max()) + 1 if heads.height else 0
    order = head_order(n_heads)
    wide = heads.pivot(on="format", index=["layer", "feature_id", "feature_source", "head"],
                       values="direct_attribution")
    diff_name = f"{labels.buggy_format} - {labels.correct_format}"
    wide = wide.with_columns((pl.col(labels.buggy_format) - pl.col(labels.correct_format)).alias(diff_name))
    panels = [labels.buggy_format, labels.correct_format, diff_name]
    long = (wide.unpivot(index=["layer", "feature_id", "feature_source", "head"], on=panels,
                         variable_name="panel", value_name="direct_attribution")
            .with_columns(pl.format("h{}", "head").alias("head_label"),
                          pl.when(pl.col("head") % 2 == 0).then(pl.lit("even")).otherwise(pl.lit("odd")).alias("parity"),
                          pl.format("f{} ({})", "feature_id", "feature_source").alias("feature")))
    n_prompts = n_label(heads["n_prompts"])
    lim = float(long["direct_attribution"].abs().max() or 1.0)
    chart = alt.Chart(long).mark_rect().encode(
        x=alt.X("head_label:N", sort=order, title="head (even, then odd)"),
        y=alt.Y("feature:N", title="SAE feature (why it was attributed)"),
        color=alt.Color("direct_attribution:Q", title="direct attribution",
                        scale=alt.Scale(scheme=DIVERGING, domain=[-lim, lim], domainMid=0)),
        tooltip=["layer", "panel", "head", "parity", "feature_id", "feature_source",
                 alt.Tooltip("direct_attribution:Q", format=".4f")],
    ).properties(width=24 * max(n_heads, 4), height=alt.Step(16))
    return chart.facet(
        column=alt.Column("panel:N", sort=panels, title=None),
        row=alt.Row("layer:O", title="layer"),
    ).properties(title=chart_title(
        f"Direct attribution of attention heads to SAE features at focus layer {', '.join(map(str, focus))} "
        f"({labels.model})",
        f"mean contribution of each head to the feature's pre-activation at the decision position, per format "
        f"({n_prompts} prompts per format) and their difference"))


# --- saving ---------------------------------------------------------------------------------------


def save_chart(chart: alt.TopLevelMixin, outputs: dict[str, str | Path], *, png_scale: float = 2.0) -> dict:
    """Write `chart` to the paths in `outputs` (keys among svg, png, html), each atomically.

    Returns the rendered Vega-Lite spec (a dict), which the tests inspect.
    """
    unknown = set(outputs) - set(FIGURE_EXTS)
    if unknown:
        raise ValueError(f"save_chart: unknown output kinds {sorted(unknown)}; expected some of {FIGURE_EXTS}.")
    spec = chart.to_dict()
    if "svg" in outputs:
        svg = vlc.vegalite_to_svg(spec)
        with atomic_path(outputs["svg"]) as tmp:
            tmp.write_text(svg)
    if "png" in outputs:
        png = vlc.vegalite_to_png(spec, scale=png_scale)
        with atomic_path(outputs["png"]) as tmp:
            tmp.write_bytes(png)
    if "html" in outputs:
        html = chart.to_html(inline=True)
        with atomic_path(outputs["html"]) as tmp:
            tmp.write_text(html)
    return spec
