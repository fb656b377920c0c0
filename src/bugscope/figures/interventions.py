"""The SAE-feature interventions figure (bugscope.interventions), in the style of bugscope.figures.style."""

from __future__ import annotations

import altair as alt
import polars as pl

from bugscope.data.prompts import ALL, BUG_PAIR_KIND, CONTROLS
from bugscope.figures.style import HEIGHT, OKABE_ITO, WIDTH, Labels, chart_title, n_label, null_nan

FAMILY_COLOURS = {"tested": OKABE_ITO["blue"], "random_control": OKABE_ITO["grey"], "none": OKABE_ITO["black"]}
RATES = ("success_rate", "success_low", "success_high", "broken_rate", "broken_low", "broken_high", "accuracy",
         "accuracy_low", "accuracy_high", "recovery", "recovery_low", "recovery_high")


def _rows(summary: pl.DataFrame, pairs: str) -> pl.DataFrame:
    """Both orders pooled on `pairs`, the identity shown in every feature set's panel, with a condition label."""
    df = null_nan(summary.filter(pl.col("order") == ALL, pl.col("pairs") == pairs), *RATES)
    df = df.with_columns(
        pl.when(pl.col("intervention") == "steer").then(pl.format("steer x{}", pl.col("scale").round(2)))
        .otherwise(pl.col("intervention")).alias("condition"),
        pl.when(pl.col("family") == "random_control").then(pl.format("random (matched firing rate), sample {}", "sample"))
        .when(pl.col("family") == "none").then(pl.lit("no intervention"))
        .otherwise(pl.lit("tested features")).alias("series"))
    none = df.filter(pl.col("family") == "none")
    # Row order kept throughout: the chart's data, and so its HTML, must be the same bytes on a rerun.
    sets = df.filter(pl.col("family") != "none").select("sae_set", "layer", "feature_set").unique(maintain_order=True)
    return pl.concat([df.filter(pl.col("family") != "none"),
                      none.drop("feature_set").join(sets, on=["sae_set", "layer"], maintain_order="left_right")
                      .select(df.columns)])


def interventions(summary: pl.DataFrame, labels: Labels, pairs: str = "all") -> alt.VConcatChart:
    """Top: success rate (eligible bug-kind targets made right) per condition with its CI, tested
    features beside their random controls, one row per layer and one column per feature set;
    bottom: the broken rate on the control pairs (pair kinds other than the bug's)."""
    df = _rows(summary, pairs)
    primary = df["sae_set"].unique().sort().to_list()
    conditions = (df.select("condition", "intervention", "scale").unique()
                  .sort(pl.col("intervention").replace_strict({"none": 0, "ablate": 1, "clamp": 2, "steer": 3},
                                                              default=4), "scale", nulls_last=False)["condition"]
                  .to_list())
    series = df["series"].unique().sort().to_list()
    colour = alt.Color("series:N", title=None, legend=alt.Legend(orient="top", labelLimit=400),
                       scale=alt.Scale(domain=series, range=[
                           FAMILY_COLOURS["none"] if s == "no intervention" else FAMILY_COLOURS["tested"]
                           if s == "tested features" else FAMILY_COLOURS["random_control"] for s in series]))
    tooltip = ["sae_set", "layer", "feature_set", "series", "condition", "n_features", "n_eligible", "n_prompts",
               *(alt.Tooltip(f"{c}:Q", format=".3f") for c in RATES if not c.endswith(("_low", "_high")))]

    def panel(data: pl.DataFrame, metric: str, title: str) -> alt.FacetChart:
        x = alt.X("condition:N", sort=conditions, title="intervention", axis=alt.Axis(labelAngle=-30))
        off = alt.XOffset("series:N", sort=series)
        pts = alt.Chart().mark_point(filled=True, size=50).encode(
            x=x, xOffset=off, y=alt.Y(f"{metric}:Q", title=f"{title} ({labels.ci})", scale=alt.Scale(domain=[0, 1])),
            color=colour, tooltip=tooltip)
        err = alt.Chart().mark_errorbar(ticks=True).encode(
            x=x, xOffset=off, y=alt.Y(f"{metric.replace('_rate', '')}_low:Q", title=""),
            y2=f"{metric.replace('_rate', '')}_high:Q", color=colour)
        return alt.layer(err, pts, data=data).properties(width=WIDTH // 2, height=HEIGHT // 2 + 20).facet(
            row=alt.Row("layer:O", title="layer"), column=alt.Column("feature_set:N", title="feature set"))

    bug = df.filter(pl.col("pair_kind") == BUG_PAIR_KIND)
    ctrl = df.filter(pl.col("pair_kind") == CONTROLS)
    charts = [panel(bug, "success_rate", "success rate")]
    if ctrl.height:
        charts.append(panel(ctrl, "broken_rate", "broken rate on control pairs"))
    base = bug.filter(pl.col("family") == "none")
    acc = ", ".join(f"layer {r['layer']}: {r['baseline_accuracy']:.2f}" for r in base.unique("layer").sort("layer")
                    .iter_rows(named=True))
    return alt.vconcat(*charts).properties(title=chart_title(
        f"SAE-feature interventions at the {labels.buggy_format} prompts ({labels.model}; SAE set {', '.join(primary)})",
        [f"SAE spliced in with its error term kept; eligible targets ({labels.buggy_format} wrong, same question in "
         f"{labels.correct_format} right): {n_label(bug['n_eligible'])} of {n_label(bug['n_prompts'])} {BUG_PAIR_KIND} prompts "
         f"({pairs} pairs, both orders pooled); baseline accuracy {acc}",
         "ablate: buggy-format-up features set to 0; clamp: the set's features set to their correct-format values; "
         "steer xs: correct-format-up features + s x their mean correct-format activation",
         f"grey: random features matched on firing rate; {labels.ci} by bootstrap over number pairs; bottom: "
         "control pairs (9.81 vs 9.7, 9.8 vs 9.7) made wrong"]))
