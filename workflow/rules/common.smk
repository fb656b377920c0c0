import bugscope.layout as layout
from bugscope.config import validate_config, analysed_layers, config_hash
from bugscope.sites import hook_name
import bugscope.patching as bugscope_patching

# Validate once at start-up; every default is filled in, so rules read keys without fallbacks.
config.update(validate_config(config, source="the Snakemake config"))

LAYERS = analysed_layers(config)
SITE = config["cache"]["site"]
HOOKS = [hook_name(layer, SITE) for layer in LAYERS]


wildcard_constraints:
    hook=r"blocks\.\d+\.hook_(resid_post|mlp_out|attn_out)",
    dataset=r"prompts|corpus",


localrules:
    all,
    prepare_model,
    build_prompts,


def final_outputs():
    return [
        layout.BASELINE_ACCURACY,
        layout.BASELINE_GENERATION,
        *[layout.activations("prompts", hook) for hook in HOOKS],
        *[layout.FEATURES.format(hook=hook) for hook in HOOKS],
        layout.SAE_QUALITY,
        figure_targets,
        feature_targets,
        patching_targets,
    ]


def feature_targets(wildcards):
    """The feature-analysis tables (workflow/rules/features.smk), once rules produce their inputs
    (the SAE stage's feature tables and SAEs), so the stages can land one at a time."""
    if not all(producible(layout.FEATURES.format(hook=hook)) for hook in HOOKS):
        return []
    out = [layout.FEATURE_OVERLAP, layout.FEATURE_OVERLAP_PAIRS, layout.DISCRIMINATIVE_FEATURES, layout.NAMED_FEATURES]
    if all(producible(layout.SAE_DIR.format(hook=hook_name(layer, SITE))) for layer in ATTRIBUTION_LAYERS):
        out += [layout.HEAD_FEATURE_ATTRIBUTION, layout.HEAD_PARITY]
    return out


def model_job_resources(n_prompts_hint=None, n_layers=1):
    """Resources of a job that runs the model: the one place that sizes GPU jobs.

    Scales with model size (billions of parameters), the number of prompts and the layers the job
    handles, so a config change resizes every GPU rule consistently. Runtime and memory grow with
    the attempt, so a job retried after hitting its time or memory limit (`retries` in the SLURM
    profile) gets twice as much.
    """
    size_b = config["model"]["size_b"]
    prompts = config["prompts"]
    n_prompts = n_prompts_hint or len(prompts["formats"]) * 2 * (prompts["n_pairs"] + len(prompts["extra_pairs"]))
    scale = config["resources"]["minutes_per_b_per_100_prompts"]
    runtime = int(10 + scale * max(size_b, 0.1) * (n_prompts / 100) * max(1, n_layers / 8))
    weights_mb = int(size_b * 1000 * (4 if config["model"]["dtype"] == "float32" else 2))
    return {
        "gpu": 1,
        "runtime": lambda wildcards, attempt: runtime * attempt,
        "mem_mb": lambda wildcards, attempt: (4000 + 2 * weights_mb) * attempt,
        "cpus_per_task": 2,
    }


# --- figures, report tables and the claims ledger (workflow/rules/figures.smk) ------------------


def producible(path):
    """True when a rule of this workflow writes `path` (a stage that has not landed has none)."""
    return any(rule.is_producer(path) for rule in workflow.rules)


def available(path):
    """`path` and the upstream stage output it depends on (TABLE_ROOTS) both have a rule."""
    return producible(path) and all(producible(root) for root in TABLE_ROOTS.get(path, []))


def figure_targets(wildcards):
    """Input function of `all`: every figure and report table whose tables are available, and the ledger.

    Evaluated when the DAG is built, after every rules file is read.
    """
    out = [layout.CLAIMS, layout.CLAIMS_MARKDOWN, layout.CLAIMS_HTML]
    for name, tables in FIGURES.items():
        if all(available(t) for t in tables):
            out += [layout.figure(name, ext) for ext in ("svg", "png", "html")]
    out += [layout.REPORT_TABLE.format(name=name) for name, table in REPORT_TABLES.items() if available(table)]
    return out


def figure_outputs(name, category):
    """The SVG, PNG and HTML outputs of a figure rule; SVG (inline) and HTML (interactive) go in the report."""
    caption = f"../report/{name}.rst"
    return {
        "svg": report(layout.figure(name, "svg"), caption=caption, category=category,
                      labels={"figure": name, "file": "SVG"}),
        "png": layout.figure(name, "png"),
        "html": report(layout.figure(name, "html"), caption=caption, category=category,
                       labels={"figure": name, "file": "interactive HTML"}),
    }


def claims_inputs(wildcards):
    """The ledger file, the prompt table and every table the ledger tests that this workflow can produce."""
    tables = {name: spec.path for name, spec in bugscope_claims.TABLES.items()
              if spec.path is not None and available(spec.path)}
    if config["focus_layers"] == "auto" and available(layout.FEATURE_OVERLAP):
        tables["feature_overlap"] = layout.FEATURE_OVERLAP
    return {"ledger": CLAIMS_LEDGER, "prompts": layout.PROMPTS, **tables}


# --- attention-head patching (workflow/rules/patching.smk) ---------------------------------------

PATCH_GROUPS = bugscope_patching.layer_groups(LAYERS, config["resources"]["layers_per_job"])


def patching_targets(wildcards):
    """The head-patching summary and (patching.seed_method) the seed-method comparison."""
    out = [layout.PATCHING_SUMMARY]
    if config["patching"]["seed_method"]:
        out.append(layout.PATCHING_SEED_METHOD)
    return out


def patching_focus_input(wildcards):
    """The overlap table, when focus_layers is auto and this workflow can produce it.

    Without it (the overlap stage has no rule, or its SAE inputs have none), focus_layers "auto"
    falls back to the middle layer (bugscope.patching.focus_layer_fallback); outputs record which.
    """
    if config["focus_layers"] == "auto" and available(layout.FEATURE_OVERLAP):
        return {"overlap": layout.FEATURE_OVERLAP}
    return {}
