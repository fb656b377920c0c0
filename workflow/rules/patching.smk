# Attention-head patching: true per-head patching swept over layers and head sets, random
# head subsets at the focus layers, and the original method beside per-head patching. Logic:
# bugscope.patching; layer groups and the focus-layer input: workflow/rules/common.smk.

# The sweep does not depend on focus_layers; the focus-layer rules do.
PATCH_SWEEP_HASH = stage_hash(config, "patching_sweep")
PATCH_FOCUS_HASH = stage_hash(config, "patching_focus")
PATCH_SUMMARY_HASH = stage_hash(config, "patching_summary")


# One rule per layer group, named <stage>_<group> like the SAE stage's (workflow/rules/sae.smk).
for group, group_layers in LAYER_GROUPS.items():

    rule:
        name:
            f"head_sweep_{group}"
        input:
            manifest=layout.MODEL_MANIFEST,
            prompts=layout.PROMPTS,
        output:
            prompts=layout.PATCHING_SWEEP_GROUP.format(group=group),
        log:
            f"{layout.LOGS}/patching/head_sweep_{group}.log",
        benchmark:
            f"{layout.BENCHMARKS}/patching/head_sweep_{group}.tsv"
        conda:
            "../../environment.yml"
        threads: MODEL_JOB_THREADS
        resources:
            **model_job_resources("head_sweep", group_layers),
        params:
            mode="sweep",
            layers=group_layers,
            group=group,
            config_hash=PATCH_SWEEP_HASH,
        script:
            "../scripts/head_patching.py"


rule head_subsets:
    input:
        unpack(focus_layer_input),
        manifest=layout.MODEL_MANIFEST,
        prompts=layout.PROMPTS,
    output:
        prompts=layout.PATCHING_SUBSETS_PROMPTS,
    log:
        f"{layout.LOGS}/patching/head_subsets.log",
    benchmark:
        f"{layout.BENCHMARKS}/patching/head_subsets.tsv"
    conda:
        "../../environment.yml"
    threads: MODEL_JOB_THREADS
    resources:
        **model_job_resources("head_subsets"),
    params:
        mode="subsets",
        config_hash=PATCH_FOCUS_HASH,
    script:
        "../scripts/head_patching.py"


rule head_original_method:
    input:
        unpack(focus_layer_input),
        manifest=layout.MODEL_MANIFEST,
        prompts=layout.PROMPTS,
    output:
        prompts=layout.PATCHING_ORIGINAL_METHOD_PROMPTS,
        summary=layout.PATCHING_ORIGINAL_METHOD,
    log:
        f"{layout.LOGS}/patching/head_original_method.log",
    benchmark:
        f"{layout.BENCHMARKS}/patching/head_original_method.tsv"
    conda:
        "../../environment.yml"
    threads: MODEL_JOB_THREADS
    resources:
        **model_job_resources("head_original_method"),
    params:
        mode="original_method",
        config_hash=PATCH_FOCUS_HASH,
    script:
        "../scripts/head_patching.py"


rule head_patching_summary:
    input:
        sweep=[
            layout.PATCHING_SWEEP_GROUP.format(group=group) for group in LAYER_GROUPS
        ],
        subsets=layout.PATCHING_SUBSETS_PROMPTS,
        scores=layout.BASELINE_SCORES,
    output:
        prompts=layout.PATCHING_PROMPTS,
        summary=layout.PATCHING_SUMMARY,
    log:
        f"{layout.LOGS}/patching/head_patching_summary.log",
    localrule: True
    conda:
        "../../environment.yml"
    params:
        config_hash=PATCH_SUMMARY_HASH,
    script:
        "../scripts/head_patching_summary.py"


# The focus-layer experiments of bugscope.patching.study, one rule each so that each reruns
# alone when its settings change (STAGE_SECTIONS: patching_<experiment>).


rule head_replacement:
    input:
        unpack(focus_layer_input),
        manifest=layout.MODEL_MANIFEST,
        prompts=layout.PROMPTS,
        scores=layout.BASELINE_SCORES,
    output:
        prompts=layout.PATCHING_REPLACEMENT_PROMPTS,
        summary=layout.PATCHING_REPLACEMENT,
    log:
        f"{layout.LOGS}/patching/head_replacement.log",
    benchmark:
        f"{layout.BENCHMARKS}/patching/head_replacement.tsv"
    conda:
        "../../environment.yml"
    threads: MODEL_JOB_THREADS
    resources:
        **model_job_resources("head_replacement"),
    params:
        mode="replacement",
        config_hash=stage_hash(config, "patching_replacement"),
    script:
        "../scripts/patch_experiments.py"


rule head_subsets_exhaustive:
    input:
        unpack(focus_layer_input),
        manifest=layout.MODEL_MANIFEST,
        prompts=layout.PROMPTS,
        scores=layout.BASELINE_SCORES,
    output:
        prompts=layout.PATCHING_EXHAUSTIVE_PROMPTS,
        summary=layout.PATCHING_EXHAUSTIVE,
    log:
        f"{layout.LOGS}/patching/head_subsets_exhaustive.log",
    benchmark:
        f"{layout.BENCHMARKS}/patching/head_subsets_exhaustive.tsv"
    conda:
        "../../environment.yml"
    threads: MODEL_JOB_THREADS
    resources:
        **model_job_resources("head_subsets_exhaustive"),
    params:
        mode="exhaustive",
        config_hash=stage_hash(config, "patching_exhaustive"),
    script:
        "../scripts/patch_experiments.py"


# At the analysed layers (patching.residual_map.layers), not the focus layers.
rule residual_map:
    input:
        manifest=layout.MODEL_MANIFEST,
        prompts=layout.PROMPTS,
        scores=layout.BASELINE_SCORES,
    output:
        prompts=layout.PATCHING_RESIDUAL_MAP_PROMPTS,
        summary=layout.PATCHING_RESIDUAL_MAP,
    log:
        f"{layout.LOGS}/patching/residual_map.log",
    benchmark:
        f"{layout.BENCHMARKS}/patching/residual_map.tsv"
    conda:
        "../../environment.yml"
    threads: MODEL_JOB_THREADS
    resources:
        **model_job_resources("residual_map"),
    params:
        mode="residual_map",
        config_hash=stage_hash(config, "patching_residual_map"),
    script:
        "../scripts/patch_experiments.py"


rule head_bidirectional:
    input:
        unpack(focus_layer_input),
        manifest=layout.MODEL_MANIFEST,
        prompts=layout.PROMPTS,
    output:
        prompts=layout.PATCHING_BIDIRECTIONAL_PROMPTS,
        summary=layout.PATCHING_BIDIRECTIONAL,
        listed=layout.PATCHING_LISTED_PAIRS,
    log:
        f"{layout.LOGS}/patching/head_bidirectional.log",
    benchmark:
        f"{layout.BENCHMARKS}/patching/head_bidirectional.tsv"
    conda:
        "../../environment.yml"
    threads: MODEL_JOB_THREADS
    resources:
        **model_job_resources("head_bidirectional"),
    params:
        mode="bidirectional",
        config_hash=stage_hash(config, "patching_bidirectional"),
    script:
        "../scripts/patch_experiments.py"


# The original procedure in full (generation, decode-time hook, string criterion) and the gap to
# the per-head method one factor at a time (bugscope.patching.original_method).
PATCH_ORIGINAL_HASH = stage_hash(config, "patching_original")


rule original_decomposition:
    input:
        unpack(focus_layer_input),
        manifest=layout.MODEL_MANIFEST,
        prompts=layout.PROMPTS,
    output:
        prompts=layout.PATCHING_ORIGINAL_DECOMPOSITION_PROMPTS,
        summary=layout.PATCHING_ORIGINAL_DECOMPOSITION,
    log:
        f"{layout.LOGS}/patching/original_decomposition.log",
    benchmark:
        f"{layout.BENCHMARKS}/patching/original_decomposition.tsv"
    conda:
        "../../environment.yml"
    threads: MODEL_JOB_THREADS
    resources:
        **model_job_resources("original_decomposition"),
    params:
        config_hash=PATCH_ORIGINAL_HASH,
    script:
        "../scripts/original_decomposition.py"
