# Feature analyses, once per SAE set (`{sae_set}`): overlap between formats, discriminative and
# named features, and the direct attribution of attention heads to SAE features. Logic:
# bugscope.features and bugscope.features.attribution.
# The features section's parse-time checks and layer choice live in bugscope.config (light to import).
import bugscope.config as bugscope_config

bugscope_config.check_features_config(config)

FEATURE_CONFIG_HASH = stage_hash(config, "features")


wildcard_constraints:
    sae_set="|".join(SAE_SETS),


rule feature_overlap:
    input:
        prompts=layout.PROMPTS,
        features=lambda w: set_features(w.sae_set),
    output:
        overlap=layout.FEATURE_OVERLAP,
        pairs=layout.FEATURE_OVERLAP_PAIRS,
    log:
        f"{layout.LOGS}/features/{{sae_set}}/feature_overlap.log",
    benchmark:
        f"{layout.BENCHMARKS}/features/{{sae_set}}/feature_overlap.tsv"
    priority: SAE_CHAIN_PRIORITY
    localrule: True
    conda:
        "../../environment.yml"
    params:
        sae_set=lambda w: w.sae_set,
        layers=lambda w: SAE_SETS[w.sae_set]["layers"],
        config_hash=FEATURE_CONFIG_HASH,
    script:
        "../scripts/feature_overlap.py"


rule discriminative_features:
    input:
        prompts=layout.PROMPTS,
        scores=layout.BASELINE_SCORES,
        features=lambda w: set_features(w.sae_set),
    output:
        discriminative=layout.DISCRIMINATIVE_FEATURES,
    log:
        f"{layout.LOGS}/features/{{sae_set}}/discriminative_features.log",
    benchmark:
        f"{layout.BENCHMARKS}/features/{{sae_set}}/discriminative_features.tsv"
    localrule: True
    conda:
        "../../environment.yml"
    params:
        sae_set=lambda w: w.sae_set,
        layers=lambda w: SAE_SETS[w.sae_set]["layers"],
        config_hash=FEATURE_CONFIG_HASH,
    script:
        "../scripts/discriminative_features.py"


rule named_features:
    input:
        prompts=layout.PROMPTS,
        features=lambda w: set_features(w.sae_set, named_layers(w.sae_set)),
        # a set that names no features gets this run's own top features (bugscope.features.stages)
        discriminative=layout.DISCRIMINATIVE_FEATURES,
    output:
        named=layout.NAMED_FEATURES,
    log:
        f"{layout.LOGS}/features/{{sae_set}}/named_features.log",
    localrule: True
    conda:
        "../../environment.yml"
    params:
        sae_set=lambda w: w.sae_set,
        layers=lambda w: named_layers(w.sae_set),
        config_hash=FEATURE_CONFIG_HASH,
    script:
        "../scripts/named_features.py"


rule head_feature_attribution:
    input:
        manifest=layout.MODEL_MANIFEST,
        prompts=layout.PROMPTS,
        discriminative=layout.DISCRIMINATIVE_FEATURES,
        saes=lambda w: [
            layout.per_set(layout.SAE_DIR, w.sae_set, hook=hook)
            for hook in set_hooks(w.sae_set, attribution_layers(w.sae_set))
        ],
    output:
        attribution=layout.HEAD_FEATURE_ATTRIBUTION,
        parity=layout.HEAD_PARITY,
    log:
        f"{layout.LOGS}/features/{{sae_set}}/head_feature_attribution.log",
    benchmark:
        f"{layout.BENCHMARKS}/features/{{sae_set}}/head_feature_attribution.tsv"
    conda:
        "../../environment.yml"
    threads: MODEL_JOB_THREADS
    resources:
        **model_job_resources("head_feature_attribution"),
    params:
        sae_set=lambda w: w.sae_set,
        layers=lambda w: attribution_layers(w.sae_set),
        config_hash=FEATURE_CONFIG_HASH,
    script:
        "../scripts/head_feature_attribution.py"


rule feature_pages:
    input:
        unpack(focus_layer_input),
        manifest=layout.MODEL_MANIFEST,
        prompts=layout.PROMPTS,
        corpus=layout.CORPUS,
        discriminative=layout.DISCRIMINATIVE_FEATURES,
        features=lambda w: set_features(w.sae_set),
        activations=lambda w: [
            layout.activations("corpus", hook) for hook in set_hooks(w.sae_set)
        ],
        saes=lambda w: [
            layout.per_set(layout.SAE_DIR, w.sae_set, hook=hook)
            for hook in set_hooks(w.sae_set)
        ],
    output:
        tokens=layout.FEATURE_TOKENS,
        contexts=layout.FEATURE_CONTEXTS,
        pages=report(
            directory(layout.FEATURE_PAGES),
            htmlindex="index.html",
            caption="../report/feature_pages.rst",
            category="2. SAE features",
            labels={"figure": "feature pages", "file": "HTML ({sae_set})"},
        ),
    log:
        f"{layout.LOGS}/features/{{sae_set}}/feature_pages.log",
    benchmark:
        f"{layout.BENCHMARKS}/features/{{sae_set}}/feature_pages.tsv"
    conda:
        "../../environment.yml"
    threads: MODEL_JOB_THREADS
    resources:
        **model_job_resources("feature_pages"),
    params:
        sae_set=lambda w: w.sae_set,
        layers=lambda w: SAE_SETS[w.sae_set]["layers"],
        config_hash=stage_hash(config, "feature_pages"),
    script:
        "../scripts/feature_pages.py"
