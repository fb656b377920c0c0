"""Job resources (bugscope.resources): the arithmetic by hand, the defaults left as they were, and the
table of docs/cluster.md is the function's output."""

from __future__ import annotations

import importlib.util

import pytest

from bugscope import resources
from bugscope.config import load_config
from tests.conftest import REPO


def _bench():
    spec = importlib.util.spec_from_file_location("resource_table", REPO / "bench" / "resource_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_8b_sizes_by_hand():
    cfg = load_config(REPO / "config" / "llama31_8b.yaml")
    assert resources.d_model(cfg) == 4096 and resources.d_sae(cfg) == 32768
    sae = 4096 * 32768 * 2 * 2 / 1e6  # W_enc and W_dec in bfloat16: 537 MB
    assert resources.sae_mb(cfg) == pytest.approx(sae)
    base = 4000 + 2 * 16_000  # 8 B parameters in bfloat16, twice
    assert resources.job_resources(cfg, "baseline")["mem_mb"] == base
    assert resources.job_resources(cfg, "head_sweep", [0, 1, 2, 3])["mem_mb"] == base
    assert resources.job_resources(cfg, "encode_features", [0, 1, 2, 3])["mem_mb"] == base + 537
    assert resources.job_resources(cfg, "sae_quality", [0, 1, 2, 3])["mem_mb"] == base + 2148
    assert resources.job_resources(cfg, "load_pretrained_sae", [0, 1, 2, 3])["mem_mb"] == base + 1074
    # 2,328 prompts (388 pairs x 2 orders x 3 formats); runtime 10 + 0.1 x 8 x 23.28 x max(1, layers / 8)
    assert resources.job_resources(cfg, "baseline")["runtime"] == int(10 + 0.1 * 8 * 23.28)
    assert resources.job_resources(cfg, "cache_residuals")["runtime"] == int(10 + 0.1 * 8 * 23.28 * 4)
    # attribution: the two contrasted formats, 384 x 2 x 2 = 1,536 prompts (it runs the bug's kind only: a bound)
    assert resources.job_resources(cfg, "head_feature_attribution")["runtime"] == int(10 + 0.1 * 8 * 15.36)


def test_a_set_with_its_own_width_is_sized_by_it():
    """The andyrdt Instruct set of config/llama31_8b.yaml has 131,072 latents (its `d_sae`), the
    Llama Scope sets 32,768 (resources.d_sae): each set's jobs are sized by its own SAEs."""
    cfg = load_config(REPO / "config" / "llama31_8b.yaml")
    sets = {s["name"]: s for s in cfg["sae"]["sets"]}
    assert resources.d_sae(cfg, sets["instruct"]) == 131072 and resources.d_sae(cfg, sets["residual"]) == 32768
    base = 4000 + 2 * 16_000
    one = 4096 * 131072 * 2 * 2 / 1e6  # 2,147 MB in bfloat16
    assert resources.job_resources(cfg, "encode_features", [3, 7, 11, 15], sets["instruct"])["mem_mb"] == int(base + -(-one // 1))
    assert resources.job_resources(cfg, "encode_features", [0, 1, 2, 3], sets["residual"])["mem_mb"] == base + 537


def test_widths_are_derived_when_the_config_does_not_give_them():
    cfg = load_config(REPO / "config" / "config.yaml")  # SmolLM2-135M: d_model 576, 30 layers
    assert cfg["resources"]["d_model"] is None
    # sqrt(0.135e9 / (12 x 30)) = 612, rounded up to 640: the right order for a memory request
    assert resources.d_model(cfg) == 640
    assert resources.d_sae(cfg) == cfg["sae"]["expansion"] * 640
    pretrained = {"name": "p", "source": "pretrained", "release": "llama_scope_lxr_32x"}
    assert resources.d_sae(cfg, pretrained) == 32 * 640
    # training holds the group's SAEs in float32, plus gradients and Adam's moments of one
    one = 640 * 1280 * 2 * 4 / 1e6
    mem = resources.job_resources(cfg, "train_sae", [0, 1])["mem_mb"]
    assert mem == int(4000 + 2 * resources.weights_mb(cfg) + -(-(5 * one) // 1))


@pytest.mark.parametrize("config", ["config.yaml", "ci.yaml", "llama31_8b.yaml"])
def test_models_rules_without_saes_ask_for_what_they_did_before(config):
    """The old common.smk arithmetic (runtime, and mem_mb = 4000 + 2 x weights) for the rules without an SAE."""
    cfg = load_config(REPO / "config" / config)
    size_b, scale = cfg["model"]["size_b"], cfg["resources"]["minutes_per_b_per_100_prompts"]
    weights = int(size_b * 1000 * (4 if cfg["model"]["dtype"] == "float32" else 2))
    for rule, res in resources.rule_table(cfg):
        stage = next(s for s in resources.MODEL_RULES if rule == s or rule.startswith(s + "_"))
        if stage in ("baseline", "cache_residuals", "cache_corpus", "head_sweep", "head_subsets",
                     "head_original_method"):
            assert res["mem_mb"] == 4000 + 2 * weights, rule
        assert res["gpu"] == 1 and res["cpus_per_task"] == resources.MODEL_JOB_THREADS
        assert res["runtime"] >= int(10 + scale * max(size_b, 0.1)), rule


def test_every_model_rule_of_the_workflow_is_sized_by_its_own_stage():
    """The rules call model_job_resources("<stage>") with the stages the table lists, each once."""
    import re

    called = []
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        called += re.findall(r'model_job_resources\("(\w+)"', smk.read_text())
    assert sorted(called) == sorted(resources.MODEL_RULES)


def test_unknown_rule_is_refused():
    cfg = load_config(REPO / "config" / "ci.yaml")
    with pytest.raises(ValueError, match="not a model rule"):
        resources.job_resources(cfg, "fig_head_sweep")


def test_cluster_doc_table_is_the_functions_output():
    bench = _bench()
    current = bench.doc_table(bench.DOC.read_text())
    assert current == bench.markdown(), "docs/cluster.md is stale: run python bench/resource_table.py --write-doc"
