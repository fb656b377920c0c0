"""The study's figures: one function per figure, each building an Altair chart from Polars tables.

Every function takes the tables it draws (as read by `bugscope.tables.read`) plus a `Labels`
(model name, format names) and returns a chart whose title says what is plotted and on how many
prompts. `save_chart` writes the chart as SVG and PNG (rendered by vl-convert, no browser) and as
an interactive HTML page with Vega, Vega-Lite and Vega-Embed inlined, so it works offline; every
file is written atomically.

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

from bugscope.io import atomic_path
from bugscope.patch_summary import bug_kind_rows
from bugscope.prompts import BUG_PAIR_KIND

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


def _title(text: str, subtitle: str | Sequence[str] | None = None) -> alt.TitleParams:
    return alt.TitleParams(text, subtitle=subtitle or "", anchor="start")


def _n(values) -> str:
    """'64' or '60-64' for a column of counts."""
    values = [int(v) for v in values if v is not None]
    if not values:
        return "?"
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def head_order(n_heads: int) -> list[str]:
    """Head labels, even heads first then odd: h0, h2, ..., h1, h3, ..."""
    return [f"h{h}" for h in [*range(0, n_heads, 2), *range(1, n_heads, 2)]]


# --- 1. baseline ----------------------------------------------------------------------------------


def baseline_accuracy(accuracy: pl.DataFrame, labels: Labels) -> alt.LayerChart:
    """Accuracy per prompt format and pair kind (both orders pooled), decision-logit metric, with CIs."""
    role = {labels.buggy_format: " (buggy)", labels.correct_format: " (correct)"}
    df = accuracy.filter(pl.col("order") == "all", pl.col("pair_kind") != "all").with_columns(
        (pl.col("format") + pl.col("format").replace_strict(role, default="")).alias("format_role"))
    kinds = [k for k in ("shorter_bigger", "longer_bigger", "same_length") if k in df["pair_kind"].to_list()]
    colour = alt.Color("pair_kind:N", title="pair kind", sort=kinds,
                       scale=alt.Scale(domain=kinds, range=[BUGGY_COLOUR, CORRECT_COLOUR, OKABE_ITO["grey"]][:len(kinds)]))
    base = alt.Chart(df).encode(
        x=alt.X("format_role:N", title="prompt format", sort=sorted(df["format_role"].unique().to_list())),
        xOffset=alt.XOffset("pair_kind:N", sort=kinds))
    bars = base.mark_bar(opacity=0.8).encode(
        y=alt.Y("accuracy:Q", title=f"accuracy (fraction answered right, {labels.ci})",
                scale=alt.Scale(domain=[0, 1])),
        color=colour,
        tooltip=["format", "pair_kind", "n_prompts", "n_pairs", alt.Tooltip("accuracy:Q", format=".3f"),
                 alt.Tooltip("accuracy_low:Q", format=".3f"), alt.Tooltip("accuracy_high:Q", format=".3f"),
                 alt.Tooltip("mean_logit_diff:Q", format=".3f")])
    err = base.mark_errorbar(ticks=True, color="black").encode(
        y=alt.Y("accuracy_low:Q", title=""), y2="accuracy_high:Q")
    chance = alt.Chart(pl.DataFrame({"y": [0.5]})).mark_rule(strokeDash=[4, 4], color=OKABE_ITO["grey"]).encode(y="y:Q")
    n_pairs = ", ".join(f"{k} {_n(df.filter(pl.col('pair_kind') == k)['n_pairs'])}" for k in kinds)
    return alt.layer(bars, err, chance).properties(
        width=WIDTH // 2 + 60, height=HEIGHT,
        title=_title(f"Baseline accuracy per prompt format and pair kind ({labels.model})",
                     [f"decision-token logit difference > 0, both question orders; number pairs: {n_pairs}; "
                      f"shorter_bigger = 9.8 vs 9.11, longer_bigger = 9.81 vs 9.7, same_length = 9.8 vs 9.7",
                      f"bars: {labels.ci} (bootstrap over number pairs); dashed: chance"]))


# --- 2./3. overlap and amplification: bugscope.figures_overlap ----------------------------------


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
    n_pairs = _n(disc["n_a"]) if disc.height else _n(named["n_pairs"])
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
    title = _title(f"Format-sensitive SAE features at focus layer {', '.join(map(str, focus))} ({labels.model})",
                   f"top buggy-vs-correct features per direction and named features; means over {n_pairs} prompt "
                   "pairs; dashed: equal activation")
    if len(focus) > 1:
        return layered.facet(column=alt.Column("layer:O", title="layer")).properties(title=title)
    return layered.properties(title=title)


# --- 5. SAE quality -------------------------------------------------------------------------------


def sae_quality(quality: pl.DataFrame, labels: Labels) -> alt.HConcatChart:
    """Per layer: explained variance on held-out prompt and corpus tokens, L0, and the dead fraction."""
    q = quality.sort("layer")
    prompts_label = f"held-out analysis prompts ({_n(q['n_tokens_prompts'])} tokens)"
    corpus_label = f"held-out corpus ({_n(q['n_tokens_corpus'])} tokens)"
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
    ).properties(width=width, height=HEIGHT, title=_title("Explained variance"))
    l0 = alt.Chart(long).mark_line(point=True).encode(
        x=x, y=alt.Y("l0:Q", title="L0 (mean active features per token)", scale=alt.Scale(zero=True)),
        color=colour, strokeDash=alt.StrokeDash("tokens:N", legend=None), tooltip=tip,
    ).properties(width=width, height=HEIGHT, title=_title("L0"))
    dead = alt.Chart(q).mark_bar(color=OKABE_ITO["grey"]).encode(
        x=alt.X("layer:O", title="layer"),
        y=alt.Y("dead_fraction:Q", title="dead fraction (never active on held-out tokens)",
                scale=alt.Scale(domain=[0, 1])),
        tooltip=["layer", "d_sae", "source", alt.Tooltip("dead_fraction:Q", format=".3f"),
                 alt.Tooltip("train_dead_fraction:Q", format=".3f")],
    ).properties(width=width // 2 + 40, height=HEIGHT, title=_title("Dead features"))
    source = ", ".join(sorted(set(q["source"].drop_nulls().to_list()))) or "?"
    return alt.hconcat(ev, l0, dead).properties(title=_title(
        f"SAE quality per layer ({labels.model}; {source} SAEs, {_n(q['d_sae'])} features)",
        f"reconstruction of held-out tokens of the {_n(q['n_prompts'])} held-out analysis prompts and of the "
        "held-out corpus; the attention-sink position 0 is left out"))


# --- 6./7./9. head patching -----------------------------------------------------------------------


def _success_title(df: pl.DataFrame) -> str:
    """'success rate: of the N eligible targets (source right, target wrong), the fraction made right'"""
    return (f"success rate: of the {_n(df['n_eligible'])} eligible target prompts (of {_n(df['n_prompts'])}; source "
            f"right, target wrong unpatched), the fraction the patch makes right; {BUG_PAIR_KIND} pairs")


def _direction_text(df: pl.DataFrame) -> str:
    row = df.row(0, named=True)
    return (f"{row['source_format']} -> {row['target_format']} ({row['direction']}), {row['method']} patch "
            f"at {row['positions']} positions")


def head_set_order(n_heads: int) -> list[str]:
    """Head-set labels of the sweep heatmap: all, even, odd, then single heads even first then odd."""
    return ["all", "even", "odd", *head_order(n_heads)]


def _head_set_label(df: pl.DataFrame) -> pl.DataFrame:
    """Adds head_set_label (all / even / odd / h<i>) and turns the heads list into text (for tooltips)."""
    return df.with_columns(pl.when(pl.col("family") == "single").then(pl.format("h{}", pl.col("heads").list.first()))
                           .otherwise(pl.col("head_set")).alias("head_set_label"),
                           pl.col("heads").cast(pl.List(pl.String)).list.join(",").alias("heads"))


def head_sweep(summary: pl.DataFrame, labels: Labels, n_heads: int) -> alt.LayerChart:
    """Heatmap: layer x head set (all / even / odd / single heads), coloured by the success rate."""
    summary = bug_kind_rows(summary)
    df = _head_set_label(summary.filter(pl.col("family").is_in(["all", "even", "odd", "single"]))).with_columns(
        pl.when(pl.col("success_rate").is_not_nan()).then(pl.col("success_rate")).alias("success_rate"))
    order = head_set_order(n_heads)
    base = alt.Chart(df).encode(
        x=alt.X("head_set_label:N", sort=order, title="head set patched (all, even, odd, then single heads: even, odd)",
                axis=alt.Axis(labelAngle=0)),
        y=alt.Y("layer:O", title="layer", sort="ascending"))
    rect = base.mark_rect().encode(
        color=alt.Color("success_rate:Q", title="success rate", scale=alt.Scale(scheme=SEQUENTIAL, domain=[0, 1])),
        tooltip=["layer", "head_set", "heads", alt.Tooltip("success_rate:Q", format=".3f"),
                 alt.Tooltip("success_low:Q", format=".3f"), alt.Tooltip("success_high:Q", format=".3f"),
                 alt.Tooltip("broken_rate:Q", format=".3f"), alt.Tooltip("mean_logit_diff:Q", format=".3f"),
                 "n_eligible", "n_prompts"])
    layers = df["layer"].n_unique()
    chart = rect
    if layers * len(order) <= 400:  # small grids: print the rates in the cells
        text = base.mark_text(fontSize=9).encode(
            text=alt.Text("success_rate:Q", format=".2f"),
            color=alt.condition(alt.datum.success_rate > 0.6, alt.value("black"), alt.value("white")))
        chart = alt.layer(rect, text)
    return chart.properties(
        width=max(26 * len(order), 300), height=max(18 * layers, 120),
        title=_title(f"Head patching sweep: success rate per layer and head set ({labels.model})",
                     [_success_title(df), _direction_text(df)]))


def head_subsets(summary: pl.DataFrame, labels: Labels, focus: Sequence[int]) -> alt.FacetChart | alt.LayerChart:
    """Success rate vs the number of heads patched (k) for the even, odd and all pools at the focus layers.

    Points: each random k-subset with its bootstrap CI; the full pools (k = pool size) are the
    named even / odd / all sets; line: mean over the subsets of each k.
    """
    summary = bug_kind_rows(summary)
    df = _head_set_label(summary.filter(pl.col("layer").is_in(list(focus)),
                                        pl.col("family").is_in(["subset", "all", "even", "odd"])))
    df = df.with_columns(
        pl.when(pl.col("success_rate").is_not_nan()).then(pl.col("success_rate")).alias("success_rate"),
        pl.when(pl.col("family") == "subset").then(pl.lit("random subset")).otherwise(pl.lit("whole pool")).alias("kind"),
        pl.col("sample").clip(lower_bound=0).alias("_s"))
    n_samples = df.group_by("layer", "pool", "k").agg(pl.len().alias("_m"))
    offset = {"even": -0.12, "odd": 0.12, "all": 0.0}
    df = (df.join(n_samples, on=["layer", "pool", "k"])
          .with_columns((pl.col("k") + pl.col("pool").replace_strict(offset, default=0.0)
                         + (pl.col("_s") - (pl.col("_m") - 1) / 2) * 0.05).alias("k_jitter")))
    means = df.group_by("layer", "pool", "k").agg(pl.col("success_rate").mean().alias("mean_success"),
                                                  pl.len().alias("n_subsets")).sort("layer", "pool", "k")
    pools = [p for p in ("even", "odd", "all") if p in df["pool"].unique().to_list()]
    per_k = df.filter(pl.col("family") == "subset").group_by("layer", "pool", "k").agg(pl.len().alias("n_subsets"))
    colour = alt.Color("pool:N", title="heads drawn from",
                       scale=alt.Scale(domain=["even", "odd", "all"],
                                       range=[OKABE_ITO["blue"], OKABE_ITO["orange"], OKABE_ITO["black"]]))
    k_max = int(df["k"].max() or 1)
    x = alt.X("k_jitter:Q", title="number of heads patched (k)", axis=alt.Axis(tickMinStep=1, format="d"),
              scale=alt.Scale(domain=[0, k_max + 0.5], nice=False))
    y = alt.Y("success_rate:Q", title=f"success rate ({labels.ci})", scale=alt.Scale(domain=[0, 1]))
    line = alt.Chart().mark_line(opacity=0.7).transform_filter(alt.datum.mean_success != None).encode(  # noqa: E711
        x=alt.X("k:Q", title="number of heads patched (k)", scale=alt.Scale(domain=[0, k_max + 0.5], nice=False)),
        y=alt.Y("mean_success:Q", title=""), color=colour,
        detail="pool:N")
    err = alt.Chart().mark_errorbar(ticks=False, opacity=0.6).encode(
        x=x, y=alt.Y("success_low:Q", title=""), y2="success_high:Q", color=colour)
    pts = alt.Chart().mark_point(filled=True, size=45).encode(
        x=x, y=y, color=colour, shape=alt.Shape("kind:N", title=None, scale=alt.Scale(domain=["random subset", "whole pool"],
                                                                                     range=["circle", "diamond"])),
        tooltip=["layer", "pool", "k", "head_set", "heads", alt.Tooltip("success_rate:Q", format=".3f"),
                 alt.Tooltip("success_low:Q", format=".3f"), alt.Tooltip("success_high:Q", format=".3f"),
                 "n_eligible"])
    data = pl.concat([df, means], how="diagonal_relaxed")
    layered = alt.layer(line, err, pts, data=data).properties(width=WIDTH - 80, height=HEIGHT)
    title = _title(f"Success rate vs number of heads patched at focus layer {', '.join(map(str, focus))} "
                   f"({labels.model})",
                   [_success_title(df),
                    f"pools: {', '.join(pools)}; points: random k-subsets ({_n(per_k['n_subsets'])} per pool and k) with {labels.ci} (bootstrap over number pairs); diamonds: the whole pool; line: mean over subsets",
                    _direction_text(df)])
    if len(focus) > 1:
        return layered.facet(column=alt.Column("layer:O", title="layer")).properties(title=title)
    return layered.properties(title=title)


def original_method(comparison: pl.DataFrame, labels: Labels, n_heads: int) -> alt.FacetChart:
    """The original method (post-o_proj slices, positions [:min_len]) beside true per-head patching, same prompts."""
    df = _head_set_label(bug_kind_rows(comparison)).with_columns(
        pl.when(pl.col("success_rate").is_not_nan()).then(pl.col("success_rate")).alias("success_rate"),
        pl.when(pl.col("method") == "original").then(pl.lit("original method: attn output slices, positions [:min_len]"))
        .otherwise(pl.format("per-head: o_proj input, {} positions", "positions")).alias("method_label"))
    methods = (df.select("method", "positions", "method_label").unique()
               .sort(pl.col("method") == "original", "positions", descending=[True, False])["method_label"].to_list())
    palette = [OKABE_ITO["vermillion"], OKABE_ITO["blue"], OKABE_ITO["sky_blue"], OKABE_ITO["green"]]
    colour = alt.Color("method_label:N", title=None, sort=methods, legend=alt.Legend(orient="top", labelLimit=500,
                                                                                      direction="vertical"),
                       scale=alt.Scale(domain=methods, range=palette[:len(methods)]))
    order = head_set_order(n_heads)
    x = alt.X("head_set_label:N", sort=order, title="head set patched (all, even, odd, then single heads: even, odd)",
              axis=alt.Axis(labelAngle=0))
    bars = alt.Chart().mark_bar().encode(
        x=x, xOffset=alt.XOffset("method_label:N", sort=methods), color=colour,
        y=alt.Y("success_rate:Q", title=f"success rate ({labels.ci})", scale=alt.Scale(domain=[0, 1])),
        tooltip=["layer", "method", "positions", "head_set", alt.Tooltip("success_rate:Q", format=".3f"),
                 alt.Tooltip("success_low:Q", format=".3f"), alt.Tooltip("success_high:Q", format=".3f"),
                 alt.Tooltip("broken_rate:Q", format=".3f"), alt.Tooltip("mean_logit_diff:Q", format=".3f"),
                 "n_eligible", "n_prompts"])
    err = alt.Chart().mark_errorbar(ticks=True, color="black").encode(
        x=x, xOffset=alt.XOffset("method_label:N", sort=methods), y=alt.Y("success_low:Q", title=""),
        y2="success_high:Q")
    layered = alt.layer(bars, err, data=df).properties(width=max(22 * len(order) * len(methods) // 2, 360),
                                                        height=HEIGHT * 2 // 3)
    row = df.row(0, named=True)
    return layered.facet(row=alt.Row("layer:O", title="focus layer")).properties(title=_title(
        f"The seed's head patching vs true per-head patching, same prompts ({labels.model})",
        [_success_title(df),
         f"{row['source_format']} -> {row['target_format']} ({row['direction']}); bars: {labels.ci} "
         "(bootstrap over number pairs)"]))


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
    n_prompts = _n(heads["n_prompts"])
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
    ).properties(title=_title(
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
