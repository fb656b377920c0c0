"""The planted organism beside the unedited model: baseline accuracy, head patching per layer, the
logit lens and the residual map."""

from __future__ import annotations

import altair as alt
import polars as pl

from bugscope.data.prompts import ALL, BUG_PAIR_KIND
from bugscope.figures.style import HEIGHT, OKABE_ITO, WIDTH, Labels, chart_title, null_nan

MODELS = ("unedited", "planted")
HEAD_SETS = ("all", "even", "odd", "resid_post")


def organism_comparison(accuracy: dict[str, pl.DataFrame], heads: dict[str, pl.DataFrame], labels: Labels,
                        planted_layer: int, positions: dict[str, str], lens: dict[str, pl.DataFrame],
                        residual_map: dict[str, pl.DataFrame]) -> alt.VConcatChart:
    """Top: accuracy per model, format and pair kind (both orders pooled). Middle: recovery of the
    head sets and the whole residual (resid_post) per layer on the bug's pairs, each model at the
    positions its sweep patched. Bottom: the logit lens of the buggy and the correct format per layer,
    and the residual map's best recovery over positions per layer (models whose run made one); CIs
    over number pairs."""
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
    middle = alt.layer(line, band, data=sweep).properties(width=WIDTH // 2, height=HEIGHT // 2).facet(
        column=alt.Column("model:N", title=None)).resolve_scale(x="independent")
    return alt.vconcat(top, middle, _lens_and_map(lens, residual_map, labels)).resolve_scale(
        color="independent").properties(title=chart_title(
            f"The planted bug beside the unedited model ({labels.model})",
            [f"top: baseline accuracy, both question orders pooled; middle: head patching from the correct into the "
             f"buggy format on the bug's pairs ({BUG_PAIR_KIND}), eligible targets; planted at layer {planted_layer}",
             "bottom: the logit lens at the decision position, and the residual map's best recovery over positions, "
             "per layer", f"bars and bands: {labels.ci} (bootstrap over number pairs)"]))


def _lens_and_map(lens: dict[str, pl.DataFrame], residual_map: dict[str, pl.DataFrame], labels: Labels) -> alt.HConcatChart:
    rows = pl.concat([t.filter(pl.col("pair_kind") == BUG_PAIR_KIND, pl.col("order") == ALL,
                               pl.col("format").is_in([labels.buggy_format, labels.correct_format])).with_columns(
        pl.lit(m).alias("model"), labels.format_role()) for m, t in lens.items()], how="diagonal_relaxed")
    rows = null_nan(rows, "lens_logit_diff", "lens_logit_diff_low", "lens_logit_diff_high")
    colour = alt.Color("model:N", sort=list(MODELS), legend=alt.Legend(orient="top"),
                       scale=alt.Scale(domain=list(MODELS), range=[OKABE_ITO["grey"], OKABE_ITO["vermillion"]]))
    x = alt.X("layer:Q", title="layer", axis=alt.Axis(tickMinStep=1))
    dash = alt.StrokeDash("format_role:N", title="format", legend=alt.Legend(orient="top"))
    lens_line = alt.Chart().mark_line(point=True).encode(
        x=x, color=colour, strokeDash=dash, y=alt.Y("lens_logit_diff:Q", title="logit lens: correct - wrong logit"),
        tooltip=["model", "format", "layer", "n_pairs", alt.Tooltip("lens_logit_diff:Q", format=".3f")])
    lens_band = alt.Chart().mark_area(opacity=0.15).encode(
        x=x, color=colour, detail="format_role:N", y=alt.Y("lens_logit_diff_low:Q", title=""),
        y2="lens_logit_diff_high:Q")
    zero = alt.Chart().mark_rule(strokeDash=[4, 4], color=OKABE_ITO["grey"]).encode(y=alt.datum(0))
    left = alt.layer(lens_band, lens_line, zero, data=rows).properties(width=WIDTH // 2, height=HEIGHT // 2,
                                                                     title="logit lens on the bug's pairs")
    if not residual_map:
        return alt.hconcat(left)
    best = []
    for m, t in residual_map.items():
        bug = t.filter(pl.col("pair_kind") == BUG_PAIR_KIND, pl.col("order") == ALL, pl.col("recovery").is_not_null())
        best.append(bug.sort("recovery", descending=True).group_by("layer", maintain_order=True).first()
                    .with_columns(pl.lit(m).alias("model")))
    best = null_nan(pl.concat(best, how="diagonal_relaxed"), "recovery", "recovery_low", "recovery_high")
    points = alt.Chart().mark_line(point=True).encode(
        x=x, color=colour, y=alt.Y("recovery:Q", title=f"best recovery over positions ({labels.ci})"),
        tooltip=["model", "layer", "rank", "n_eligible_pairs", alt.Tooltip("recovery:Q", format=".3f")])
    bars = alt.Chart().mark_rule().encode(x=x, color=colour, y=alt.Y("recovery_low:Q", title=""), y2="recovery_high:Q")
    right = alt.layer(points, bars, data=best).properties(width=WIDTH // 2, height=HEIGHT // 2,
                                                         title="residual map: the whole residual patched at one position")
    return alt.hconcat(left, right).resolve_scale(color="shared")
