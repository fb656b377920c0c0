"""Figures of the real ci.yaml workflow: every figure is drawn with its n and the model's name, the
figures rebuilt from the real tables encode the intended columns, the report builds offline, and
editing one figure's script reruns only that figure's rule."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import polars as pl

from bugscope import layout, tables
from bugscope.data.prompts import ALL, BUG_PAIR_KIND
from bugscope.figures.behaviour import baseline_accuracy
from bugscope.figures.features import sae_quality
from bugscope.figures.patching import head_set_order, head_subsets, head_sweep, original_method
from bugscope.figures.style import FIGURE_EXTS, Labels, by_kind
from bugscope.io import read_table
from bugscope.patching.summary import bug_kind_rows
from tests.conftest import REPO, run_snakemake
from tests.helpers import (
    EXPECTED,
    assert_one_row_per_key,
    drawn_rows,
    encoded_fields,
    png_size,
    svg_size,
    titles,
)

# The ten figures of the study (FIGURES in workflow/rules/common.smk): the ci workflow draws them all.
ALL_FIGURES = ["baseline_accuracy", "lens", "probes", "feature_overlap", "amplification", "format_features", "sae_quality", "head_sweep",
               "head_subsets", "head_attribution", "original_method", "original_decomposition"]


def test_ci_workflow_figures(ci_workflow, ci_config):
    names = ALL_FIGURES
    scale = ci_config["figures"]["png_scale"]
    for name in names:
        paths = {ext: ci_workflow / layout.figure(name, ext) for ext in FIGURE_EXTS}
        for ext, path in paths.items():
            assert path.exists() and path.stat().st_size > 1000, (name, ext)
        w, h = svg_size(paths["svg"])
        assert png_size(paths["png"]) == (round(w * scale), round(h * scale)), name
        assert w >= 300 and h >= 200, (name, w, h)
    # the baseline figure, rebuilt from the real table, encodes the intended columns and its n
    acc = pl.from_arrow(read_table(ci_workflow / layout.BASELINE_ACCURACY, kind="baseline_accuracy")[0])
    spec = baseline_accuracy(acc, Labels.from_config(ci_config)).to_dict()
    assert EXPECTED["baseline_accuracy"] <= encoded_fields(spec)
    n = int(acc.filter(pl.col("pair_kind") == "shorter_bigger", pl.col("order") == "all")["n_pairs"][0])
    assert f"number pairs: shorter_bigger {n}," in titles(spec)
    assert ci_config["model"]["name"] in (ci_workflow / layout.figure("baseline_accuracy", "svg")).read_text()
    for name in names[1:]:
        assert ci_config["model"]["name"] in (ci_workflow / layout.figure(name, "svg")).read_text(), name


def test_ci_workflow_sae_and_patching_figures(ci_workflow, ci_config):
    """Figures 5, 6, 7 and 9 rebuilt from the real ci tables encode the intended columns and say their n."""

    labels = Labels.from_config(ci_config)
    n_heads = ci_config["model"]["num_heads"]
    quality = pl.from_arrow(read_table(ci_workflow / layout.SAE_QUALITY, kind=tables.SAE_QUALITY.kind)[0])
    table, meta = read_table(ci_workflow / layout.PATCHING_SUMMARY, kind=tables.PATCHING_SUMMARY.kind)
    summary = pl.from_arrow(table)
    seed = pl.from_arrow(read_table(ci_workflow / layout.PATCHING_ORIGINAL_METHOD, kind=tables.PATCHING_ORIGINAL_METHOD.kind)[0])
    focus = meta["focus_layers"]
    specs = {
        "sae_quality": sae_quality(quality, labels).to_dict(),
        "head_sweep": head_sweep(summary, labels, n_heads).to_dict(),
        "head_subsets": head_subsets(summary, labels, focus).to_dict(),
        "original_method": original_method(seed, labels, n_heads).to_dict(),
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
    assert cells == {(k, layer, h) for k in kinds for layer in ci_config["layers"] for h in head_set_order(n_heads)}
    # the ceiling at every layer of every kind with eligible targets (a kind with none has no recovery to draw)
    ceiling = {(r["pair_kind"], r["layer"]) for r in drawn_rows(specs["head_sweep"], "line") if r["family"] == "ceiling"}
    has = by_kind(summary).filter(pl.col("family") == "ceiling", pl.col("recovery").is_not_nan())
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
    # the planted organism's study draws the same figure with the same script
    assert set(planned()) - {"default", "all"} == {"fig_baseline_accuracy", "organism_fig_baseline_accuracy"}
