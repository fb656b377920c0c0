"""The results layout: the one place that decides where every output lives.

Snakemake rules (workflow/rules/common.smk) and tests both read paths from here. `{hook}` is a
hook name such as `blocks.10.hook_resid_post` (see `bugscope.model.sites`); `{dataset}` is `prompts`
(the analysis prompts), `reading` (the reading families) or `corpus` (SAE training text); `{sae_set}` is the name of an SAE set
(`sae.sets`): every SAE and feature-analysis output is per set.
"""

from __future__ import annotations

RESULTS = "results"

MODEL_MANIFEST = f"{RESULTS}/model/model.json"
MODEL_CHECKPOINT = f"{RESULTS}/model/checkpoint"

PROMPTS = f"{RESULTS}/prompts/prompts.parquet"
# The reading families (bugscope.data.reading): prompts in which the version order is right
READING_PROMPTS = f"{RESULTS}/prompts/reading_prompts.parquet"

BASELINE_SCORES = f"{RESULTS}/baseline/scores.parquet"
BASELINE_ACCURACY = f"{RESULTS}/baseline/accuracy.parquet"
BASELINE_GENERATION = f"{RESULTS}/baseline/generation.parquet"
BASELINE_CONTRAST = f"{RESULTS}/baseline/format_contrast.parquet"
# The logit lens and direct logit attribution of the unpatched run (bugscope.data.lens), per prompt and layer
LENS_PROMPTS = f"{RESULTS}/baseline/lens_prompts.parquet"
LENS = f"{RESULTS}/baseline/lens.parquet"

ACTIVATIONS = f"{RESULTS}/activations/{{dataset}}/{{hook}}.parquet"
CORPUS = f"{RESULTS}/corpus/corpus.parquet"

# Knows vs says (bugscope.data.probes): probe predictions per prompt, and probe against output accuracy
PROBE_PROMPTS = f"{RESULTS}/probes/probe_prompts.parquet"
PROBES = f"{RESULTS}/probes/probes.parquet"

# Version or date reading (bugscope.data.reading, workflow/rules/reading.smk): the model's logit
# differences per prompt and steering condition; the accuracy on each family; the closeness probe
# per prompt and summarised; the causal test of the reading direction against random directions.
READING_SCORES = f"{RESULTS}/reading/scores.parquet"
READING_ACCURACY = f"{RESULTS}/reading/accuracy.parquet"
READING_CLOSENESS_PROMPTS = f"{RESULTS}/reading/closeness_prompts.parquet"
READING_CLOSENESS = f"{RESULTS}/reading/closeness.parquet"
READING_STEERING = f"{RESULTS}/reading/steering.parquet"
# The reading features (SAE): the ones chosen per layer and their random controls; their summed
# activation per family prompt; summarised on the held-out wording and on both formats
READING_FEATURES = f"{RESULTS}/reading/features.parquet"
READING_FEATURE_PROMPTS = f"{RESULTS}/reading/feature_prompts.parquet"
READING_FEATURE_SUMMARY = f"{RESULTS}/reading/feature_summary.parquet"

# The SAE stage (workflow/rules/sae.smk): per set, its SAEs, their sparse codes of the prompts and
# their quality; the quality of every set in one table.
SAE_DIR = f"{RESULTS}/sae/{{sae_set}}/{{hook}}"
FEATURES = f"{RESULTS}/sae/{{sae_set}}/features/{{hook}}.parquet"
SAE_QUALITY_LAYER = f"{RESULTS}/sae/{{sae_set}}/quality/{{hook}}.parquet"
SAE_QUALITY = f"{RESULTS}/sae/quality.parquet"

# Feature analyses (bugscope.features, workflow/rules/features.smk), per SAE set
FEATURE_OVERLAP = f"{RESULTS}/features/{{sae_set}}/overlap.parquet"
FEATURE_OVERLAP_PAIRS = f"{RESULTS}/features/{{sae_set}}/overlap_pairs.parquet"
DISCRIMINATIVE_FEATURES = f"{RESULTS}/features/{{sae_set}}/discriminative.parquet"
NAMED_FEATURES = f"{RESULTS}/features/{{sae_set}}/named_features.parquet"
HEAD_FEATURE_ATTRIBUTION = f"{RESULTS}/features/{{sae_set}}/head_feature_attribution.parquet"
HEAD_PARITY = f"{RESULTS}/features/{{sae_set}}/head_parity.parquet"
# Feature pages (bugscope.features.pages): per-token activations by token role, top corpus
# contexts, and one offline HTML page per page layer (pages/layer_<L>.html, pages/index.html).
FEATURE_TOKENS = f"{RESULTS}/features/{{sae_set}}/feature_tokens.parquet"
FEATURE_CONTEXTS = f"{RESULTS}/features/{{sae_set}}/feature_contexts.parquet"
FEATURE_PAGES = f"{RESULTS}/features/{{sae_set}}/pages"

# Attention-head patching (bugscope.patching, workflow/rules/patching.smk). `{group}` is a layer
# group such as `L00_07` (bugscope.config.layer_groups, resources.layers_per_job layers per job).
PATCHING_SWEEP_GROUP = f"{RESULTS}/patching/sweep/{{group}}.parquet"
PATCHING_SUBSETS_PROMPTS = f"{RESULTS}/patching/subsets.parquet"
PATCHING_PROMPTS = f"{RESULTS}/patching/heads_prompts.parquet"
PATCHING_SUMMARY = f"{RESULTS}/patching/heads.parquet"
PATCHING_ORIGINAL_METHOD_PROMPTS = f"{RESULTS}/patching/original_method_prompts.parquet"
PATCHING_ORIGINAL_METHOD = f"{RESULTS}/patching/original_method.parquet"
# The focus-layer experiments (patching.replacement / exhaustive / residual_map / bidirectional).
PATCHING_REPLACEMENT_PROMPTS = f"{RESULTS}/patching/replacement_prompts.parquet"
PATCHING_REPLACEMENT = f"{RESULTS}/patching/replacement.parquet"
PATCHING_EXHAUSTIVE_PROMPTS = f"{RESULTS}/patching/subsets_exhaustive_prompts.parquet"
PATCHING_EXHAUSTIVE = f"{RESULTS}/patching/subsets_exhaustive.parquet"
PATCHING_RESIDUAL_MAP_PROMPTS = f"{RESULTS}/patching/residual_map_prompts.parquet"
PATCHING_RESIDUAL_MAP = f"{RESULTS}/patching/residual_map.parquet"
PATCHING_BIDIRECTIONAL_PROMPTS = f"{RESULTS}/patching/bidirectional_prompts.parquet"
PATCHING_BIDIRECTIONAL = f"{RESULTS}/patching/bidirectional.parquet"
PATCHING_LISTED_PAIRS = f"{RESULTS}/patching/listed_pairs.parquet"

# SAE-feature interventions (bugscope.interventions, workflow/rules/interventions.smk): every SAE set
# the stage runs on in one table (column sae_set).
INTERVENTIONS_PROMPTS = f"{RESULTS}/interventions/features_prompts.parquet"
INTERVENTIONS = f"{RESULTS}/interventions/features.parquet"
# The critical SAE features each even-head set turns on at the focus layers (bugscope.interventions.head_set_features)
HEAD_SET_FEATURES_PROMPTS = f"{RESULTS}/interventions/head_set_features_prompts.parquet"
HEAD_SET_FEATURES = f"{RESULTS}/interventions/head_set_features.parquet"
# The original procedure with generation, and the gap to the per-head method one factor at a time
PATCHING_ORIGINAL_DECOMPOSITION_PROMPTS = f"{RESULTS}/patching/original_decomposition_prompts.parquet"
PATCHING_ORIGINAL_DECOMPOSITION = f"{RESULTS}/patching/original_decomposition.parquet"

# Figures, report tables and the claims ledger (bugscope.figures, bugscope.claims, workflow/rules/figures.smk)
FIGURE = f"{RESULTS}/figures/{{name}}.{{ext}}"
REPORT_TABLE = f"{RESULTS}/tables/{{name}}.html"
CLAIMS = f"{RESULTS}/claims.parquet"
# The ground truth: the verdicts against the claims file's expectations (bugscope.claims.truth)
CLAIMS_TRUTH = f"{RESULTS}/claims_truth.parquet"
CLAIMS_MARKDOWN = f"{RESULTS}/claims.md"
CLAIMS_HTML = f"{RESULTS}/claims.html"

LOGS = "logs"
BENCHMARKS = "benchmarks"

# The planted organism (bugscope.organism, workflow/rules/organism.smk): its checkpoint and manifest,
# then its whole study in the same layout under results/organism/ (logs and benchmarks likewise),
# made by the workflow's own rules used a second time as a Snakemake module with these prefixes.
ORGANISM = "organism"
ORGANISM_PREFIXES = {f"{root}/": f"{root}/{ORGANISM}/" for root in (RESULTS, LOGS, BENCHMARKS)}
# Whether the organism's study finds the planted layer and heads (bugscope.organism.localise)
ORGANISM_LOCALISATION = f"{RESULTS}/{ORGANISM}/localisation.parquet"
ORGANISM_LOCALISATION_HTML = f"{RESULTS}/{ORGANISM}/tables/localisation.html"


def organism(path: str) -> str:
    """The organism's copy of a layout path (results/x -> results/organism/x)."""
    for prefix, replaced in ORGANISM_PREFIXES.items():
        if path.startswith(prefix):
            return replaced + path[len(prefix):]
    raise ValueError(f"{path!r} is not under {', '.join(ORGANISM_PREFIXES)}")


def activations(dataset: str, hook: str) -> str:
    return ACTIVATIONS.format(dataset=dataset, hook=hook)


def per_set(template: str, sae_set: str, **wildcards) -> str:
    """A per-set path (`{sae_set}` filled; other wildcards such as `hook` filled when given)."""
    return template.format(sae_set=sae_set, **wildcards) if wildcards else template.replace("{sae_set}", sae_set)


def figure(name: str, ext: str) -> str:
    return FIGURE.format(name=name, ext=ext)
