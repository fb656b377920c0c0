"""Figures on made-up tables with the producers' schemas: each chart encodes the intended columns, draws
one row per place and pair kind with the ceiling and the random-head control, and saves PNGs of the
SVG's size times the scale."""

from __future__ import annotations

from pathlib import Path

import altair as alt
import polars as pl
import pytest

from bugscope import tables
from bugscope.data.prompts import ALL, BUG_PAIR_KIND, PAIR_KINDS
from bugscope.figures import overlap as figures_overlap
from bugscope.figures import patching as figures_patching
from bugscope.figures.behaviour import baseline_accuracy
from bugscope.figures.features import format_features, head_attribution, sae_quality
from bugscope.figures.patching import CEILING_LABEL, head_set_order, head_subsets, head_sweep, original_method
from bugscope.figures.style import head_order
from bugscope.patching.summary import bug_kind_rows
from tests.figure_tables import (
    LABELS,
    accuracy_table,
    attribution_table,
    discriminative_table,
    named_table,
    original_method_table,
    overlap_table,
    patching_summary,
    sae_quality_table,
    via_parquet,
)
from tests.helpers import (
    EXPECTED,
    assert_one_row_per_key,
    check_saved,
    drawn_marks,
    drawn_rows,
    encoded_fields,
    png_size,
    titles,
)


def test_figures_encode_intended_columns(tmp_path):
    overlap = overlap_table()
    charts = {
        "baseline_accuracy": baseline_accuracy(accuracy_table(), LABELS),
        "feature_overlap": figures_overlap.feature_overlap(overlap, LABELS),
        "amplification": figures_overlap.amplification(overlap, LABELS),
        "format_features": format_features(discriminative_table(), named_table(), LABELS, [8]),
        "head_attribution": head_attribution(attribution_table(), LABELS, [8]),
        "sae_quality": sae_quality(sae_quality_table(), LABELS),
        "head_sweep": head_sweep(patching_summary(), LABELS, 9),
        "head_subsets": head_subsets(patching_summary(), LABELS, [5]),
        "original_method": original_method(original_method_table(), LABELS, 9),
    }
    for name, chart in charts.items():
        spec = check_saved(tmp_path, name, chart)
        assert EXPECTED[name] <= encoded_fields(spec), (name, encoded_fields(spec))
        assert "SmolLM2-135M-Instruct" in titles(spec), name
    # overlap: the pooled variant is the second line, the mean is drawn with its CI band
    spec = charts["feature_overlap"].to_dict()
    assert "seed's pooled variant" in str(spec) and "mean over prompt pairs" in str(spec)
    # ... beside the two same-format chance levels, drawn as bands (both formats pooled)
    data = [r for d in spec["datasets"].values() for r in d]
    for label in figures_overlap.BASELINE_LABELS.values():
        drawn = [r for r in data if r.get("variant") == label]
        assert sorted({r["layer"] for r in drawn}) == list(overlap.filter(pl.col("variant") == "per_pair")["layer"])
        assert all(r["overlap_pct_low"] <= r["overlap_pct"] <= r["overlap_pct_high"] for r in drawn)
    # amplification: the geometric mean with its null band; the original's mean of ratios labelled as such
    amp = str(charts["amplification"].to_dict())
    assert "geometric mean" in amp and "same null" in amp and "original study's mean of ratios" in amp
    # named features are labelled; heads ordered even first then odd
    assert "f777 (format, 1.6x)" in str(charts["format_features"].to_dict())
    assert head_order(9) == ["h0", "h2", "h4", "h6", "h8", "h1", "h3", "h5", "h7"]
    assert head_order(9) == charts["head_attribution"].to_dict()["spec"]["encoding"]["x"]["sort"]
    # head sets: all, even, odd, then single heads even first; success rates on a fixed 0-1 scale
    sweep = charts["head_sweep"].to_dict()
    assert head_set_order(9) == ["all", "even", "odd", *head_order(9)]
    assert head_set_order(9) in [layer["encoding"]["x"].get("sort") for layer in sweep["vconcat"][1]["spec"]["layer"]]
    eligible = int(bug_kind_rows(patching_summary())["n_eligible"][0])
    assert f"both question orders pooled: {BUG_PAIR_KIND} {eligible} of 8," in titles(sweep)
    # subsets: the whole pools (k = pool size) and each random subset, at the focus layer only
    subsets = charts["head_subsets"].to_dict()
    data = [r for d in subsets["datasets"].values() for r in d]
    assert {(r["pool"], r["k"]) for r in data if r.get("kind") == "whole pool"} == {("even", 5), ("odd", 4), ("all", 9)}
    assert {r["layer"] for r in data} == {5}
    # original method beside the per-head variants: one colour per (method, positions), same head sets
    seed = charts["original_method"].to_dict()
    labels = {r["method_label"] for d in seed["datasets"].values() for r in d}
    assert len(labels) == 3 and any(label.startswith("original method") for label in labels)


# --- one row per (x, series, facet), with the references ------------------------------------------


def figure_inputs(tmp_path: Path, config: dict) -> dict[str, pl.DataFrame]:
    """The made-up tables written with their declarations and read back as the figure scripts read them."""
    return {"summary": via_parquet(tables.PATCHING_SUMMARY, patching_summary(), tmp_path / "heads.parquet", config),
            "comparison": via_parquet(tables.PATCHING_ORIGINAL_METHOD, original_method_table(),
                                      tmp_path / "original.parquet", config),
            "accuracy": via_parquet(tables.BASELINE_ACCURACY, accuracy_table(), tmp_path / "accuracy.parquet", config)}


def kind_figures(t: dict[str, pl.DataFrame]) -> dict[str, dict]:
    return {"baseline_accuracy": baseline_accuracy(t["accuracy"], LABELS).to_dict(),
            "head_sweep": head_sweep(t["summary"], LABELS, 9).to_dict(),
            "head_subsets": head_subsets(t["summary"], LABELS, [5]).to_dict(),
            "original_method": original_method(t["comparison"], LABELS, 9).to_dict()}


def test_figures_draw_one_row_per_place_and_pair_kind(tmp_path, ci_config):
    t = figure_inputs(tmp_path, ci_config)
    specs = kind_figures(t)
    for name, spec in specs.items():
        assert_one_row_per_key(spec, name)
        marks = drawn_marks(spec)
        assert marks and all("pair_kind" in key and rows for _, key, rows in marks), (name, marks)
        rows = drawn_rows(spec)
        assert {r["pair_kind"] for r in rows} == set(PAIR_KINDS), name  # every kind, never the pooled one
    # patching: both orders pooled, and the drawn recovery is the table's row of that kind, layer and head set
    summary = t["summary"]
    for name in ("head_sweep", "head_subsets", "original_method"):
        rows = [r for r in drawn_rows(specs[name]) if r.get("kind") != "subset mean"]  # means: checked below
        assert {r["order"] for r in rows} == {ALL}, name
        table = t["comparison"] if name == "original_method" else summary
        for r in rows[::7]:
            want = table.filter(pl.col("pair_kind") == r["pair_kind"], pl.col("order") == ALL, pl.col("layer") == r["layer"],
                                pl.col("head_set") == r["head_set"], pl.col("method") == r["method"],
                                pl.col("positions") == r["positions"])
            assert want.height == 1 and r["recovery"] == pytest.approx(want["recovery"][0], nan_ok=True), (name, r)
    # baseline: every format x order (and both pooled) x pair kind, with its CI
    bars = drawn_rows(specs["baseline_accuracy"], "bar")
    assert {(r["format"], r["order"], r["pair_kind"]) for r in bars} == {
        (f, o, k) for f in ("chat", "qa", "simple") for o in (ALL, "correct_first", "wrong_first") for k in PAIR_KINDS}
    assert all(r["accuracy_low"] <= r["accuracy"] <= r["accuracy_high"] for r in bars)
    assert "number pairs: shorter_bigger 4, longer_bigger 3, same_length 3;" in titles(specs["baseline_accuracy"])


def test_patching_figures_draw_the_ceiling_and_the_random_head_control(tmp_path, ci_config):
    specs = kind_figures(figure_inputs(tmp_path, ci_config))
    sweep = drawn_rows(specs["head_sweep"], "line")
    by_family = {f: {(r["pair_kind"], r["layer"], r["series"]) for r in sweep if r["family"] == f}
                 for f in ("all", "even", "odd", "ceiling", "random_control")}
    assert by_family["ceiling"] == {(k, layer, CEILING_LABEL) for k in PAIR_KINDS for layer in (0, 5, 10)}
    # the control: as many random heads as the even pool (5) and as the odd pool (4), where the subsets ran
    assert by_family["random_control"] == {(k, 5, f"random {n} heads (control)") for k in PAIR_KINDS for n in (4, 5)}
    assert by_family["even"] == {(k, layer, "even heads") for k in PAIR_KINDS for layer in (0, 5, 10)}
    subsets = drawn_marks(specs["head_subsets"])
    ceiling = [r for m, _, rows in subsets if m == "rule" for r in rows]
    assert {(r["pair_kind"], r["layer"]) for r in ceiling} == {(k, 5) for k in PAIR_KINDS}
    control = [r for m, _, rows in subsets if m == "point" for r in rows if r["kind"] == "random-head control"]
    assert {(r["pair_kind"], r["k"]) for r in control} == {(k, n) for k in PAIR_KINDS for n in (4, 5)}
    # the subsets' mean line is over the random subsets only (the control's draw all-head ones), not the whole pools
    means = [r for m, _, rows in subsets if m == "line" for r in rows]
    assert {(r["pool"], r["k"]) for r in means} == {(p, k) for p in ("even", "odd") for k in (1, 2)} | {
        ("all", 4), ("all", 5)}


def test_one_row_check_catches_mixed_pair_kinds_and_orders(tmp_path, ci_config, monkeypatch):
    """The check fails on figures that draw every pair kind and order at one place."""
    t = figure_inputs(tmp_path, ci_config)
    mixed = alt.Chart(t["summary"].filter(pl.col("family") == "all")).mark_line().encode(x="layer:Q", y="recovery:Q")
    with pytest.raises(AssertionError):
        assert_one_row_per_key(mixed.to_dict(), "mixed")
    monkeypatch.setattr(figures_patching, "by_kind", lambda table: table)  # the figures without their row selection
    for name, spec in kind_figures(t).items():
        if name != "baseline_accuracy":
            with pytest.raises(AssertionError):
                assert_one_row_per_key(spec, name)


def test_png_scale_and_png_size_rejects_non_png(tmp_path):
    spec_scale = check_saved(tmp_path, "acc", baseline_accuracy(accuracy_table(), LABELS), scale=1.0)
    assert spec_scale
    (tmp_path / "x.png").write_text("not a png")
    with pytest.raises(ValueError):
        png_size(tmp_path / "x.png")
