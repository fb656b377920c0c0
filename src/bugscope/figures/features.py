"""Figures of the SAEs and their features: the format-sensitive features (bugscope.features.discriminative
and named, figure 4), the SAE quality per layer (bugscope.sae.quality, figure 5) and the direct
attribution of attention heads to features (bugscope.features.attribution, figure 8). The overlap and
amplification figures: bugscope.figures.overlap."""

from __future__ import annotations

from typing import Sequence

import altair as alt
import polars as pl

from bugscope.figures.style import (
    BUGGY_COLOUR,
    CORRECT_COLOUR,
    DIVERGING,
    HEIGHT,
    OKABE_ITO,
    WIDTH,
    Labels,
    chart_title,
    head_order,
    n_label,
)

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

