"""The planted organism beside the unedited model: baseline accuracy and head patching per layer."""

from __future__ import annotations

import altair as alt
import polars as pl

from bugscope.data.prompts import ALL, BUG_PAIR_KIND
from bugscope.figures.style import HEIGHT, OKABE_ITO, WIDTH, Labels, chart_title, null_nan

MODELS = ("unedited", "planted")
HEAD_SETS = ("all", "even", "odd", "resid_post")


def organism_comparison(accuracy: dict[str, pl.DataFrame], heads: dict[str, pl.DataFrame], labels: Labels,
                        planted_layer: int, positions: dict[str, str]) -> alt.VConcatChart:
    """Top: accuracy per model, format and pair kind (both orders pooled). Bottom: recovery of the
    head sets and the whole residual (resid_post) per layer on the bug's pairs, each model at the
    positions its sweep patched; CIs over number pairs."""
    acc = pl.concat([a.filter(pl.col("order") == ALL, pl.col("pair_kind") != ALL).with_columns(pl.lit(m).alias("model"))
                     for m, a in accuracy.items()], how="diagonal_relaxed")
    acc = null_nan(acc, "accuracy", "accuracy_low", "accuracy_high")
    colour = alt.Color("model:N", sort=list(MODELS), legend=alt.Legend(orient="top"),
                       scale=alt.Scale(domain=list(MODELS), range=[OKABE_ITO["grey"], OKABE_ITO["vermillion"]]))
    x = alt.X("format:N", title="prompt format", axis=alt.Axis(labelAngle=0))
    bars = alt.Chart().mark_bar(opacity=0.8).encode(
        x=x, xOffset=alt.XOffset("model:N", sort=list(MODELS)), color=colour,
        y=alt.Y("accuracy:Q", title=f"accuracy ({labels.ci})", scale=alt.Scale(domain=[0, 1])),
        tooltip=["model", "format", "pair_kind", "n_pairs", alt.Tooltip("accuracy:Q", format=".3f")])
    err = alt.Chart().mark_errorbar(ticks=True, color="black").encode(
        x=x, xOffset=alt.XOffset("model:N", sort=list(MODELS)), y=alt.Y("accuracy_low:Q", title=""),
        y2="accuracy_high:Q")
    top = alt.layer(bars, err, data=acc).properties(width=WIDTH // 3, height=HEIGHT // 2).facet(
        column=alt.Column("pair_kind:N", title="pair kind"))
    rows = []
    for m, h in heads.items():
        rows.append(h.filter(pl.col("pair_kind") == BUG_PAIR_KIND, pl.col("order") == ALL,
                             pl.col("positions") == positions[m], pl.col("head_set").is_in(HEAD_SETS))
                    .with_columns(pl.lit(f"{m} ({positions[m]} positions)").alias("model")))
    sweep = null_nan(pl.concat(rows, how="diagonal_relaxed"), "recovery", "recovery_low", "recovery_high")
    layers = sorted(set(sweep["layer"].to_list()))
    line = alt.Chart().mark_line(point=True).encode(
        x=alt.X("layer:O", title="layer", sort=layers), y=alt.Y("recovery:Q", title=f"recovery ({labels.ci})"),
        color=alt.Color("head_set:N", sort=list(HEAD_SETS), legend=alt.Legend(orient="top", title="patched")),
        tooltip=["model", "layer", "head_set", "n_eligible_pairs", alt.Tooltip("recovery:Q", format=".3f"),
                 alt.Tooltip("success_rate:Q", format=".3f")])
    band = alt.Chart().mark_rule().encode(
        x=alt.X("layer:O", sort=layers), y=alt.Y("recovery_low:Q", title=""), y2="recovery_high:Q",
        color=alt.Color("head_set:N", sort=list(HEAD_SETS)))
    bottom = alt.layer(line, band, data=sweep).properties(width=WIDTH // 2, height=HEIGHT // 2).facet(
        column=alt.Column("model:N", title=None)).resolve_scale(x="independent")
    return alt.vconcat(top, bottom).resolve_scale(color="independent").properties(title=chart_title(
        f"The planted bug beside the unedited model ({labels.model})",
        [f"top: baseline accuracy, both question orders pooled; bottom: head patching from the correct into the "
         f"buggy format on the bug's pairs ({BUG_PAIR_KIND}), eligible targets; planted at layer {planted_layer}",
         f"bars: {labels.ci} (bootstrap over number pairs)"]))
