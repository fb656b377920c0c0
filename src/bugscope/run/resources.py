"""Resources of the jobs that run the model or an SAE: the one place that sizes them.

`job_resources(config, rule, group_layers)` gives a job's `gpu`, `runtime` (minutes), `mem_mb` (host
memory, MB) and `cpus_per_task` on its first attempt; workflow/rules/common.smk multiplies runtime
and memory by the attempt. Everything derives from the config, before any job runs:

- gpu: 1, so that GPU jobs never share a card (a local run on a host without a GPU asks for 0,
  `gpu_visible`: its model jobs run side by side on the CPU, one thread each; common.smk);
- runtime: 10 min + resources.minutes_per_b_per_100_prompts x model.size_b (at least 0.1) x
  prompts / 100 x max(1, layers / 8);
- mem_mb: 4,000 MB + twice the model's weights (model.size_b x 2 or 4 bytes: loading can hold a
  second copy) + the SAEs the job holds at once, each d_model x d_sae x 2 matrices (W_enc, W_dec)
  x the bytes of its dtype. Training holds its group's SAEs in float32 plus, for the one in
  training, its gradients and Adam's two moments.

d_model is resources.d_model, or estimated from the size and depth of a decoder
(size_b x 1e9 ~ 12 x num_layers x d_model^2, rounded up to a multiple of 64); d_sae is
resources.d_sae, or sae.expansion x d_model for trained SAEs, or the `_<n>x` of a pretrained
release's name (Llama Scope's llama_scope_lxr_8x: 8) x d_model. The SAE jobs of a set are sized
for that set; jobs that are not per set, for the primary set.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from bugscope.config import analysed_layers, layer_groups, n_prompts, sae_sets
from bugscope.io import DTYPE_BYTES
from bugscope.run import stages

# Threads of a job that runs the model (torch intra-op threads; cpus_per_task on SLURM). One: on a
# CPU host two one-thread jobs side by side do about 1.2x the work of one two-thread job (a patched
# run's matmuls are small and scale poorly), and no result depends on how the BLAS splits work
# between threads (unpatched forwards give the same bits on one and two threads; patched logit
# differences moved by up to 1.5e-5 from two threads to one).
MODEL_JOB_THREADS = 1
BASE_MB = 4000
# Layers the focus-layer patching rules are sized for (the focus layers are known only once the
# overlap stage has run, with focus_layers: auto).
FOCUS_LAYERS_HINT = 8

# The model rules, by stage name: the stages of resource class "model" in bugscope.run.stages, in workflow
# order. A per-layer-group rule is `<stage>_<group>` (head_sweep_L00_03), and one of an SAE set
# `<stage>_<set>_<group>` (encode_features_main_L00_03).
MODEL_RULES = stages.MODEL_STAGES


def n_exhaustive_sets(config: dict) -> int:
    """Head sets per focus layer of patching.exhaustive (bugscope.patching.head_sets.exhaustive_head_sets)."""
    ex, n = config["patching"]["exhaustive"], config["model"]["num_heads"]
    n_even, n_odd = (n + 1) // 2, n // 2
    cap = max(ex["budget"], ex["samples"])

    def count(total):  # enumerated within the budget, else the draws
        return total if total <= cap else ex["samples"]
    out = 0
    for k in range(1, n + 1):
        if ex["sizes"] is not None and k not in ex["sizes"]:
            continue
        for pool, members in (("even", n_even), ("odd", n_odd), ("all", n)):
            if pool in ex["pools"] and k <= members:
                out += count(math.comb(members, k))
        if "mixed" in ex["pools"]:
            out += sum(count(math.comb(n_odd, j) * math.comb(n_even, k - j))
                       for j in range(max(1, k - n_even), min(k - 1, n_odd) + 1))
    return out


def n_reading_prompts(config: dict) -> int:
    """The reading families' prompts: per family, its pairs in two orders, two wordings and two formats."""
    r = config["reading"]
    return len(r["families"]) * r["n_pairs"] * 2 * 2 * 2


def d_model(config: dict) -> int:
    """The model's residual width: resources.d_model, else estimated from model.size_b and num_layers."""
    given = config["resources"].get("d_model")
    if given:
        return int(given)
    model = config["model"]
    estimate = math.sqrt(max(model["size_b"], 1e-3) * 1e9 / (12 * model["num_layers"]))
    return int(math.ceil(estimate / 64) * 64)


def d_sae(config: dict, sae_set: dict | None = None) -> int:
    """Latents per SAE of `sae_set` (default: the primary set): the set's own `d_sae`, else
    resources.d_sae, else sae.expansion (trained) or the release's `_<n>x` times d_model."""
    sae_set = sae_set or sae_sets(config)[0]
    given = sae_set.get("d_sae") or config["resources"].get("d_sae")
    if given:
        return int(given)
    expansion = config["sae"]["expansion"]
    if sae_set["source"] == "train":
        return expansion * d_model(config)
    match = re.search(r"_(\d+)x\b", sae_set.get("release") or "")
    return (int(match.group(1)) if match else expansion) * d_model(config)


def weights_mb(config: dict) -> int:
    """The model's weights in MB in model.dtype (float32: 4 bytes a parameter, else 2)."""
    return int(config["model"]["size_b"] * 1000 * (4 if config["model"]["dtype"] == "float32" else 2))


def sae_mb(config: dict, dtype: str | None = None, sae_set: dict | None = None) -> float:
    """One SAE's two matrices (W_enc, W_dec: d_model x d_sae each) in MB, in `dtype` (default sae.dtype)."""
    return d_model(config) * d_sae(config, sae_set) * 2 * DTYPE_BYTES[dtype or config["sae"]["dtype"]] / 1e6


def _shape(config: dict, rule: str, n_group: int, sae_set: dict | None) -> tuple[int, int, float]:
    """(prompts, layers, MB of SAEs held at once) of one job of `rule`."""
    prompts, layers = n_prompts(config), len(analysed_layers(config))
    one = sae_mb(config, sae_set=sae_set)
    shapes = {
        "baseline": (prompts, 1, 0.0),
        # training: the planting prompts (about as many as the analysis prompts) forward and back
        "plant_organism": (prompts, config["model"]["num_layers"], 0.0),
        "cache_residuals": (prompts, layers, 0.0),
        # the reading families and the analysis prompts of two formats, scored unsteered and under
        # the reading and every random direction: a forward each, counted as layers of work
        "reading": (n_prompts(config, n_formats=2) + n_reading_prompts(config),
                    2 + config["reading"]["steer"]["random_directions"], 0.0),
        "cache_corpus": (prompts, layers, 0.0),
        # every SAE of the group is trained (float32) before any is written; the one in training
        # also has its gradients and Adam's two moments
        "train_sae": (prompts, n_group, (n_group + 3) * sae_mb(config, "float32", sae_set)),
        "load_pretrained_sae": (prompts, n_group, 2 * one),  # one at a time: the loaded SAE and its saved copy
        "encode_features": (prompts, n_group, one),  # one at a time
        "sae_quality": (prompts, n_group, n_group * one),  # the group's SAEs spliced in together
        "head_sweep": (prompts, n_group, 0.0),
        "head_subsets": (prompts, FOCUS_LAYERS_HINT, 0.0),
        "head_original_method": (prompts, 1, 0.0),
        # head sets x fractions (or x directions) at the focus layers, on one decision column each
        "head_replacement": (prompts, FOCUS_LAYERS_HINT, 0.0),
        "head_bidirectional": (prompts, FOCUS_LAYERS_HINT, 0.0),
        # on the eligible targets only (at most the buggy format's prompts), but many sets: one
        # layer of the sweep runs num_heads + 4 head sets, so that many sets weigh one layer
        "head_subsets_exhaustive": (n_prompts(config, n_formats=1), max(FOCUS_LAYERS_HINT, math.ceil(
            n_exhaustive_sets(config) / (config["model"]["num_heads"] + 4))), 0.0),
        "residual_map": (prompts, layers, 0.0),
        # a few number pairs, one layer: generation (every setting x head set) dominates, not memory
        "original_decomposition": (prompts, 1, 0.0),
        # one forward pass over the buggy- and correct-format prompts serves every layer; one SAE at a time
        "head_feature_attribution": (n_prompts(config, n_formats=2), 1, one),
        # no model: one SAE at a time encodes the layer's cached corpus activations
        "feature_pages": (n_prompts(config, n_formats=2), 1, one),
        # the buggy- and correct-format prompts; the SAEs of every intervened layer held at once
        # (a focus layer counted as two: their number is known only once the overlap stage has run)
        "feature_interventions": (n_prompts(config, n_formats=2), 1,
                                  one * sum(2 if x == "focus" else 1 for x in config["interventions"]["layers"])),
        # the exhaustive stage's even-head sets on one layer only (no later layers), one SAE per focus layer
        "head_set_features": (n_prompts(config, n_formats=1), max(FOCUS_LAYERS_HINT, math.ceil(
            n_exhaustive_sets(config) / (config["model"]["num_heads"] + 4) / config["model"]["num_layers"])),
                              one * FOCUS_LAYERS_HINT),
    }
    if rule not in shapes:
        raise ValueError(f"job_resources: {rule!r} is not a model rule; expected one of {', '.join(MODEL_RULES)}.")
    return shapes[rule]


def gpu_visible(device: str) -> bool:
    """Whether a model job started on this host would run on a GPU (bugscope.model.pick_device),
    decided without importing torch: `device` cpu or cuda says so; auto looks for a GPU driver's
    device files. A GPU seen where torch would find none only costs speed (the jobs then run one at
    a time); the reverse would let two GPU jobs share a card, so anything GPU-like counts."""
    if device != "auto":
        return device == "cuda"
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    nvidia = Path("/proc/driver/nvidia/gpus")
    return (nvidia.is_dir() and any(nvidia.iterdir())) or any(
        Path(p).exists() for p in ("/dev/nvidia0", "/dev/kfd", "/dev/dxg"))


def job_resources(config: dict, rule: str, group_layers: list[int] | None = None,
                  sae_set: dict | None = None) -> dict[str, int]:
    """gpu, runtime (minutes), mem_mb and cpus_per_task of one job of `rule` on its first attempt.

    `rule` is the stage name (`encode_features` for encode_features_main_L00_03); `group_layers` the
    layers of a per-group job (default: all analysed layers); `sae_set` the set of an SAE job
    (default: the primary set).
    """
    n_group = len(group_layers) if group_layers is not None else len(analysed_layers(config))
    prompts, layers, saes = _shape(config, rule, n_group, sae_set)
    size_b = config["model"]["size_b"]
    scale = config["resources"]["minutes_per_b_per_100_prompts"]
    runtime = int(10 + scale * max(size_b, 0.1) * (prompts / 100) * max(1, layers / 8))
    mem_mb = int(BASE_MB + 2 * weights_mb(config) + math.ceil(saes))
    return {"gpu": 1, "runtime": runtime, "mem_mb": mem_mb, "cpus_per_task": MODEL_JOB_THREADS}


def rule_table(config: dict) -> list[tuple[str, dict[str, int]]]:
    """(rule name, job_resources) of every model rule the config makes, in the workflow's order
    (bugscope.run.stages: which stages run, and how their jobs split)."""
    per_job = config["resources"]["layers_per_job"]
    out = []
    for name in MODEL_RULES:
        stage = stages.STAGE[name]
        if not stage.when(config):
            continue
        if stage.per == "set_group":
            for s in stage.sets(config):
                out += [(f"{name}_{s['name']}_{group}", job_resources(config, name, layers, s))
                        for group, layers in layer_groups(s["layers"], per_job).items()]
        elif stage.per == "group":
            out += [(f"{name}_{group}", job_resources(config, name, layers))
                    for group, layers in layer_groups(analysed_layers(config), per_job).items()]
        else:
            out.append((name, job_resources(config, name)))
    return out
