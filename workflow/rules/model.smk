rule prepare_model:
    output:
        manifest=layout.MODEL_MANIFEST,
    log:
        f"{layout.LOGS}/prepare_model.log",
    localrule: True
    conda:
        "../../environment.yml"
    params:
        model=config["model"],
        checkpoint_dir=layout.MODEL_CHECKPOINT,
    script:
        "../scripts/prepare_model.py"


rule build_prompts:
    input:
        manifest=layout.MODEL_MANIFEST,
    output:
        prompts=layout.PROMPTS,
    log:
        f"{layout.LOGS}/build_prompts.log",
    localrule: True
    conda:
        "../../environment.yml"
    params:
        config_hash=stage_hash(config, "prompts"),
    script:
        "../scripts/build_prompts.py"


rule baseline:
    input:
        manifest=layout.MODEL_MANIFEST,
        prompts=layout.PROMPTS,
    output:
        scores=layout.BASELINE_SCORES,
        accuracy=layout.BASELINE_ACCURACY,
        contrast=layout.BASELINE_CONTRAST,
        generation=layout.BASELINE_GENERATION,
        lens_prompts=layout.LENS_PROMPTS,
        lens=layout.LENS,
    log:
        f"{layout.LOGS}/baseline.log",
    benchmark:
        f"{layout.BENCHMARKS}/baseline.tsv"
    conda:
        "../../environment.yml"
    threads: MODEL_JOB_THREADS
    resources:
        **model_job_resources("baseline"),
    params:
        config_hash=stage_hash(config, "baseline"),
    script:
        "../scripts/baseline.py"


rule cache_residuals:
    input:
        manifest=layout.MODEL_MANIFEST,
        prompts=layout.PROMPTS,
    output:
        activations=[layout.activations("prompts", hook) for hook in HOOKS],
    log:
        f"{layout.LOGS}/cache_residuals.log",
    benchmark:
        f"{layout.BENCHMARKS}/cache_residuals.tsv"
    priority: SAE_CHAIN_PRIORITY
    conda:
        "../../environment.yml"
    threads: MODEL_JOB_THREADS
    resources:
        **model_job_resources("cache_residuals"),
    params:
        hooks=HOOKS,
        config_hash=stage_hash(config, "activations"),
    script:
        "../scripts/cache_residuals.py"
