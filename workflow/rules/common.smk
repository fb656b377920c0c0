# Parsing imports only light modules (no torch, transformers, SAE-Lens or Polars): every
# `snakemake` call, a no-op rerun included, pays for them. Heavy imports belong in the scripts
# (tests/test_structure.py checks this).
import bugscope.layout as layout
from bugscope.config import (
    validate_config,
    analysed_layers,
    attribution_layers as attribution_layers_for,
    head_set_feature_sets,
    layer_groups,
    primary_sae_set,
    sae_sets,
    stage_hash,
)
from bugscope.model.sites import HEAD_WRITTEN_SITES, hook_name, parse_hook_name
import bugscope.claims.spec as bugscope_ledger
import bugscope.run.resources as bugscope_resources

# Validate once at start-up; every default is filled in, so rules read keys without fallbacks.
config.update(validate_config(config, source="the Snakemake config"))

LAYERS = analysed_layers(config)
# The SAE sets by name, primary first; each reads one site at its layers (bugscope.config.sae_sets).
SAE_SETS = {s["name"]: s for s in sae_sets(config)}
PRIMARY_SET = primary_sae_set(config)


def set_hooks(sae_set, layers=None):
    """The hooks an SAE set reads, at its layers (or at `layers`)."""
    s = SAE_SETS[sae_set]
    return [
        hook_name(layer, s["site"])
        for layer in (s["layers"] if layers is None else layers)
    ]


# Every hook some set reads: one cache job fills them all in one forward pass per batch.
HOOKS = sorted(
    {hook for name in SAE_SETS for hook in set_hooks(name)},
    key=lambda h: (parse_hook_name(h)[0], h),
)
# The per-layer model stages (SAEs, head sweep) run one job per group of layers.
LAYER_GROUPS = layer_groups(LAYERS, config["resources"]["layers_per_job"])


wildcard_constraints:
    hook=r"blocks\.\d+\.hook_(resid_post|mlp_out|attn_out)",
    dataset=r"prompts|corpus",


localrules:
    all,
    prepare_model,
    build_prompts,


def final_outputs():
    """The default target: every table, figure, report table and the claims ledger."""
    return [
        layout.BASELINE_ACCURACY,
        layout.BASELINE_CONTRAST,
        layout.BASELINE_GENERATION,
        *[layout.activations("prompts", hook) for hook in HOOKS],
        *[path for name in SAE_SETS for path in set_features(name)],
        layout.SAE_QUALITY,
        *feature_targets(),
        *patching_targets(),
        *intervention_targets(),
        *head_set_feature_targets(),
        *figure_targets(),
    ]


def feature_targets():
    """The feature-analysis tables and the feature pages of every SAE set (workflow/rules/features.smk)."""
    return [
        layout.per_set(template, name)
        for name in SAE_SETS
        for template in [*feature_tables(name).values(), layout.FEATURE_PAGES]
    ]


def named_layers(sae_set):
    return sorted(int(layer) for layer in SAE_SETS[sae_set]["named"])


def attribution_layers(sae_set):
    return attribution_layers_for(config, SAE_SETS[sae_set]["layers"])


def set_features(sae_set, layers=None):
    """The feature tables of a set, one per layer (all of its layers, or `layers`)."""
    return [
        layout.per_set(layout.FEATURES, sae_set, hook=hook)
        for hook in set_hooks(sae_set, layers)
    ]


def feature_tables(sae_set):
    """The feature-analysis tables of one set, by output name; no head attribution on a site that
    heads have no direct path into (mlp_out)."""
    tables = {
        "overlap": layout.FEATURE_OVERLAP,
        "pairs": layout.FEATURE_OVERLAP_PAIRS,
        "discriminative": layout.DISCRIMINATIVE_FEATURES,
        "named": layout.NAMED_FEATURES,
        # feature_pages (its pages folder: feature_targets)
        "tokens": layout.FEATURE_TOKENS,
        "contexts": layout.FEATURE_CONTEXTS,
    }
    if SAE_SETS[sae_set]["site"] in HEAD_WRITTEN_SITES:
        tables["attribution"] = layout.HEAD_FEATURE_ATTRIBUTION
        tables["parity"] = layout.HEAD_PARITY
    return tables


# Threads of a job that runs the model (torch intra-op threads; cpus_per_task on SLURM).
MODEL_JOB_THREADS = bugscope_resources.MODEL_JOB_THREADS

# The stages up to the feature overlap, which picks the focus layers, are the DAG's longest chain:
# most model jobs wait for it, so a job of it starts before any other job that is ready.
SAE_CHAIN_PRIORITY = 10


# Whether model jobs started on this host run on a GPU, looked up once (bugscope.run.resources.gpu_visible).
GPU_ON_THIS_HOST = bugscope_resources.gpu_visible(config["device"])


def holds_gpu():
    """Whether a model job holds the GPU it asks for (job_resources; the local profile caps them at
    one): always on a cluster, locally only on a host with a GPU. Without one the model jobs ask for
    none and run side by side, one thread each, up to --cores. Called when the DAG is built, since
    while this file is parsed workflow.local_exec is true even for a SLURM run."""
    return not workflow.local_exec or GPU_ON_THIS_HOST


def model_job_resources(rule, group_layers=None, sae_set=None):
    """Resources of a job that runs the model or an SAE (bugscope.run.resources.job_resources).

    `rule` is the stage (`encode_features` for encode_features_main_L00_03), `group_layers` the
    layers of a per-group job, `sae_set` the name of an SAE job's set. Runtime and memory grow with
    the attempt, so a job retried after hitting its time or memory limit (`retries` in the SLURM
    profile) gets twice as much.
    """
    first = bugscope_resources.job_resources(
        config, rule, group_layers, SAE_SETS[sae_set] if sae_set else None
    )
    return {
        "gpu": lambda wildcards: first["gpu"] if holds_gpu() else 0,
        "runtime": lambda wildcards, attempt: first["runtime"] * attempt,
        "mem_mb": lambda wildcards, attempt: first["mem_mb"] * attempt,
        "cpus_per_task": first["cpus_per_task"],
    }


# --- figures, report tables and the claims ledger (workflow/rules/figures.smk) ------------------


# The figures (one rule fig_<name> each in figures.smk) and the tables the report shows.
FIGURES = [
    "baseline_accuracy",
    "feature_overlap",
    "amplification",
    "format_features",
    "sae_quality",
    "head_sweep",
    "head_subsets",
    "head_attribution",
    *(["original_method"] if config["patching"]["original_method"] else []),
    *[
        figure
        for figure, rule in {
            "replacement": "head_replacement",
            "residual_map": "residual_map",
            "subsets_exhaustive": "head_subsets_exhaustive",
        }.items()
        if bugscope_resources.patch_experiment_enabled(config, rule)
    ],
    *(["interventions"] if config["interventions"]["enabled"] else []),
    *(["head_set_features"] if head_set_feature_sets(config) else []),
    *(
        ["original_decomposition"]
        if config["patching"]["original_generation"]["enabled"]
        else []
    ),
]
REPORT_TABLES = {
    "baseline_accuracy": layout.BASELINE_ACCURACY,
    "feature_overlap": layout.per_set(layout.FEATURE_OVERLAP, PRIMARY_SET),
    "named_features": layout.per_set(layout.NAMED_FEATURES, PRIMARY_SET),
    "sae_quality": layout.SAE_QUALITY,
}


def figure_targets():
    """Every figure in SVG, PNG and HTML, the report tables and the ledger."""
    return [
        *[
            layout.figure(name, ext)
            for name in FIGURES
            for ext in ("svg", "png", "html")
        ],
        *[layout.REPORT_TABLE.format(name=name) for name in REPORT_TABLES],
        layout.CLAIMS,
        layout.CLAIMS_MARKDOWN,
        layout.CLAIMS_HTML,
    ]


def figure_outputs(name, category):
    """The SVG, PNG and HTML outputs of a figure rule; SVG (inline) and HTML (interactive) go in the report."""
    caption = f"../report/{name}.rst"
    return {
        "svg": report(
            layout.figure(name, "svg"),
            caption=caption,
            category=category,
            labels={"figure": name, "file": "SVG"},
        ),
        "png": layout.figure(name, "png"),
        "html": report(
            layout.figure(name, "html"),
            caption=caption,
            category=category,
            labels={"figure": name, "file": "interactive HTML"},
        ),
    }


def claims_table_sets():
    """The SAE sets whose file the ledger reads, per table: [None] for a table that is not per set."""
    return {
        name: (
            [s for s in SAE_SETS if spec.path in feature_tables(s).values()]
            if "{sae_set}" in spec.path
            else [None] if table_is_made(spec.path) else []
        )
        for name, spec in bugscope_ledger.TABLES.items()
    }


def table_is_made(path):
    """False for the table of a stage the config turns off: the ledger does not wait for it."""
    for rule, paths in PATCH_EXPERIMENT_TABLES.items():
        if path in paths:
            return bugscope_resources.patch_experiment_enabled(config, rule)
    if path == layout.PATCHING_ORIGINAL_DECOMPOSITION:
        return config["patching"]["original_generation"]["enabled"]
    if path == layout.HEAD_SET_FEATURES:
        return bool(head_set_feature_sets(config))
    return path != layout.INTERVENTIONS or config["interventions"]["enabled"]


def claims_inputs(wildcards):
    """The ledger file, the prompt table and every table the ledger tests (per-set tables: one
    file per set that produces it, in the order of claims_table_sets)."""
    tables = {
        name: [
            (
                layout.per_set(bugscope_ledger.TABLES[name].path, s)
                if s
                else bugscope_ledger.TABLES[name].path
            )
            for s in sets
        ]
        for name, sets in claims_table_sets().items()
    }
    return {"ledger": CLAIMS_LEDGER, "prompts": layout.PROMPTS, **tables}


# --- attention-head patching (workflow/rules/patching.smk) ---------------------------------------


# The summary tables of each focus-layer experiment rule (patching.smk), for the targets and the ledger.
PATCH_EXPERIMENT_TABLES = {
    "head_replacement": [layout.PATCHING_REPLACEMENT],
    "head_subsets_exhaustive": [layout.PATCHING_EXHAUSTIVE],
    "residual_map": [layout.PATCHING_RESIDUAL_MAP],
    "head_bidirectional": [layout.PATCHING_BIDIRECTIONAL, layout.PATCHING_LISTED_PAIRS],
}


def patching_targets():
    """The head-patching summary, (patching.original_method) the original-method comparison and
    the enabled focus-layer experiments (patching.replacement / exhaustive / residual_map /
    bidirectional)."""
    out = [layout.PATCHING_SUMMARY]
    if config["patching"]["original_method"]:
        out.append(layout.PATCHING_ORIGINAL_METHOD)
    for rule, paths in PATCH_EXPERIMENT_TABLES.items():
        if bugscope_resources.patch_experiment_enabled(config, rule):
            out += paths
    if config["patching"]["original_generation"]["enabled"]:
        out.append(layout.PATCHING_ORIGINAL_DECOMPOSITION)
    return out


def focus_layer_input(wildcards):
    """The overlap table, when focus_layers is auto: it resolves the focus layers
    (bugscope.features.overlap.resolve_focus_layers) for patching, figures and the ledger.
    """
    if config["focus_layers"] == "auto":
        return {"overlap": layout.per_set(layout.FEATURE_OVERLAP, PRIMARY_SET)}
    return {}


# --- SAE-feature interventions (workflow/rules/interventions.smk) --------------------------------


def intervention_targets():
    """The interventions tables, when interventions.enabled."""
    if not config["interventions"]["enabled"]:
        return []
    return [layout.INTERVENTIONS, layout.INTERVENTIONS_PROMPTS]


def head_set_feature_targets():
    """The head-set feature counts, when a residual SAE set and patching.exhaustive are on."""
    if not head_set_feature_sets(config):
        return []
    return [layout.HEAD_SET_FEATURES, layout.HEAD_SET_FEATURES_PROMPTS]
