"""Job resources (bugscope.run.resources): the arithmetic by hand, the defaults left as they were, and the
table of docs/cluster.md is the function's output."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch

from bugscope.config import load_config
from bugscope.run import resources
from tests.conftest import REPO, run_snakemake


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


def test_gpu_visible_follows_the_device_and_this_host():
    assert not resources.gpu_visible("cpu") and resources.gpu_visible("cuda")
    # auto: what torch finds here (the job's own choice, bugscope.model.pick_device), without torch;
    # only a CPU build of torch on a host with a GPU may differ, on the side that never shares a card
    seen = resources.gpu_visible("auto")
    assert seen == torch.cuda.is_available() or (seen and torch.version.cuda is None)


def test_gpu_hidden_by_cuda_visible_devices(monkeypatch):
    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert not resources.gpu_visible("auto")


def _dry_run_resources(workdir, device: str) -> dict[str, str]:
    """rule -> its `resources:` line in a dry run of the ci.yaml workflow on this host."""
    out = run_snakemake(workdir, "-n", "--forceall", "--config", f"device={device}").stdout
    found, rule = {}, None
    for line in out.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):", line.strip())
        if m:
            rule = m.group(1)
        elif rule and line.strip().startswith("resources:"):
            found[rule] = line
    return found


@pytest.mark.parametrize("device, gpu", [("cpu", 0), ("cuda", 1)])
def test_local_model_jobs_hold_a_gpu_only_where_they_run_on_one(tmp_path, device, gpu):
    """On a host without a GPU the model jobs ask for none, so the local profile's cap of one GPU job
    does not make them wait for each other: they run side by side, one thread each."""
    found = _dry_run_resources(tmp_path, device)
    # the organism's study runs the same rules under an organism_ prefix (workflow/rules/organism.smk)
    model_rules = {r: next(s for s in resources.MODEL_RULES
                           if r.removeprefix("organism_") == s or r.removeprefix("organism_").startswith(s + "_"))
                   for r, line in found.items() if "cpus_per_task=" in line}
    assert {"baseline", "cache_corpus", "head_sweep", "train_sae"} <= set(model_rules.values())
    for rule in model_rules:
        line = found[rule]
        assert re.search(rf"\bgpu={gpu}\b", line), (rule, line)
        assert re.search(r"\bcpus_per_task=1\b", line), (rule, line)
    light = [r for r, line in found.items() if r not in model_rules]
    assert light and not any("gpu=" in found[r] for r in light)


@pytest.mark.parametrize("config", ["config.yaml", "ci.yaml"])
def test_the_organisms_rules_are_local_exactly_where_the_base_rules_are(tmp_path, config):
    """The organism's rules are the base rules again (`use rule * from organism as organism_*`): each is
    local where its base rule is, and every rule that goes to the cluster asks for a GPU. (A module's
    `localrules:` list does not reach its renamed rules; `localrule: True` does.)"""
    from tests.conftest import workflow_rules

    rules = workflow_rules(tmp_path, REPO / "config" / config)
    copies = {name: name.removeprefix("organism_") for name in rules
              if name.startswith("organism_") and name.removeprefix("organism_") in rules}
    assert len(copies) > 30, sorted(rules)
    differ = [name for name, base in copies.items() if rules[name][0] != rules[base][0]]
    assert not differ, f"organism rules whose locality differs from their base rule: {differ}"
    remote = [name for name, (local, res) in rules.items() if not local]
    assert "organism_report_table" not in remote and "organism_baseline" in remote
    assert all("gpu" in rules[name][1] for name in remote), [n for n in remote if "gpu" not in rules[n][1]]
