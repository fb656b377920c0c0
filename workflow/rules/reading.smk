# Version or date reading (research notes section 11; Transluce's hypothesis). Logic:
# bugscope.data.reading (families, closeness probe, summaries), bugscope.model.steering (the
# direction projected out). The families are their own prompt table; the model job scores them,
# caches their residual stream and runs the causal test; the light job fits the probe and summarises.


rule build_reading_prompts:
    input:
        manifest=layout.MODEL_MANIFEST,
        prompts=layout.PROMPTS,
    output:
        prompts=layout.READING_PROMPTS,
    log:
        f"{layout.LOGS}/build_reading_prompts.log",
    localrule: True
    conda:
        "../../environment.yml"
    params:
        config_hash=stage_hash(config, "reading_prompts"),
    script:
        "../scripts/build_reading_prompts.py"


from bugscope.config import reading_feature_layers

# The steered layers whose reading features (the primary SAE set's) are tested and ablated.
READING_FEATURE_LAYERS = reading_feature_layers(config)


rule reading:
    input:
        manifest=layout.MODEL_MANIFEST,
        prompts=layout.PROMPTS,
        reading_prompts=layout.READING_PROMPTS,
        saes=[
            layout.per_set(layout.SAE_DIR, PRIMARY_SET, hook=hook)
            for hook in set_hooks(PRIMARY_SET, READING_FEATURE_LAYERS)
        ],
    output:
        scores=layout.READING_SCORES,
        features=layout.READING_FEATURES,
        feature_prompts=layout.READING_FEATURE_PROMPTS,
        activations=[
            layout.activations("reading", hook) for hook in stages.probe_hooks(config)
        ],
    log:
        f"{layout.LOGS}/reading.log",
    benchmark:
        f"{layout.BENCHMARKS}/reading.tsv"
    conda:
        "../../environment.yml"
    threads: MODEL_JOB_THREADS
    resources:
        **model_job_resources("reading"),
    params:
        hooks=stages.probe_hooks(config),
        feature_layers=READING_FEATURE_LAYERS,
        config_hash=stage_hash(config, "reading_model"),
    script:
        "../scripts/reading.py"


rule reading_summary:
    input:
        prompts=layout.PROMPTS,
        reading_prompts=layout.READING_PROMPTS,
        scores=layout.READING_SCORES,
        baseline=layout.BASELINE_SCORES,
        activations=[
            layout.activations("prompts", hook) for hook in stages.probe_hooks(config)
        ],
        reading_activations=[
            layout.activations("reading", hook) for hook in stages.probe_hooks(config)
        ],
        features=layout.READING_FEATURES,
        feature_prompts=layout.READING_FEATURE_PROMPTS,
        # the analysis prompts' SAE codes at the feature layers (their decision positions)
        feature_codes=set_features(PRIMARY_SET, READING_FEATURE_LAYERS),
    output:
        accuracy=layout.READING_ACCURACY,
        closeness_prompts=layout.READING_CLOSENESS_PROMPTS,
        closeness=layout.READING_CLOSENESS,
        steering=layout.READING_STEERING,
        feature_summary=layout.READING_FEATURE_SUMMARY,
    log:
        f"{layout.LOGS}/reading_summary.log",
    benchmark:
        f"{layout.BENCHMARKS}/reading_summary.tsv"
    localrule: True
    conda:
        "../../environment.yml"
    params:
        config_hash=stage_hash(config, "reading"),
    script:
        "../scripts/reading_summary.py"
