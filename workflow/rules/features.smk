# Feature analyses: overlap between formats, discriminative and named features, and the
# direct attribution of attention heads to SAE features. Logic: bugscope.features and bugscope.attribution.
import bugscope.features as bugscope_features

bugscope_features.check_config(config)

FEATURE_CONFIG_HASH = stage_hash(config, "features")
NAMED_LAYERS = sorted(int(layer) for layer in config["features"]["named"])
ATTRIBUTION_LAYERS = bugscope_features.attribution_layers(config)


localrules:
    feature_overlap,
    discriminative_features,
    named_features,


rule feature_overlap:
    input:
        prompts=layout.PROMPTS,
        features=[layout.FEATURES.format(hook=hook) for hook in HOOKS],
    output:
        overlap=layout.FEATURE_OVERLAP,
        pairs=layout.FEATURE_OVERLAP_PAIRS,
    log:
        f"{layout.LOGS}/features/feature_overlap.log",
    benchmark:
        f"{layout.BENCHMARKS}/features/feature_overlap.tsv"
    conda:
        "../../environment.yml"
    params:
        layers=LAYERS,
        config_hash=FEATURE_CONFIG_HASH,
    script:
        "../scripts/feature_overlap.py"


rule discriminative_features:
    input:
        prompts=layout.PROMPTS,
        scores=layout.BASELINE_SCORES,
        features=[layout.FEATURES.format(hook=hook) for hook in HOOKS],
    output:
        discriminative=layout.DISCRIMINATIVE_FEATURES,
    log:
        f"{layout.LOGS}/features/discriminative_features.log",
    benchmark:
        f"{layout.BENCHMARKS}/features/discriminative_features.tsv"
    conda:
        "../../environment.yml"
    params:
        layers=LAYERS,
        config_hash=FEATURE_CONFIG_HASH,
    script:
        "../scripts/discriminative_features.py"


rule named_features:
    input:
        prompts=layout.PROMPTS,
        features=[
            layout.FEATURES.format(hook=hook_name(layer, SITE))
            for layer in NAMED_LAYERS
        ],
    output:
        named=layout.NAMED_FEATURES,
    log:
        f"{layout.LOGS}/features/named_features.log",
    conda:
        "../../environment.yml"
    params:
        layers=NAMED_LAYERS,
        config_hash=FEATURE_CONFIG_HASH,
    script:
        "../scripts/named_features.py"


rule head_feature_attribution:
    input:
        manifest=layout.MODEL_MANIFEST,
        prompts=layout.PROMPTS,
        discriminative=layout.DISCRIMINATIVE_FEATURES,
        saes=[
            layout.SAE_DIR.format(hook=hook_name(layer, SITE))
            for layer in ATTRIBUTION_LAYERS
        ],
    output:
        attribution=layout.HEAD_FEATURE_ATTRIBUTION,
        parity=layout.HEAD_PARITY,
    log:
        f"{layout.LOGS}/features/head_feature_attribution.log",
    benchmark:
        f"{layout.BENCHMARKS}/features/head_feature_attribution.tsv"
    conda:
        "../../environment.yml"
    threads: MODEL_JOB_THREADS
    resources:
        **model_job_resources("head_feature_attribution"),
    params:
        layers=ATTRIBUTION_LAYERS,
        config_hash=FEATURE_CONFIG_HASH,
    script:
        "../scripts/head_feature_attribution.py"
