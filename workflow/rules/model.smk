rule prepare_model:
    output:
        manifest=layout.MODEL_MANIFEST,
    params:
        model=config["model"],
        checkpoint_dir=layout.MODEL_CHECKPOINT,
    log:
        f"{layout.LOGS}/prepare_model.log",
    conda:
        "../../environment.yml"
    script:
        "../scripts/prepare_model.py"


rule build_prompts:
    input:
        manifest=layout.MODEL_MANIFEST,
    output:
        prompts=layout.PROMPTS,
    params:
        config_hash=stage_hash(config, "prompts"),
    log:
        f"{layout.LOGS}/build_prompts.log",
    conda:
        "../../environment.yml"
    script:
        "../scripts/build_prompts.py"


rule baseline:
    input:
        manifest=layout.MODEL_MANIFEST,
        prompts=layout.PROMPTS,
    output:
        scores=layout.BASELINE_SCORES,
        accuracy=layout.BASELINE_ACCURACY,
        generation=layout.BASELINE_GENERATION,
    params:
        config_hash=stage_hash(config, "baseline"),
    threads: MODEL_JOB_THREADS
    resources:
        **model_job_resources(),
    log:
        f"{layout.LOGS}/baseline.log",
    benchmark:
        f"{layout.BENCHMARKS}/baseline.tsv"
    conda:
        "../../environment.yml"
    script:
        "../scripts/baseline.py"


rule cache_residuals:
    input:
        manifest=layout.MODEL_MANIFEST,
        prompts=layout.PROMPTS,
    output:
        activations=[layout.activations("prompts", hook) for hook in HOOKS],
    params:
        layers=LAYERS,
        config_hash=stage_hash(config, "activations"),
    threads: MODEL_JOB_THREADS
    resources:
        **model_job_resources(n_layers=len(LAYERS)),
    log:
        f"{layout.LOGS}/cache_residuals.log",
    benchmark:
        f"{layout.BENCHMARKS}/cache_residuals.tsv"
    conda:
        "../../environment.yml"
    script:
        "../scripts/cache_residuals.py"
