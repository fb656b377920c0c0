# Parsing imports only light modules (no torch, transformers, SAE-Lens or Polars): every
# `snakemake` call, a no-op rerun included, pays for them. Heavy imports belong in the scripts
# (tests/test_structure.py checks this).
import bugscope.layout as layout
from bugscope.config import (
    validate_config,
    analysed_layers,
    attribution_layers as attribution_layers_for,
    layer_groups,
    primary_sae_set,
    sae_sets,
    set_layers,
    stage_hash,
)
from bugscope.run import stages
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
    return stages.hooks(config, s if layers is None else {**s, "layers": layers})


# Every hook some set reads: one cache job fills them all in one forward pass per batch.
HOOKS = stages.hooks(config)
# The per-layer model stages (SAEs, head sweep) run one job per group of layers.
LAYER_GROUPS = layer_groups(LAYERS, config["resources"]["layers_per_job"])


wildcard_constraints:
    hook=r"blocks\.\d+\.hook_(resid_post|mlp_out|attn_out)",
    dataset=r"prompts|reading|corpus",


def final_outputs():
    """The default target: every output of the stages the config runs (bugscope.run.stages.targets)."""
    return stages.targets(config)


def named_layers(sae_set):
    """The layers of a set's named features: those its config names, or (none named) every layer of
    the set, whose ids the named stage then picks from this run's discriminative table.
    """
    named = SAE_SETS[sae_set]["named"]
    return (
        sorted(int(layer) for layer in named)
        if named
        else set_layers(config, SAE_SETS[sae_set])
    )


def attribution_layers(sae_set):
    return attribution_layers_for(config, SAE_SETS[sae_set]["layers"])


def set_features(sae_set, layers=None):
    """The feature tables of a set, one per layer (all of its layers, or `layers`)."""
    return [
        layout.per_set(layout.FEATURES, sae_set, hook=hook)
        for hook in set_hooks(sae_set, layers)
    ]


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


# The report tables by name (rule report_table; bugscope.run.stages declares them with the figures).
REPORT_TABLES = stages.report_tables(config)


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
    """The SAE sets whose file the ledger reads, per table: [None] for a table that is not per set
    (bugscope.run.stages.claims_table_sets: none for a stage the config turns off)."""
    return stages.claims_table_sets(
        config, {name: spec.path for name, spec in bugscope_ledger.TABLES.items()}
    )


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


def focus_layer_input(wildcards):
    """The overlap table, when focus_layers is auto: it resolves the focus layers
    (bugscope.features.overlap.resolve_focus_layers) for patching, figures and the ledger.
    """
    if config["focus_layers"] == "auto":
        return {"overlap": layout.per_set(layout.FEATURE_OVERLAP, PRIMARY_SET)}
    return {}
