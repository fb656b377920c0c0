"""The pipeline at Llama-3.1-8B's widths: every model rule through the Snakemake CLI, bfloat16, CPU, offline.

bench/make_8b_shaped.py builds a random 2-layer LlamaForCausalLM with Llama-3.1-8B-Instruct's config
(d_model 4,096, 32 heads over 8 KV heads, head_dim 128, MLP 14,336, vocabulary 128,256, llama3
rope) and Llama Scope-format 32,768-latent JumpReLU SAEs in a local hub cache, which SAE-Lens's own
Llama Scope conversion loads. config/llama31_8b_shaped.yaml runs the whole study on it.

The run (marker `eightb`) runs by default: measured at 6 min 44 s for this file on 2 CPU cores from
an empty cache (build 58 s, pipeline 4 min 44 s, float32 comparison 35 s; docs/8b_shaped_run.md),
well inside the 10 minutes that CI's budget allows it, with ~5 GB of disk and a 9 GB peak in the
pytest process. BUGSCOPE_8B=0 skips it. The build is kept in the test cache
(.pytest_cache/bugscope/8b_shaped, or BUGSCOPE_8B_DIR) and reused by later sessions. The checks of
bench/gpu_check.sh that need no GPU, and of the builder's config, always run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess

import polars as pl
import pytest
import torch

from bench import make_8b_shaped as shaped
from bugscope import layout, tables
from bugscope.config import load_config
from bugscope.jobstats import MatmulFlops
from bugscope.sites import hook_name
from tests.conftest import MODEL_CACHE, REPO, run_snakemake

CONFIG = REPO / "config" / "llama31_8b_shaped.yaml"
GPU_CHECK = REPO / "bench" / "gpu_check.sh"
LAYERS = [0, 1]
HOOKS = [hook_name(layer) for layer in LAYERS]
GROUP = "L00_01"
# Rules that run the model or an SAE (the ones with a benchmark and job statistics).
MODEL_RULES = ["baseline", "cache_residuals", "cache_corpus", f"load_pretrained_sae_{GROUP}",
               f"encode_features_{GROUP}", f"sae_quality_{GROUP}", "head_feature_attribution",
               f"head_sweep_{GROUP}", "head_subsets", "head_original_method"]

EIGHTB_MARKS = (pytest.mark.eightb, pytest.mark.slow,
                pytest.mark.skipif(os.environ.get("BUGSCOPE_8B", "1") == "0",
                                   reason="BUGSCOPE_8B=0: the pipeline at Llama-3.1-8B's widths is skipped"))


def eightb(test):
    """The marks of a test that needs the 8B-shaped run."""
    for mark in EIGHTB_MARKS:
        test = mark(test)
    return test


# --- always: the builder's config and the GPU script's CPU-independent parts ----------------------

def test_builder_config_is_llama31_8b_but_two_layers():
    cfg = shaped.hf_config()
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4096, 32, 8, 128)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers) == (14336, 128256, 2)
    assert cfg.rope_parameters == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    assert cfg.tie_word_embeddings is False and cfg.bos_token_id == 128000 and cfg.eos_token_id == [128001, 128008, 128009]
    loaded = load_config(CONFIG)
    assert loaded["model"]["num_layers"] == 2 and loaded["model"]["dtype"] == "bfloat16"
    assert (loaded["sae"]["source"], loaded["sae"]["release"]) == ("pretrained", shaped.RELEASE)


def test_matmul_flop_counter_counts_linear_layers_and_sae_matmuls():
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    lin = torch.nn.Linear(8, 3)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=8, d_sae=16))
    with MatmulFlops() as counter:
        lin(torch.zeros(2, 5, 8))
        assert counter.flops == 2 * 10 * 8 * 3
        sae.decode(sae.encode(torch.zeros(4, 8)))  # 4 rows: 8 -> 16 and back
        assert counter.flops == 2 * 10 * 8 * 3 + 2 * (2 * 4 * 8 * 16)
    lin(torch.zeros(1, 8))  # not counted once the block has ended
    assert counter.flops == 2 * 10 * 8 * 3 + 4 * 4 * 8 * 16


def test_gpu_check_script_parses_and_dry_runs():
    subprocess.run(["bash", "-n", str(GPU_CHECK)], check=True)
    proc = subprocess.run(["bash", str(GPU_CHECK), "--dry-run"], capture_output=True, text=True, check=True,
                          env={k: v for k, v in os.environ.items() if k != "DEVICE"})
    steps = [line for line in proc.stdout.splitlines() if line.startswith("== ") and "at most" in line]
    assert [s.split(" (at most")[0] for s in steps] == [
        "== build the 8B-shaped model and SAEs", f"== write {REPO}/build/gpu_check/config.yaml",
        "== the 8B-shaped pipeline on cuda", "== bench_patching", "== bench_cache"]
    # The limits of the steps, plus the summary, fit in the 10 minutes.
    assert sum(int(s.split("at most ")[1].split(" s)")[0]) for s in steps) + 15 <= 600
    assert "--device cuda" in proc.stdout and "bench/make_8b_shaped.py" in proc.stdout
    bad = subprocess.run(["bash", str(GPU_CHECK), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr


# --- BUGSCOPE_8B=1: the run itself -----------------------------------------------------------------

@pytest.fixture(scope="session")
def eightb_build():
    """The built model and SAEs (bench/make_8b_shaped.py), kept across sessions in the test cache."""
    return shaped.build(os.environ.get("BUGSCOPE_8B_DIR", MODEL_CACHE / "8b_shaped"))


@pytest.fixture(scope="session")
def eightb_run(tmp_path_factory, eightb_build):
    """A finished run of config/llama31_8b_shaped.yaml (all default targets) on the CPU; its workdir."""
    workdir = tmp_path_factory.mktemp("eightb")
    # model.checkpoint is build/8b_shaped/model, relative to the working directory
    (workdir / "build").mkdir()
    (workdir / "build" / "8b_shaped").symlink_to(os.path.dirname(eightb_build["model_dir"]))
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": eightb_build["hub_cache"], "CUDA_VISIBLE_DEVICES": "",
           "BUGSCOPE_JOB_STATS": str(workdir / "jobstats.jsonl")}
    run_snakemake(workdir, configfile=CONFIG, env=env, seed_model=False, timeout=3600)
    return workdir


@pytest.fixture(scope="session")
def eightb_config():
    return load_config(CONFIG)


def _declared_tables() -> list[tuple[tables.Table, str]]:
    per_hook = [tables.PROMPT_ACTIVATIONS, tables.CORPUS_ACTIVATIONS, tables.FEATURES, tables.SAE_QUALITY_LAYER]
    single = [tables.PROMPTS, tables.BASELINE_SCORES, tables.BASELINE_ACCURACY, tables.BASELINE_GENERATION,
              tables.CORPUS, tables.SAE_QUALITY, tables.FEATURE_OVERLAP, tables.FEATURE_OVERLAP_PAIRS,
              tables.DISCRIMINATIVE_FEATURES, tables.NAMED_FEATURES, tables.HEAD_FEATURE_ATTRIBUTION,
              tables.HEAD_PARITY, tables.PATCHING_SUBSETS_PROMPTS, tables.PATCHING_ORIGINAL_METHOD_PROMPTS,
              tables.PATCHING_ORIGINAL_METHOD, tables.PATCHING_PROMPTS, tables.PATCHING_SUMMARY, tables.CLAIMS]
    return ([(t, t.path.format(hook=hook)) for t in per_hook for hook in HOOKS] + [(t, t.path) for t in single]
            + [(tables.PATCHING_SWEEP_GROUP, tables.PATCHING_SWEEP_GROUP.path.format(group=GROUP))])


@eightb
def test_every_output_is_a_valid_table(eightb_run, eightb_config):
    for declared, path in _declared_tables():
        # tables.read checks the kind and the stage's config hash, and that the file is readable
        table, meta = tables.read(declared, eightb_config, eightb_run / path)
        assert table.num_rows > 0, path
    for hook in HOOKS:
        table, meta = tables.read(tables.PROMPT_ACTIVATIONS, eightb_config, eightb_run / layout.activations("prompts", hook))
        assert (meta["d_model"], meta["dtype"]) == (4096, "bfloat16")
        assert table.schema.field("activation").type.list_size == 4096
    for name in ("baseline_accuracy", "head_sweep", "head_attribution", "original_method"):
        for ext in ("svg", "png", "html"):
            assert (eightb_run / layout.figure(name, ext)).stat().st_size > 0
    assert (eightb_run / layout.CLAIMS_MARKDOWN).read_text().strip()
    proc = run_snakemake(eightb_run, "-n", configfile=CONFIG, seed_model=False,
                         env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(eightb_run / "build" / "8b_shaped" / "hub")})
    assert "Nothing to be done" in proc.stdout + proc.stderr


@eightb
def test_model_manifest_has_llama31_8b_geometry(eightb_run):
    manifest = json.loads((eightb_run / layout.MODEL_MANIFEST).read_text())
    assert {k: manifest[k] for k in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "d_model", "vocab_size",
                                     "dtype", "source")} == {
        "num_layers": 2, "num_heads": 32, "num_kv_heads": 8, "head_dim": 128, "d_model": 4096, "vocab_size": 128256,
        "dtype": "bfloat16", "source": "local"}


@eightb
def test_saes_are_llama_scope_jumprelu_with_32768_latents(eightb_run, eightb_config):
    from bugscope.sae import load_sae

    for layer, hook in zip(LAYERS, HOOKS):
        sae, prov = load_sae(eightb_run / layout.SAE_DIR.format(hook=hook))
        assert sae.cfg.d_sae == 32768 and sae.cfg.architecture() == "jumprelu" and sae.cfg.d_in == 4096
        assert sae.W_enc.dtype == torch.bfloat16 and sae.cfg.metadata.hook_name == hook
        assert (prov["release"], prov["sae_id"], prov["sae_repo_id"], prov["sae_revision"]) == (
            shaped.RELEASE, shaped.sae_id(layer), shaped.SAE_REPO, shaped.SAE_COMMIT)
        features, meta = tables.read(tables.FEATURES, eightb_config, eightb_run / layout.FEATURES.format(hook=hook))
        ids = features.column("feature_id").to_numpy()
        assert meta["d_sae"] == 32768 and ids.max() < 32768 and ids.max() >= 16384  # the whole width is used
    quality = tables.frame(tables.SAE_QUALITY, eightb_config, eightb_run / layout.SAE_QUALITY)
    assert quality["d_sae"].to_list() == [32768, 32768]
    # The builder calibrates the SAEs to Llama Scope's sparsity (L0 ~ 44 of 32,768) on this model.
    assert quality["l0_corpus"].is_between(10, 200).all(), quality.select("layer", "l0_corpus", "l0_prompts")


@eightb
def test_patching_covers_all_32_heads(eightb_run, eightb_config):
    summary = tables.frame(tables.PATCHING_SUMMARY, eightb_config, eightb_run / layout.PATCHING_SUMMARY)
    per_head = summary.filter(pl.col("method") == "per_head", pl.col("family").is_in(["all", "even", "odd", "single"]),
                              pl.col("pair_kind") == "shorter_bigger", pl.col("order") == "all")
    for layer in LAYERS:
        at = per_head.filter(pl.col("layer") == layer)
        singles = at.filter(pl.col("family") == "single").sort("head_set")
        assert singles["head_set"].to_list() == [f"head{h:02d}" for h in range(32)]
        assert [h[0] for h in singles["heads"].to_list()] == list(range(32))
        heads = {r["head_set"]: r["heads"] for r in at.filter(pl.col("family") != "single").to_dicts()}
        assert heads == {"all": list(range(32)), "even": list(range(0, 32, 2)), "odd": list(range(1, 32, 2))}
    prompts = tables.frame(tables.PATCHING_PROMPTS, eightb_config, eightb_run / layout.PATCHING_PROMPTS)
    sweep = prompts.filter(pl.col("family") != "subset")
    assert sweep.height == 2 * 36 * sweep["prompt_id"].n_unique()  # all, even, odd, 32 heads, the ceiling
    assert sweep["logit_diff"].is_finite().all()
    subsets = tables.frame(tables.PATCHING_SUBSETS_PROMPTS, eightb_config, eightb_run / layout.PATCHING_SUBSETS_PROMPTS)
    assert set(subsets["k"].unique().to_list()) == {1, 2, 4, 8, 16}
    original = tables.frame(tables.PATCHING_ORIGINAL_METHOD, eightb_config, eightb_run / layout.PATCHING_ORIGINAL_METHOD)
    assert set(original["method"]) == {"per_head", "original"}


@eightb
def test_head_attribution_has_32_heads_and_its_identity_holds_in_bf16(eightb_run, eightb_config):
    attribution, meta = tables.read(tables.HEAD_FEATURE_ATTRIBUTION, eightb_config,
                                    eightb_run / layout.HEAD_FEATURE_ATTRIBUTION)
    heads = pl.from_arrow(attribution).filter(pl.col("component") == "head")
    assert sorted(heads["head"].unique().to_list()) == list(range(32))
    for layer, err in meta["identity"].items():
        # bf16 rounding of SAE-Lens's own pre-activation (step 2^-6 at |pre| 2-4); in float32 it is ~1e-6
        assert err["identity_error"] <= 0.02 * max(1.0, err["pre_activation_scale"]), (layer, err)


@eightb
def test_optimised_sweep_matches_naive_loop_at_8b_geometry_in_float32(eightb_run, eightb_config):
    """GQA (8 KV heads for 32 query heads), head_dim 128, KV reuse: the optimised sweep equals one full
    forward per head set. In float32, where the tolerance is far below the patch effects."""
    from bugscope import patching
    from bugscope.model import ModelManifest, load_model
    from tests.numerics import forward_tolerance, max_abs
    from tests.oracle import sweep_naive

    manifest = ModelManifest.load(eightb_run / layout.MODEL_MANIFEST)
    model, tok = load_model(dataclasses.replace(manifest, dtype="float32"), "cpu")
    prompts = tables.frame(tables.PROMPTS, eightb_config, eightb_run / layout.PROMPTS)
    spec, target, source = patching.spec_from_config(eightb_config)
    pairs = patching.make_pairs(prompts, target, source, spec.positions)
    sets = [s for s in patching.named_head_sets(32) if s.name in ("all", "odd", "head00", "head07", "head31")]
    plan = {layer: sets for layer in LAYERS}
    patcher = patching.patcher_from_config(model, eightb_config, tok.pad_token_id)
    patcher.progress = False
    fast, base = patcher.sweep(pairs, plan, spec)
    slow = sweep_naive(patcher, pairs, plan, spec)
    joined = fast.join(slow, on=["layer", "head_set", "prompt_id"], suffix="_naive").join(base, on="prompt_id")
    assert joined.height == len(pairs) * len(sets) * len(LAYERS)
    tol = forward_tolerance(model, scale=max_abs(joined["logit_diff_naive"].to_numpy()))
    assert (joined["logit_diff"] - joined["logit_diff_naive"]).abs().max() <= tol
    # Not vacuous: patching moves the logit difference far more than the tolerance.
    assert (joined["logit_diff"] - joined["baseline_logit_diff"]).abs().median() > 20 * tol


@eightb
def test_every_model_rule_has_a_benchmark_and_job_statistics(eightb_run):
    from bench.job_table import benchmark_rows, job_stats

    bench = benchmark_rows(eightb_run)
    stats = job_stats(eightb_run / "jobstats.jsonl")
    for rule in MODEL_RULES:
        assert bench[rule]["s"] > 0 and bench[rule]["max_rss"] > 0, rule
        assert stats[rule]["ok"] and stats[rule]["peak_gpu_bytes"] is None, rule  # CUDA hidden: CPU only
    # Every rule that runs the model or encodes with an SAE does its matmuls where the counter sees them.
    for rule in MODEL_RULES:
        if not rule.startswith("load_pretrained_sae"):
            assert stats[rule]["flops"] > 1e9, rule
