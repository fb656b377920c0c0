"""Figures: each chart encodes the intended columns (on tables built by the producers' own code and on
the real ci.yaml workflow output), the PNGs are real images of the SVG's size times the scale, the
report builds, and editing one figure's script reruns only that figure's rule."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import altair as alt
import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from bugscope import layout, tables
from bugscope.data.prompts import ALL, BUG_PAIR_KIND, PAIR_KINDS
from bugscope.features.chance import baseline_couples, baseline_overlap
from bugscope.features.named import NAMED_SCHEMA
from bugscope.features.overlap import pair_overlap, pooled_overlap, summarise_overlap
from bugscope.figures import charts as figures
from bugscope.figures import overlap as figures_overlap
from bugscope.io import read_table
from bugscope.patching.summary import bug_kind_rows
from tests.conftest import REPO, run_snakemake
from tests.helpers import png_size

LABELS = figures.Labels("SmolLM2-135M-Instruct", "qa", "simple", 0.95)


# --- tables with the producers' schemas -----------------------------------------------------------


def overlap_table(layers=(0, 3, 5, 8, 10, 13), n_pairs=12, k=5, num_layers=14, seed=0) -> pl.DataFrame:
    """A feature_overlap table made by bugscope.features from random sparse feature values: n_pairs
    questions (n_pairs // 2 number pairs of two orders), with the same-format baselines."""
    rng = np.random.default_rng(seed)
    q = np.arange(n_pairs, dtype=np.int32)
    pairs = pl.DataFrame({"question_id": q, "pair_id": q // 2, "prompt_id_buggy": q * 2, "prompt_id_correct": q * 2 + 1,
                          "order": np.where(q % 2 == 0, "correct_first", "wrong_first")})
    couples = baseline_couples(pairs, "qa", "simple", seed=seed)
    per_pair, pooled, base = [], [], []
    for layer in layers:
        rows = [(p, f, float(rng.exponential())) for p in range(2 * n_pairs)
                for f in rng.choice(3 * k, size=2 * k, replace=False)]
        values = pl.DataFrame(rows, schema={"prompt_id": pl.Int32, "feature_id": pl.Int32, "value": pl.Float64}, orient="row")
        per_pair.append(pair_overlap(values, pairs, k).with_columns(pl.lit(layer).alias("layer")))
        pooled.append({"layer": layer, **pooled_overlap(values, pairs, k)})
        base.append(baseline_overlap(values, couples, k).with_columns(pl.lit(layer).alias("layer")))
    return summarise_overlap(pl.concat(per_pair), pl.DataFrame(pooled), k=k, num_layers=num_layers,
                             middle_fraction=[0.25, 0.75], n_resamples=200, confidence=0.95, seed=seed,
                             baselines=pl.concat(base))


def accuracy_table() -> pl.DataFrame:
    from bugscope.data.baseline import accuracy_by_format

    rng = np.random.default_rng(1)
    scores = pl.DataFrame({"format": ["qa"] * 20 + ["simple"] * 20 + ["chat"] * 20,
                           "pair_id": np.tile(np.arange(20) // 2, 3), "logit_diff": rng.normal(size=60),
                           "pair_kind": np.tile(np.array(PAIR_KINDS)[np.arange(20) // 2 % 3], 3),
                           "order": np.tile(["correct_first", "wrong_first"], 30)}).with_columns(
        (pl.col("logit_diff") > 0).alias("is_correct"))
    return accuracy_by_format(scores, n_resamples=200, confidence=0.95, seed=0)


HELDOUT_COLUMNS = ("heldout_mean_a", "heldout_mean_b", "heldout_firing_rate_a", "heldout_firing_rate_b")


def discriminative_table(layer=8) -> pl.DataFrame:
    from bugscope.features.discriminative import DISCRIMINATIVE_COLUMNS

    rng = np.random.default_rng(2)
    rows = []
    for direction, sign in (("up", 1), ("down", -1)):
        for rank in range(3):
            a, b = rng.uniform(0.5, 3, size=2)
            a, b = (max(a, b), min(a, b)) if sign > 0 else (min(a, b), max(a, b))
            rows.append({"layer": layer, "comparison": "buggy_vs_correct", "direction": direction, "rank": rank,
                         "feature_id": 100 * rank + (1 if sign > 0 else 2), "effect_size": sign * 1.2, "mean_diff": a - b,
                         "mean_a": a, "mean_b": b, "firing_rate_a": 0.8, "firing_rate_b": 0.4, "p_value": 0.001,
                         "q_value": 0.01, "significant": True, "n_a": 12, "n_b": 12, "n_tested": 50,
                         **{c: None for c in HELDOUT_COLUMNS}})
    return pl.DataFrame(rows, schema_overrides={c: pl.Float64 for c in HELDOUT_COLUMNS}).with_columns(
        pl.col("layer", "rank", "feature_id").cast(pl.Int32)).select(DISCRIMINATIVE_COLUMNS)


def named_table(layer=8) -> pl.DataFrame:
    return pl.DataFrame({"layer": [layer], "category": ["format"], "feature_id": [777], "mean_buggy": [2.0],
                         "mean_correct": [1.25], "ratio": [1.6], "ratio_low": [1.3], "ratio_high": [1.9],
                         "firing_rate_buggy": [0.9], "firing_rate_correct": [0.6], "n_pairs": [12]}, schema=NAMED_SCHEMA)


def attribution_table(layer=8, n_heads=9, feature_ids=(5, 17, 99)) -> pl.DataFrame:
    from bugscope.features.attribution import ATTRIBUTION_COLUMNS

    rng = np.random.default_rng(3)
    rows = []
    for fmt in ("qa", "simple"):
        for f in feature_ids:
            for comp, head in [*(("head", h) for h in range(n_heads)), ("resid_pre", None)]:
                rows.append({"layer": layer, "feature_id": f, "feature_source": "buggy_up", "format": fmt, "component": comp,
                             "head": head, "n_prompts": 12, "direct_attribution": float(rng.normal()),
                             "zero_ablation_delta_pre": 0.0, "zero_ablation_delta_act": 0.0,
                             "mean_ablation_delta_pre": 0.0, "mean_ablation_delta_act": 0.0,
                             "pre_activation": 1.0, "activation": 1.0})
    return pl.DataFrame(rows).with_columns(pl.col("layer", "feature_id", "head").cast(pl.Int32),
                                           pl.col("n_prompts").cast(pl.Int32)).select(ATTRIBUTION_COLUMNS)


def patching_summary(layers=(0, 5, 10), focus=(5,), n_heads=9, n_pairs=12, seed=4, method="per_head",
                     positions="decision", ceiling=True) -> pl.DataFrame:
    """A patching summary made by bugscope.patching from random per-prompt logit differences: the named
    head sets (and the ceiling) at every layer, random even/odd subsets of sizes 1 and 2 and the
    random-head control's all-head sets at the focus layers; number pairs of the three kinds, both orders."""
    from bugscope.patching import engine as patching
    from bugscope.patching import summary as patch_summary

    rng = np.random.default_rng(seed)
    sets = {layer: patching.named_head_sets(n_heads) + ([patching.CEILING] if ceiling else []) for layer in layers}
    for layer in focus:
        sets[layer] = sets[layer] + patching.subset_head_sets(n_heads, pools=["even", "odd"], sizes=[1, 2], samples=3,
                                                              seed=0, layer=layer) + patching.random_control_sets(
            n_heads, samples=3, seed=0, layer=layer)
    n_prompts = 2 * n_pairs
    rows = [{"layer": layer, "head_set": s.name, "prompt_id": p,
             "logit_diff": float(rng.normal() + 0.2 * s.k + 2.0 * (s.family == "ceiling"))}
            for layer, ss in sets.items() for s in ss for p in range(n_prompts)]
    pair_id = np.arange(n_prompts, dtype=np.int32) // 2
    per_prompt = (pl.DataFrame(rows).with_columns(pl.col("layer", "prompt_id").cast(pl.Int32))
                  .join(pl.DataFrame({"prompt_id": np.arange(n_prompts, dtype=np.int32), "pair_id": pair_id,
                                      "pair_kind": np.array(PAIR_KINDS)[pair_id % 3],
                                      "order": np.where(np.arange(n_prompts) % 2 == 0, "correct_first", "wrong_first"),
                                      "baseline_logit_diff": rng.normal(size=n_prompts),
                                      "source_logit_diff": rng.normal(1.0, 1.0, size=n_prompts)}), on="prompt_id")
                  .join(patching.head_set_table(sets), on=["layer", "head_set"])
                  .with_columns(pl.lit(method).alias("method"), pl.lit(positions).alias("positions"),
                                pl.lit("patch").alias("operation"), pl.lit("fix").alias("direction"),
                                pl.lit("qa").alias("target_format"), pl.lit("simple").alias("source_format")))
    return patch_summary.summary_table(per_prompt, n_resamples=200, confidence=0.95, seed=0, n_heads=n_heads)


def original_method_table(layer=5) -> pl.DataFrame:
    return pl.concat([patching_summary(layers=(layer,), focus=(), method=m, positions=p, seed=i, ceiling=False)
                      for i, (m, p) in enumerate([("original", "original"), ("per_head", "decision"), ("per_head", "aligned")])])


def sae_quality_table(layers=(0, 10, 29)) -> pl.DataFrame:
    """A table with bugscope.sae's QUALITY_SCHEMA."""
    from bugscope.sae.quality import QUALITY_SCHEMA

    n = len(layers)
    rows = [{"layer": layer, "hook_name": f"blocks.{layer}.hook_resid_post", "source": "train", "d_sae": 576,
             "ev_prompts": 0.9 - 0.01 * layer, "mse_prompts": 0.1, "l0_prompts": 16.0, "n_tokens_prompts": 300,
             "ev_corpus": 0.95 - 0.01 * layer, "mse_corpus": 0.1, "l0_corpus": 15.5, "n_tokens_corpus": 500,
             "dead_fraction": 0.1 * (i + 1) / n, "train_l0": 16.0, "train_dead_fraction": 0.05, "n_prompts": 8,
             "logit_diff_clean": 1.0, "logit_diff_sae": 0.8, "delta_logit_diff": -0.2, "accuracy_clean": 0.5,
             "accuracy_sae": 0.5} for i, layer in enumerate(layers)]
    return pl.from_arrow(pa.Table.from_pylist(rows, schema=QUALITY_SCHEMA))


# --- spec inspection ------------------------------------------------------------------------------


def encoded_fields(spec) -> set[str]:
    """Every `field` an encoding channel of the Vega-Lite spec (any layer, facet or concat) reads."""
    found = set()

    def walk(node):
        if isinstance(node, dict):
            if "encoding" in node:
                for channel in node["encoding"].values():
                    for enc in channel if isinstance(channel, list) else [channel]:
                        if isinstance(enc, dict) and "field" in enc:
                            found.add(enc["field"])
            if "facet" in node and isinstance(node["facet"], dict):
                for enc in node["facet"].values():
                    if isinstance(enc, dict) and "field" in enc:
                        found.add(enc["field"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(spec)
    return found


def titles(spec) -> str:
    text = []

    def walk(node):
        if isinstance(node, dict):
            t = node.get("title")
            if isinstance(t, dict):
                text.extend([str(t.get("text", "")), str(t.get("subtitle", ""))])
            elif isinstance(t, str):
                text.append(t)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(spec)
    return " ".join(text)


# The channels whose fields say which row a mark draws where (a value drawn: quantitative y or colour).
KEY_CHANNELS = ("x", "y", "xOffset", "yOffset", "color", "strokeDash", "shape", "detail")


def _passes(row: dict, predicate: dict) -> bool:
    if "oneOf" in predicate:
        return row.get(predicate["field"]) in predicate["oneOf"]
    if "equal" in predicate:
        return row.get(predicate["field"]) == predicate["equal"]
    raise AssertionError(f"drawn_marks cannot evaluate the filter {predicate}")


def drawn_marks(spec) -> list[tuple[str, tuple[str, ...], list[dict]]]:
    """(mark, key fields, rows drawn) for every mark of a Vega-Lite spec that encodes a field: the rows
    of the data it inherits, through its filter transforms, less those missing a quantitative position
    (which Vega-Lite leaves out). Key fields: the enclosing facets' fields and the fields of its
    KEY_CHANNELS, less quantitative y and colour (the values drawn)."""
    datasets, out = spec.get("datasets", {}), []

    def walk(node, rows, keys):
        if "data" in node:
            rows = datasets[node["data"]["name"]] if "name" in node["data"] else node["data"]["values"]
        for transform in node.get("transform", []):
            assert set(transform) == {"filter"}, f"drawn_marks cannot evaluate the transform {transform}"
            rows = [r for r in rows if _passes(r, transform["filter"])]
        facet = node.get("facet")
        if isinstance(facet, dict):
            keys = keys + tuple(e["field"] for e in ([facet] if "field" in facet else facet.values()))
        if "mark" in node:
            fields = {ch: e for ch, e in node.get("encoding", {}).items() if isinstance(e, dict) and "field" in e}
            if fields:  # a mark of constants only (the chance line) is drawn the same from every row
                key = keys + tuple(e["field"] for ch, e in fields.items() if ch in KEY_CHANNELS
                                   and (ch == "x" or e.get("type") != "quantitative"))
                quantitative = [e["field"] for ch, e in fields.items()
                                if ch in ("x", "y", "x2", "y2") and e.get("type") == "quantitative"]
                mark = node["mark"]["type"] if isinstance(node["mark"], dict) else node["mark"]
                out.append((mark, key, [r for r in rows if all(r.get(f) is not None for f in quantitative)]))
        for part in ("layer", "vconcat", "hconcat", "concat"):
            for child in node.get(part, []):
                walk(child, rows, keys)
        if "spec" in node:
            walk(node["spec"], rows, keys)

    walk(spec, [], ())
    return out


def assert_one_row_per_key(spec, name: str) -> None:
    """Every mark draws at most one row per (x, series, facet): no two pair kinds or orders at one place."""
    for mark, key, rows in drawn_marks(spec):
        counts: dict = {}
        for r in rows:
            counts[tuple(r.get(k) for k in key)] = counts.get(tuple(r.get(k) for k in key), 0) + 1
        twice = [k for k, n in counts.items() if n > 1]
        assert not twice, (name, mark, key, twice[:3])


def drawn_rows(spec, mark: str | None = None) -> list[dict]:
    return [r for m, _, rows in drawn_marks(spec) if mark in (None, m) for r in rows]


def via_parquet(table: tables.Table, data: pl.DataFrame, path: Path, config: dict) -> pl.DataFrame:
    """`data` written with the table's declaration and read back as the figure scripts read it."""
    tables.write(table, data, path, {"config_hash": table.config_hash(config)})
    return tables.frame(table, config, path)


def svg_size(path: Path) -> tuple[float, float]:
    head = path.read_text()[:400]
    return float(re.search(r'width="([\d.]+)"', head).group(1)), float(re.search(r'height="([\d.]+)"', head).group(1))


def check_saved(tmp: Path, name: str, chart, scale: float = 2.0) -> dict:
    outputs = {ext: tmp / f"{name}.{ext}" for ext in figures.FIGURE_EXTS}
    spec = figures.save_chart(chart, outputs, png_scale=scale)
    w, h = svg_size(outputs["svg"])
    assert png_size(outputs["png"]) == (round(w * scale), round(h * scale))
    html = outputs["html"].read_text()
    assert "<script src=" not in html and "vega-embed" in html.lower()  # libraries inlined: works offline
    return spec


# --- figure functions on producer-schema tables ---------------------------------------------------

EXPECTED = {
    "baseline_accuracy": {"format_role", "order_label", "pair_kind", "accuracy", "accuracy_low", "accuracy_high"},
    "feature_overlap": {"layer", "overlap_pct", "overlap_pct_low", "overlap_pct_high", "variant", "set", "features"},
    "amplification": {"layer", "amplification", "amplification_low", "amplification_high", "variant"},
    "format_features": {"mean_buggy", "mean_correct", "direction", "label"},
    "head_attribution": {"head_label", "feature", "direct_attribution", "panel", "layer"},
    "sae_quality": {"layer", "ev", "l0", "tokens", "dead_fraction"},
    "head_sweep": {"layer", "layer_x", "series", "recovery", "recovery_low", "recovery_high", "head_set_label",
                   "success_rate", "pair_kind"},
    "head_subsets": {"k_jitter", "recovery", "recovery_low", "recovery_high", "pool", "k", "kind", "mean_recovery",
                     "layer", "pair_kind"},
    "original_method": {"head_set_label", "method_label", "recovery", "recovery_low", "recovery_high", "layer",
                        "pair_kind"},
}


def test_figures_encode_intended_columns(tmp_path):
    overlap = overlap_table()
    charts = {
        "baseline_accuracy": figures.baseline_accuracy(accuracy_table(), LABELS),
        "feature_overlap": figures_overlap.feature_overlap(overlap, LABELS),
        "amplification": figures_overlap.amplification(overlap, LABELS),
        "format_features": figures.format_features(discriminative_table(), named_table(), LABELS, [8]),
        "head_attribution": figures.head_attribution(attribution_table(), LABELS, [8]),
        "sae_quality": figures.sae_quality(sae_quality_table(), LABELS),
        "head_sweep": figures.head_sweep(patching_summary(), LABELS, 9),
        "head_subsets": figures.head_subsets(patching_summary(), LABELS, [5]),
        "original_method": figures.original_method(original_method_table(), LABELS, 9),
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
    assert figures.head_order(9) == ["h0", "h2", "h4", "h6", "h8", "h1", "h3", "h5", "h7"]
    assert figures.head_order(9) == charts["head_attribution"].to_dict()["spec"]["encoding"]["x"]["sort"]
    # head sets: all, even, odd, then single heads even first; success rates on a fixed 0-1 scale
    sweep = charts["head_sweep"].to_dict()
    assert figures.head_set_order(9) == ["all", "even", "odd", *figures.head_order(9)]
    assert figures.head_set_order(9) in [layer["encoding"]["x"].get("sort") for layer in sweep["vconcat"][1]["spec"]["layer"]]
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
    return {"baseline_accuracy": figures.baseline_accuracy(t["accuracy"], LABELS).to_dict(),
            "head_sweep": figures.head_sweep(t["summary"], LABELS, 9).to_dict(),
            "head_subsets": figures.head_subsets(t["summary"], LABELS, [5]).to_dict(),
            "original_method": figures.original_method(t["comparison"], LABELS, 9).to_dict()}


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
    assert by_family["ceiling"] == {(k, layer, figures.CEILING_LABEL) for k in PAIR_KINDS for layer in (0, 5, 10)}
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
    monkeypatch.setattr(figures, "by_kind", lambda table: table)  # the figures without their row selection
    for name, spec in kind_figures(t).items():
        if name != "baseline_accuracy":
            with pytest.raises(AssertionError):
                assert_one_row_per_key(spec, name)


def test_png_scale_and_png_size_rejects_non_png(tmp_path):
    spec_scale = check_saved(tmp_path, "acc", figures.baseline_accuracy(accuracy_table(), LABELS), scale=1.0)
    assert spec_scale
    (tmp_path / "x.png").write_text("not a png")
    with pytest.raises(ValueError):
        png_size(tmp_path / "x.png")


# --- the real ci.yaml workflow --------------------------------------------------------------------


# The ten figures of the study (FIGURES in workflow/rules/common.smk): the ci workflow draws them all.
ALL_FIGURES = ["baseline_accuracy", "feature_overlap", "amplification", "format_features", "sae_quality", "head_sweep",
               "head_subsets", "head_attribution", "original_method", "original_decomposition"]


def test_ci_workflow_figures(ci_workflow, ci_config):
    names = ALL_FIGURES
    scale = ci_config["figures"]["png_scale"]
    for name in names:
        paths = {ext: ci_workflow / layout.figure(name, ext) for ext in figures.FIGURE_EXTS}
        for ext, path in paths.items():
            assert path.exists() and path.stat().st_size > 1000, (name, ext)
        w, h = svg_size(paths["svg"])
        assert png_size(paths["png"]) == (round(w * scale), round(h * scale)), name
        assert w >= 300 and h >= 200, (name, w, h)
    # the baseline figure, rebuilt from the real table, encodes the intended columns and its n
    acc = pl.from_arrow(read_table(ci_workflow / layout.BASELINE_ACCURACY, kind="baseline_accuracy")[0])
    spec = figures.baseline_accuracy(acc, figures.Labels.from_config(ci_config)).to_dict()
    assert EXPECTED["baseline_accuracy"] <= encoded_fields(spec)
    n = int(acc.filter(pl.col("pair_kind") == "shorter_bigger", pl.col("order") == "all")["n_pairs"][0])
    assert f"number pairs: shorter_bigger {n}," in titles(spec)
    assert ci_config["model"]["name"] in (ci_workflow / layout.figure("baseline_accuracy", "svg")).read_text()
    for name in names[1:]:
        assert ci_config["model"]["name"] in (ci_workflow / layout.figure(name, "svg")).read_text(), name


def test_ci_workflow_sae_and_patching_figures(ci_workflow, ci_config):
    """Figures 5, 6, 7 and 9 rebuilt from the real ci tables encode the intended columns and say their n."""
    from bugscope import tables

    labels = figures.Labels.from_config(ci_config)
    n_heads = ci_config["model"]["num_heads"]
    quality = pl.from_arrow(read_table(ci_workflow / layout.SAE_QUALITY, kind=tables.SAE_QUALITY.kind)[0])
    table, meta = read_table(ci_workflow / layout.PATCHING_SUMMARY, kind=tables.PATCHING_SUMMARY.kind)
    summary = pl.from_arrow(table)
    seed = pl.from_arrow(read_table(ci_workflow / layout.PATCHING_ORIGINAL_METHOD, kind=tables.PATCHING_ORIGINAL_METHOD.kind)[0])
    focus = meta["focus_layers"]
    specs = {
        "sae_quality": figures.sae_quality(quality, labels).to_dict(),
        "head_sweep": figures.head_sweep(summary, labels, n_heads).to_dict(),
        "head_subsets": figures.head_subsets(summary, labels, focus).to_dict(),
        "original_method": figures.original_method(seed, labels, n_heads).to_dict(),
    }
    for name, spec in specs.items():
        assert EXPECTED[name] <= encoded_fields(spec), (name, encoded_fields(spec))
        assert ci_config["model"]["name"] in titles(spec), name
    assert f"held-out corpus ({int(quality['n_tokens_corpus'][0])} tokens)" in str(specs["sae_quality"])  # legend
    pooled = bug_kind_rows(summary)
    eligible, n = int(pooled["n_eligible"][0]), int(pooled["n_prompts"][0])
    for name, spec in specs.items():
        if name != "sae_quality":
            assert_one_row_per_key(spec, name)
    for name in ("head_sweep", "head_subsets"):
        assert f"both question orders pooled: {BUG_PAIR_KIND} {eligible} of {n}" in titles(specs[name]), name
    # the heatmap: every pair kind x analysed layer x (all, even, odd + every head); the subsets: the focus layers
    kinds = sorted(set(summary["pair_kind"]) - {ALL})
    cells = {(r["pair_kind"], r["layer"], r["head_set_label"]) for r in drawn_rows(specs["head_sweep"], "rect")}
    assert cells == {(k, layer, h) for k in kinds for layer in ci_config["layers"] for h in figures.head_set_order(n_heads)}
    # the ceiling at every layer of every kind with eligible targets (a kind with none has no recovery to draw)
    ceiling = {(r["pair_kind"], r["layer"]) for r in drawn_rows(specs["head_sweep"], "line") if r["family"] == "ceiling"}
    has = figures.by_kind(summary).filter(pl.col("family") == "ceiling", pl.col("recovery").is_not_nan())
    assert has.height and ceiling == set(has.select("pair_kind", "layer").iter_rows())
    sub = [r for d in specs["head_subsets"]["datasets"].values() for r in d]
    assert {r["layer"] for r in sub} == set(focus)
    # the config's pools, and "all": the random-head control always draws all-head subsets
    drawn = {r["pool"] for r in sub if r.get("kind") == "random subset"}
    assert drawn == set(ci_config["patching"]["subsets"]["pools"]) | {"all"}
    # original method and per-head on the same prompts: one n for every bar
    seed = bug_kind_rows(seed)
    assert seed["n_prompts"].n_unique() == 1 and seed["n_eligible"].n_unique() == 1
    assert set(seed["method"]) == {"original", "per_head"}


def test_report_builds_offline(ci_workflow, tmp_path):
    wd = tmp_path / "wd"
    shutil.copytree(ci_workflow, wd, symlinks=True)
    run_snakemake(wd, "--report", "report.zip")
    with zipfile.ZipFile(wd / "report.zip") as z:
        names = z.namelist()
        html = z.read([n for n in names if n.endswith("report/report.html")][0]).decode()
        members = {Path(n).name for n in names}
        for name in ALL_FIGURES:
            assert {f"{name}.svg", f"{name}.html"} <= members, name
        assert "claims.html" in members
        # the feature pages (a folder with its index): every page layer's page
        assert "index.html" in members and any(m.startswith("layer_") and m.endswith(".html") for m in members)
        figure_html = [z.read(n).decode() for n in names if n.endswith("baseline_accuracy.html")]
    assert figure_html and all("<script src=" not in h for h in figure_html)
    assert "<script src=\"http" not in html


def test_editing_one_figure_script_reruns_only_that_rule(ci_workflow, tmp_path):
    """On a copy of the repository (mtimes kept) and of the finished ci run: touch one script, dry-run."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for part in ("Snakefile", "workflow", "config", "environment.yml"):
        src = REPO / part
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, repo / part)
    wd = tmp_path / "wd"
    shutil.copytree(ci_workflow, wd, symlinks=True)
    # the ledger file is an input of claims_ledger: keep its path the one the ci run recorded
    ledger = f"claims={{ledger: {REPO / 'config' / 'claims.yaml'}}}"

    def planned() -> dict[str, int]:
        cmd = [sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "-d", str(wd), "--configfile",
               str(repo / "config" / "ci.yaml"), "--cores", "1", "-n", "--quiet", "rules", "--config", ledger]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        jobs = {}
        for line in proc.stdout.splitlines():
            m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
            if m and m.group(1) != "total":
                jobs[m.group(1)] = int(m.group(2))
        return jobs

    assert planned() == {}, "a fresh copy of a finished run must have nothing to do"
    script = repo / "workflow" / "scripts" / "fig_baseline_accuracy.py"
    script.write_text(script.read_text() + "\n# edited\n")
    assert set(planned()) - {"default", "all"} == {"fig_baseline_accuracy"}
