"""The real workflow through the Snakemake CLI: the ci.yaml run, lint, the 8B and Gemma dry runs, no-op reruns."""

import re
import subprocess
import sys

import polars as pl

from bugscope import layout
from bugscope.config import analysed_layers, load_config
from bugscope.io import read_table
from bugscope.model.sites import hook_name
from tests.conftest import REPO, run_snakemake


def test_ci_workflow_produces_baseline_and_cache(ci_workflow, ci_config):
    accuracy, meta = read_table(ci_workflow / layout.BASELINE_ACCURACY, kind="baseline_accuracy")
    acc = pl.from_arrow(accuracy)
    assert set(acc["format"]) == {"qa", "simple"}
    assert (acc["accuracy_low"] <= acc["accuracy"]).all() and (acc["accuracy"] <= acc["accuracy_high"]).all()
    assert meta["model"] == "SmolLM2-135M-Instruct"
    prompts = pl.from_arrow(read_table(ci_workflow / layout.PROMPTS, kind="prompts")[0])
    n_rows = sum(len({*r["aligned_positions"], r["prompt_last_pos"]}) for r in prompts.iter_rows(named=True))
    for layer in analysed_layers(ci_config):
        table, meta = read_table(ci_workflow / layout.activations("prompts", hook_name(layer)), kind="activations")
        assert table.num_rows == n_rows and meta["layer"] == layer


def test_rerun_with_nothing_changed_does_no_work(ci_workflow):
    proc = run_snakemake(ci_workflow, "-n")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_lint_is_clean():
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--lint", "--cores", "1"], cwd=REPO,
                          capture_output=True, text=True)
    assert "Congratulations" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def _set_outputs(out: str, sae_set: str) -> dict[str, set[int]]:
    """{stage: layers} of the per-layer outputs of one SAE set named in a dry run's job list."""
    found: dict[str, set[int]] = {}
    for stage, layer in re.findall(rf"results/sae/{sae_set}/(?:(features|quality)/)?blocks\.(\d+)\.hook_", out):
        found.setdefault(stage or "sae", set()).add(int(layer))
    return found


def test_llama_8b_config_dry_runs_without_weights(tmp_path):
    proc = run_snakemake(tmp_path, "-n", configfile=REPO / "config" / "llama31_8b.yaml")
    out = proc.stdout + proc.stderr
    cfg = load_config(REPO / "config" / "llama31_8b.yaml")
    assert "prepare_model" in out and "cache_residuals" in out
    assert len(analysed_layers(cfg)) == 32
    # The andyrdt Instruct set covers 7 layers: its SAE, feature and quality jobs run on those alone,
    # in groups of its own layers; the Llama Scope sets cover all 32.
    instruct = [3, 7, 11, 15, 19, 23, 27]
    assert _set_outputs(out, "instruct") == {stage: set(instruct) for stage in ("sae", "features", "quality")}
    assert _set_outputs(out, "residual") == {stage: set(range(32)) for stage in ("sae", "features", "quality")}
    assert "load_pretrained_sae_instruct_L03_15" in out and "load_pretrained_sae_instruct_L19_27" in out
    assert "results/features/instruct/head_feature_attribution.parquet" in out


def test_gemma2_2b_config_dry_runs_without_weights(tmp_path):
    """config/gemma2_2b.yaml: Gemma-2-2B-it with Gemma Scope's canonical 16k residual SAEs at all 26
    layers; the release and every id are checked against SAE-Lens's directory while it parses."""
    proc = run_snakemake(tmp_path, "-n", configfile=REPO / "config" / "gemma2_2b.yaml", seed_model=False)
    out = proc.stdout + proc.stderr
    cfg = load_config(REPO / "config" / "gemma2_2b.yaml")
    assert (cfg["model"]["checkpoint"], cfg["model"]["num_layers"], cfg["model"]["num_heads"]) == (
        "google/gemma-2-2b-it", 26, 8)
    assert "prepare_model" in out and "cache_residuals" in out and "claims_ledger" in out
    assert _set_outputs(out, "residual") == {stage: set(range(26)) for stage in ("sae", "features", "quality")}
    assert "load_pretrained_sae_residual_L24_25" in out


def test_bad_config_fails_before_any_job(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "config" / "ci.yaml").read_text().replace("layers: [0, 10, 29]", "layers: [0, 10, 31]"))
    proc = run_snakemake(tmp_path, configfile=bad, check=False)
    assert proc.returncode != 0
    assert "layers [31] are out of range" in proc.stdout + proc.stderr
    assert not (tmp_path / "results" / "prompts").exists()


def test_credentials_never_reach_an_output(ci_workflow):
    """HF_TOKEN was set for the whole CI run: no table, log, figure or metadata may contain it."""
    from tests.conftest import CANARY_TOKEN

    needle = CANARY_TOKEN.encode()
    checked = 0
    for path in ci_workflow.rglob("*"):
        if path.is_file() and "checkpoint" not in path.parts:
            assert needle not in path.read_bytes(), f"{path} contains the HF_TOKEN value"
            checked += 1
    assert checked > 10


def test_reader_refuses_a_table_made_under_other_settings(ci_workflow, tmp_path):
    """Change a baseline setting but keep Snakemake from rerunning the baseline (--rerun-triggers
    mtime): the figure that reads the baseline table must refuse it and say how to remake it."""
    import shutil

    wd = tmp_path / "wd"
    shutil.copytree(ci_workflow, wd, symlinks=True)
    figure = wd / layout.figure("baseline_accuracy", "svg")
    for ext in ("svg", "png", "html"):
        (wd / layout.figure("baseline_accuracy", ext)).unlink()
    changed = tmp_path / "changed.yaml"
    ci_yaml = (REPO / "config" / "ci.yaml").read_text()
    assert "  max_new_tokens: 6\n" in ci_yaml
    changed.write_text(ci_yaml.replace("  max_new_tokens: 6\n", "  max_new_tokens: 5\n"))
    log_path = wd / "logs" / "figures" / "baseline_accuracy.log"
    log_path.unlink()  # the copied run's log
    proc = run_snakemake(wd, layout.figure("baseline_accuracy", "svg"), "--rerun-triggers", "mtime",
                         configfile=changed, check=False)
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "fig_baseline_accuracy" in proc.stdout + proc.stderr  # it failed in the figure rule, not before
    log = log_path.read_text()
    assert "It is stale" in log and f"--force {layout.BASELINE_ACCURACY}" in log
    assert not figure.exists()


def test_ci_workflow_runs_the_feature_interventions(ci_workflow, ci_config):
    """The interventions stage on the ci run: the identity reproduces the unpatched logits, every
    tested set has its random control, the rates sit inside their CIs; its figure is made."""
    import torch

    from tests.numerics import rounding_tolerance

    summary, meta = read_table(ci_workflow / layout.INTERVENTIONS, kind="interventions")
    summary = pl.from_arrow(summary)
    per_prompt = pl.from_arrow(read_table(ci_workflow / layout.INTERVENTIONS_PROMPTS, kind="interventions_prompts")[0])
    focus = meta["focus_layers"]
    assert sorted(summary["layer"].unique().to_list()) == sorted({*focus, 29})
    assert set(summary["sae_set"].unique()) == {"main"}
    buggy = ci_config["prompts"]["buggy_format"]
    prompts = pl.from_arrow(read_table(ci_workflow / layout.PROMPTS, kind="prompts")[0])
    assert per_prompt["prompt_id"].n_unique() == prompts.filter(pl.col("format") == buggy).height
    none = per_prompt.filter(pl.col("intervention") == "none")
    scale = float(none["baseline_logit_diff"].abs().max())
    tol = rounding_tolerance(torch.float32, scale=scale, reduction=1536, depth=31)
    assert (none["logit_diff"] - none["baseline_logit_diff"]).abs().max() <= tol
    pooled = summary.filter(pl.col("pair_kind") == "shorter_bigger", pl.col("order") == "all")
    ident = pooled.filter(pl.col("intervention") == "none")
    assert (ident["success_rate"].fill_nan(0) == 0).all() and (ident["accuracy"] == ident["baseline_accuracy"]).all()
    tested = pooled.filter(pl.col("family") == "tested").select("layer", "feature_set", "intervention", "scale",
                                                                "pairs", "n_features")
    control = pooled.filter(pl.col("family") == "random_control")
    # every tested condition has its n_random_controls random controls, samples 0, 1, ...
    n_controls = ci_config["interventions"]["n_random_controls"]
    assert control.group_by(tested.columns).agg(pl.col("sample").n_unique())["sample"].to_list() == [n_controls] * (
        tested.height)
    assert tested.sort(tested.columns).equals(control.select(tested.columns).unique().sort(tested.columns),
                                              null_equal=True)
    top = pooled.filter(pl.col("feature_set") == "top", pl.col("intervention") == "ablate")
    assert top.height and (top["n_features"] <= ci_config["interventions"]["top_n"]).all()
    assert set(pooled["intervention"]) == {"none", "ablate", "clamp", "steer"}
    assert set(summary["pair_kind"]) >= {"all", "shorter_bigger", "controls"} and set(summary["pairs"]) == {"all", "heldout"}
    for col, (lo, hi) in {"success_rate": ("success_low", "success_high"), "broken_rate": ("broken_low", "broken_high"),
                          "accuracy": ("accuracy_low", "accuracy_high")}.items():
        ok = summary.filter(pl.col(col).is_not_nan() & pl.col(lo).is_not_nan())
        assert (ok[lo] <= ok[col] + 1e-12).all() and (ok[col] <= ok[hi] + 1e-12).all()
    assert (ci_workflow / layout.figure("interventions", "svg")).stat().st_size > 0
    assert (ci_workflow / "benchmarks" / "interventions" / "feature_interventions.tsv").exists()
