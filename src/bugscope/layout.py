"""The results layout: the one place that decides where every output lives.

Snakemake rules (workflow/rules/common.smk) and tests both read paths from here. `{hook}` is a
hook name such as `blocks.10.hook_resid_post` (see `bugscope.sites`); `{dataset}` is `prompts`
(the analysis prompts) or `corpus` (SAE training text).
"""

from __future__ import annotations

RESULTS = "results"

MODEL_MANIFEST = f"{RESULTS}/model/model.json"
MODEL_CHECKPOINT = f"{RESULTS}/model/checkpoint"

PROMPTS = f"{RESULTS}/prompts/prompts.parquet"

BASELINE_SCORES = f"{RESULTS}/baseline/scores.parquet"
BASELINE_ACCURACY = f"{RESULTS}/baseline/accuracy.parquet"
BASELINE_GENERATION = f"{RESULTS}/baseline/generation.parquet"
BASELINE_CONTRAST = f"{RESULTS}/baseline/format_contrast.parquet"

ACTIVATIONS = f"{RESULTS}/activations/{{dataset}}/{{hook}}.parquet"
CORPUS = f"{RESULTS}/corpus/corpus.parquet"

SAE_DIR = f"{RESULTS}/sae/{{hook}}"
# The SAE stage (workflow/rules/sae.smk): SAEs, their sparse codes of the prompts, their quality.
FEATURES = f"{RESULTS}/sae/features/{{hook}}.parquet"
SAE_QUALITY_LAYER = f"{RESULTS}/sae/quality/{{hook}}.parquet"
SAE_QUALITY = f"{RESULTS}/sae/quality.parquet"

# Feature analyses (bugscope.features, workflow/rules/features.smk)
FEATURE_OVERLAP = f"{RESULTS}/features/overlap.parquet"
FEATURE_OVERLAP_PAIRS = f"{RESULTS}/features/overlap_pairs.parquet"
DISCRIMINATIVE_FEATURES = f"{RESULTS}/features/discriminative.parquet"
NAMED_FEATURES = f"{RESULTS}/features/named_features.parquet"
HEAD_FEATURE_ATTRIBUTION = f"{RESULTS}/features/head_feature_attribution.parquet"
HEAD_PARITY = f"{RESULTS}/features/head_parity.parquet"

# Attention-head patching (bugscope.patching, workflow/rules/patching.smk). `{group}` is a layer
# group such as `L00_07` (bugscope.config.layer_groups, resources.layers_per_job layers per job).
PATCHING_SWEEP_GROUP = f"{RESULTS}/patching/sweep/{{group}}.parquet"
PATCHING_SUBSETS_PROMPTS = f"{RESULTS}/patching/subsets.parquet"
PATCHING_PROMPTS = f"{RESULTS}/patching/heads_prompts.parquet"
PATCHING_SUMMARY = f"{RESULTS}/patching/heads.parquet"
PATCHING_ORIGINAL_METHOD_PROMPTS = f"{RESULTS}/patching/original_method_prompts.parquet"
PATCHING_ORIGINAL_METHOD = f"{RESULTS}/patching/original_method.parquet"

# Figures, report tables and the claims ledger (bugscope.figures, bugscope.claims, workflow/rules/figures.smk)
FIGURE = f"{RESULTS}/figures/{{name}}.{{ext}}"
REPORT_TABLE = f"{RESULTS}/tables/{{name}}.html"
CLAIMS = f"{RESULTS}/claims.parquet"
CLAIMS_MARKDOWN = f"{RESULTS}/claims.md"
CLAIMS_HTML = f"{RESULTS}/claims.html"

LOGS = "logs"
BENCHMARKS = "benchmarks"


def activations(dataset: str, hook: str) -> str:
    return ACTIVATIONS.format(dataset=dataset, hook=hook)


def figure(name: str, ext: str) -> str:
    return FIGURE.format(name=name, ext=ext)
