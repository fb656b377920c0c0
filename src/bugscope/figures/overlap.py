"""Figures 2 and 3: the top-k feature overlap between the formats and the amplification of the
shared features, per layer, each beside its same-format chance level (bugscope.features.chance).

They use the palette, sizes, `Labels` and title helpers of bugscope.figures.style, whose `save_chart`
saves them like every other figure.
"""

from __future__ import annotations

import altair as alt
import polars as pl

from bugscope.figures.style import BUGGY_COLOUR, CORRECT_COLOUR, HEIGHT, OKABE_ITO, WIDTH, Labels, chart_title, n_label

BASELINE_LABELS = {"same_format_different_question": "same format, different question (chance level)",
                   "same_format_swapped_order": "same format, question orders swapped"}


def _baselines(overlap: pl.DataFrame, stat: str, labels: Labels) -> pl.DataFrame:
    """The both-formats baseline rows as (layer, stat, stat_low, stat_high, variant) lines with bands."""
    rows = overlap.filter(pl.col("variant").is_in(list(BASELINE_LABELS)), pl.col("format") == "both")
    return rows.sort("layer").select("layer", stat, f"{stat}_low", f"{stat}_high",
                                     pl.col("variant").replace_strict(BASELINE_LABELS))


def feature_overlap(overlap: pl.DataFrame, labels: Labels) -> alt.VConcatChart:
    """Top-k overlap % per layer (per-pair mean with CI band, pooled line, same-format baselines
    as reference bands) over stacked set sizes."""
    per_pair = overlap.filter(pl.col("variant") == "per_pair").sort("layer")
    pooled = overlap.filter(pl.col("variant") == "pooled").sort("layer")
    k = int(overlap["k"][0])
    n_pairs = n_label(per_pair["n_pairs"])
    mean_label = f"{labels.buggy_format} vs {labels.correct_format}: mean over prompt pairs ({labels.ci})"
    pooled_label = "seed's pooled variant (top-k of format means)"
    cols = ["layer", "overlap_pct", "overlap_pct_low", "overlap_pct_high", "variant"]
    bands = pl.concat([per_pair.with_columns(pl.lit(mean_label).alias("variant")).select(cols),
                       _baselines(overlap, "overlap_pct", labels)])
    lines = pl.concat([bands, pooled.select("layer", "overlap_pct", pl.lit(None, pl.Float64).alias("overlap_pct_low"),
                                            pl.lit(None, pl.Float64).alias("overlap_pct_high"),
                                            pl.lit(pooled_label).alias("variant"))])
    domain = [mean_label, pooled_label, *BASELINE_LABELS.values()]
    scale = alt.Scale(domain=domain, range=[OKABE_ITO["blue"], OKABE_ITO["orange"], OKABE_ITO["grey"],
                                            OKABE_ITO["green"]])
    colour = alt.Color("variant:N", title=None, legend=alt.Legend(orient="top", labelLimit=400, columns=2), scale=scale)
    x = alt.X("layer:Q", title="layer", axis=alt.Axis(tickMinStep=1, format="d"))
    band = alt.Chart(bands).mark_area(opacity=0.2).encode(
        x=x, y=alt.Y("overlap_pct_low:Q"), y2="overlap_pct_high:Q", color=alt.Color("variant:N", scale=scale))
    line = alt.Chart(lines).mark_line(point=True).encode(
        x=x, y=alt.Y("overlap_pct:Q", title=f"top-{k} overlap (% of {k})", scale=alt.Scale(domain=[0, 100])),
        color=colour, strokeDash=alt.StrokeDash("variant:N", legend=None),
        tooltip=["layer", "variant", alt.Tooltip("overlap_pct:Q", format=".1f"),
                 alt.Tooltip("overlap_pct_low:Q", format=".1f"), alt.Tooltip("overlap_pct_high:Q", format=".1f")])
    marks = per_pair.filter(pl.col("is_min_overlap") | pl.col("is_max_overlap_middle")).with_columns(
        pl.when(pl.col("is_min_overlap")).then(pl.lit("min")).otherwise(pl.lit("middle max")).alias("mark"))
    mark_text = alt.Chart(marks).mark_text(dy=-12, fontWeight="bold").encode(x=x, y="overlap_pct:Q", text="mark:N")
    top = alt.layer(band, line, mark_text).properties(
        width=WIDTH, height=HEIGHT,
        title=chart_title(f"Top-{k} SAE feature overlap between {labels.buggy_format} and {labels.correct_format} "
                     f"prompts, per layer ({labels.model})",
                     [f"{n_pairs} prompt pairs; bands: {labels.ci} (bootstrap over number pairs)",
                      "reference bands: two prompts of one format (both formats pooled); a format effect is the "
                      "distance below the chance level"]))
    sets = ["shared", "buggy_only", "correct_only"]
    set_names = {"shared": "shared", "buggy_only": f"{labels.buggy_format} only",
                 "correct_only": f"{labels.correct_format} only"}
    stacked = (per_pair.select("layer", *sets)
               .unpivot(index="layer", on=sets, variable_name="set", value_name="features")
               .with_columns(pl.col("set").replace_strict(set_names).alias("set"),
                             pl.col("set").replace_strict({s: i for i, s in enumerate(sets)}).alias("order")))
    bars = alt.Chart(stacked).mark_bar().encode(
        x=alt.X("layer:O", title="layer"),
        y=alt.Y("features:Q", title=f"features (mean per pair, of {k} + {k})", stack="zero"),
        color=alt.Color("set:N", title=f"top-{k} set", sort=[set_names[s] for s in sets],
                        scale=alt.Scale(domain=[set_names[s] for s in sets],
                                        range=[OKABE_ITO["green"], BUGGY_COLOUR, CORRECT_COLOUR])),
        order="order:Q",
        tooltip=["layer", "set", alt.Tooltip("features:Q", format=".2f")],
    ).properties(width=WIDTH, height=HEIGHT * 2 // 3,
                 title=chart_title("Shared and format-specific features of each pair's two top-k sets",
                              f"mean over {n_pairs} prompt pairs"))
    return alt.vconcat(top, bars).resolve_scale(color="independent")


def amplification(overlap: pl.DataFrame, labels: Labels) -> alt.LayerChart:
    """Geometric-mean amplification (buggy / correct over shared features) per layer with CIs, its
    value under the same-format null as a band, and the seed's mean of ratios (per pair, pooled)."""
    per_pair = overlap.filter(pl.col("variant") == "per_pair").sort("layer")
    pooled = overlap.filter(pl.col("variant") == "pooled").sort("layer")
    geo_label = f"geometric mean over shared features and pairs ({labels.ci})"
    null_label = "same null: two questions of one format (chance level)"
    orig_label, pooled_label = "original study's mean of ratios (per pair)", "original study's pooled variant"
    g, o = "amplification_geomean", "amplification_original_mean_of_ratios"
    null = _baselines(overlap, g, labels).filter(pl.col("variant") == BASELINE_LABELS["same_format_different_question"])
    colour = alt.Color("variant:N", title=None, legend=alt.Legend(orient="top", columns=2, labelLimit=400),
                       scale=alt.Scale(domain=[geo_label, null_label, orig_label, pooled_label],
                                       range=[OKABE_ITO["blue"], OKABE_ITO["grey"], OKABE_ITO["purple"],
                                              OKABE_ITO["orange"]]))
    x = alt.X("layer:Q", title="layer", axis=alt.Axis(tickMinStep=1, format="d"))
    df = pl.concat([
        per_pair.select("layer", pl.col(g).alias("amplification"), pl.col(f"{g}_low").alias("amplification_low"),
                        pl.col(f"{g}_high").alias("amplification_high"), "n_pairs_amplification",
                        pl.lit(geo_label).alias("variant")),
        null.select("layer", pl.col(g).alias("amplification"), pl.col(f"{g}_low").alias("amplification_low"),
                    pl.col(f"{g}_high").alias("amplification_high"), pl.lit(null_label).alias("variant")),
        *(t.select("layer", pl.col(o).alias("amplification"), pl.lit(label).alias("variant"))
          for t, label in ((per_pair, orig_label), (pooled, pooled_label))),
    ], how="diagonal_relaxed")
    band = alt.Chart(df.filter(pl.col("variant") == null_label)).mark_area(opacity=0.2, color=OKABE_ITO["grey"]).encode(
        x=x, y=alt.Y("amplification_low:Q", title=""), y2="amplification_high:Q")
    err = alt.Chart(df.filter(pl.col("variant") == geo_label)).mark_errorbar(ticks=True, color=OKABE_ITO["blue"]).encode(
        x=x, y=alt.Y("amplification_low:Q", title=""), y2="amplification_high:Q")
    pts = alt.Chart(df).mark_line(point=True).encode(
        x=x, y=alt.Y("amplification:Q", title=f"amplification ({labels.buggy_format} / {labels.correct_format} "
                     "activation of shared features)", scale=alt.Scale(zero=False, type="log")),
        color=colour, strokeDash=alt.StrokeDash("variant:N", legend=None),
        tooltip=["layer", "variant", alt.Tooltip("amplification:Q", format=".3f"),
                 alt.Tooltip("amplification_low:Q", format=".3f"), alt.Tooltip("amplification_high:Q", format=".3f"),
                 "n_pairs_amplification"])
    one = alt.Chart(pl.DataFrame({"y": [1.0]})).mark_rule(strokeDash=[4, 4], color=OKABE_ITO["grey"]).encode(y="y:Q")
    return alt.layer(band, one, err, pts).properties(
        width=WIDTH, height=HEIGHT,
        title=chart_title(f"Amplification of shared top-k features per layer ({labels.model})",
                     [f"pairs with at least one shared feature: {n_label(per_pair['n_pairs_amplification'])} of "
                      f"{n_label(per_pair['n_pairs'])}; bars and band: {labels.ci} (bootstrap over number pairs)",
                      "dashed: no amplification (1); the original study's mean of ratios is biased above 1"]))
