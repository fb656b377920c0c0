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

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from bugscope import figures, figures_overlap, layout
from bugscope.features import (
    NAMED_SCHEMA,
    baseline_couples,
    baseline_overlap,
    pair_overlap,
    pooled_overlap,
    summarise_overlap,
)
from bugscope.io import read_table
from bugscope.patch_summary import bug_kind_rows
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
    from bugscope.baseline import accuracy_by_format

    rng = np.random.default_rng(1)
    scores = pl.DataFrame({"format": ["qa"] * 20 + ["simple"] * 20 + ["chat"] * 20,
                           "pair_id": np.tile(np.arange(20) // 2, 3), "logit_diff": rng.normal(size=60),
                           "pair_kind": np.tile(np.where(np.arange(20) < 14, "shorter_bigger", "longer_bigger"), 3),
                           "order": np.tile(["correct_first", "wrong_first"], 30)}).with_columns(
        (pl.col("logit_diff") > 0).alias("is_correct"))
    return accuracy_by_format(scores, n_resamples=200, confidence=0.95, seed=0)


HELDOUT_COLUMNS = ("heldout_mean_a", "heldout_mean_b", "heldout_firing_rate_a", "heldout_firing_rate_b")


def discriminative_table(layer=8) -> pl.DataFrame:
    from bugscope.features import DISCRIMINATIVE_COLUMNS

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
    from bugscope.features import ATTRIBUTION_COLUMNS

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


def patching_summary(layers=(0, 5, 10), focus=(5,), n_heads=9, n_prompts=16, seed=4, method="per_head",
                     positions="decision") -> pl.DataFrame:
    """A patching summary made by bugscope.patching from random per-prompt logit differences: the named
    head sets at every layer, random even/odd subsets of sizes 1 and 2 at the focus layers."""
    from bugscope import patch_summary, patching

    rng = np.random.default_rng(seed)
    sets = {layer: patching.named_head_sets(n_heads) for layer in layers}
    for layer in focus:
        sets[layer] = sets[layer] + patching.subset_head_sets(n_heads, pools=["even", "odd"], sizes=[1, 2], samples=3,
                                                              seed=0, layer=layer)
    rows = [{"layer": layer, "head_set": s.name, "prompt_id": p, "logit_diff": float(rng.normal() + 0.2 * s.k)}
            for layer, ss in sets.items() for s in ss for p in range(n_prompts)]
    per_prompt = (pl.DataFrame(rows).with_columns(pl.col("layer", "prompt_id").cast(pl.Int32))
                  .join(pl.DataFrame({"prompt_id": np.arange(n_prompts, dtype=np.int32),
                                      "pair_id": np.arange(n_prompts, dtype=np.int32) // 2,
                                      "pair_kind": "shorter_bigger",
                                      "order": np.where(np.arange(n_prompts) % 2 == 0, "correct_first", "wrong_first"),
                                      "baseline_logit_diff": rng.normal(size=n_prompts),
                                      "source_logit_diff": rng.normal(1.0, 1.0, size=n_prompts)}), on="prompt_id")
                  .join(patching.head_set_table(sets), on=["layer", "head_set"])
                  .with_columns(pl.lit(method).alias("method"), pl.lit(positions).alias("positions"),
                                pl.lit("patch").alias("operation"), pl.lit("fix").alias("direction"),
                                pl.lit("qa").alias("target_format"), pl.lit("simple").alias("source_format")))
    return patch_summary.summary_table(per_prompt, n_resamples=200, confidence=0.95, seed=0, n_heads=n_heads)


def original_method_table(layer=5) -> pl.DataFrame:
    return pl.concat([patching_summary(layers=(layer,), focus=(), method=m, positions=p, seed=i)
                      for i, (m, p) in enumerate([("original", "original"), ("per_head", "decision"), ("per_head", "aligned")])])


def sae_quality_table(layers=(0, 10, 29)) -> pl.DataFrame:
    """A table with bugscope.sae's QUALITY_SCHEMA."""
    from bugscope.sae_quality import QUALITY_SCHEMA

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
    "baseline_accuracy": {"format_role", "pair_kind", "accuracy", "accuracy_low", "accuracy_high"},
    "feature_overlap": {"layer", "overlap_pct", "overlap_pct_low", "overlap_pct_high", "variant", "set", "features"},
    "amplification": {"layer", "amplification", "amplification_low", "amplification_high", "variant"},
    "format_features": {"mean_buggy", "mean_correct", "direction", "label"},
    "head_attribution": {"head_label", "feature", "direct_attribution", "panel", "layer"},
    "sae_quality": {"layer", "ev", "l0", "tokens", "dead_fraction"},
    "head_sweep": {"layer", "head_set_label", "success_rate"},
    "head_subsets": {"k_jitter", "success_rate", "success_low", "success_high", "pool", "k", "mean_success"},
    "original_method": {"head_set_label", "method_label", "success_rate", "success_low", "success_high", "layer"},
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
    assert figures.head_set_order(9) in [layer["encoding"]["x"].get("sort") for layer in sweep["layer"]]
    eligible = int(bug_kind_rows(patching_summary())["n_eligible"][0])
    assert f"of the {eligible} eligible target prompts (of 16;" in titles(sweep)
    # subsets: the whole pools (k = pool size) and each random subset, at the focus layer only
    subsets = charts["head_subsets"].to_dict()
    data = [r for d in subsets["datasets"].values() for r in d]
    assert {(r["pool"], r["k"]) for r in data if r.get("kind") == "whole pool"} == {("even", 5), ("odd", 4), ("all", 9)}
    assert {r["layer"] for r in data} == {5}
    # original method beside the per-head variants: one colour per (method, positions), same head sets
    seed = charts["original_method"].to_dict()
    labels = {r["method_label"] for d in seed["datasets"].values() for r in d}
    assert len(labels) == 3 and any(label.startswith("original method") for label in labels)


def test_png_scale_and_png_size_rejects_non_png(tmp_path):
    spec_scale = check_saved(tmp_path, "acc", figures.baseline_accuracy(accuracy_table(), LABELS), scale=1.0)
    assert spec_scale
    (tmp_path / "x.png").write_text("not a png")
    with pytest.raises(ValueError):
        png_size(tmp_path / "x.png")


# --- the real ci.yaml workflow --------------------------------------------------------------------


# The nine figures of the study (FIGURES in workflow/rules/common.smk): the ci workflow draws them all.
ALL_FIGURES = ["baseline_accuracy", "feature_overlap", "amplification", "format_features", "sae_quality", "head_sweep",
               "head_subsets", "head_attribution", "original_method"]


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
    for name in ("head_sweep", "head_subsets"):
        assert f"of the {eligible} eligible target prompts (of {n};" in titles(specs[name]), name
    # the heatmap: every analysed layer x (all, even, odd + every head); the subsets: the focus layers
    cells = {(r["layer"], r["head_set_label"]) for d in specs["head_sweep"]["datasets"].values() for r in d}
    assert cells == {(layer, h) for layer in ci_config["layers"] for h in figures.head_set_order(n_heads)}
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
