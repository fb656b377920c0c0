# SAE stage: the training corpus and its activations, one SAE per analysed layer (trained
# here with SAE-Lens, or pretrained from SAE-Lens's directory), sparse feature tables and SAE
# quality. Logic: bugscope.sae and bugscope.corpus. Jobs handle resources.layers_per_job layers
# each (LAYER_GROUPS) and write one output per layer.
import bugscope.sae as bugscope_sae

SAE_CFG = config["sae"]
SAE_CONFIG_HASH = stage_hash(config, "sae")
# Pretrained: release, ids and hook sites are checked against SAE-Lens's directory now, before any job.
SAE_IDS = (
    bugscope_sae.resolve_pretrained(SAE_CFG["release"], SAE_CFG["sae_id"], LAYERS, SITE)
    if SAE_CFG["source"] == "pretrained"
    else {}
)


localrules:
    prepare_corpus,
    aggregate_sae_quality,


rule prepare_corpus:
    input:
        manifest=layout.MODEL_MANIFEST,
        prompts=layout.PROMPTS,
    output:
        corpus=layout.CORPUS,
    log:
        f"{layout.LOGS}/sae/prepare_corpus.log",
    conda:
        "../../environment.yml"
    params:
        config_hash=SAE_CONFIG_HASH,
    script:
        "../scripts/prepare_corpus.py"


rule cache_corpus:
    input:
        manifest=layout.MODEL_MANIFEST,
        corpus=layout.CORPUS,
    output:
        activations=[layout.activations("corpus", hook) for hook in HOOKS],
    log:
        f"{layout.LOGS}/sae/cache_corpus.log",
    benchmark:
        f"{layout.BENCHMARKS}/sae/cache_corpus.tsv"
    conda:
        "../../environment.yml"
    threads: MODEL_JOB_THREADS
    resources:
        **model_job_resources("cache_corpus"),
    params:
        layers=LAYERS,
        config_hash=SAE_CONFIG_HASH,
    script:
        "../scripts/cache_corpus.py"


for group, group_layers in LAYER_GROUPS.items():
    group_hooks = [hook_name(layer, SITE) for layer in group_layers]

    if SAE_CFG["source"] == "train":

        rule:
            name:
                f"train_sae_{group}"
            input:
                manifest=layout.MODEL_MANIFEST,
                corpus=layout.CORPUS,
                activations=[layout.activations("corpus", hook) for hook in group_hooks],
            output:
                saes=[
                    directory(layout.SAE_DIR.format(hook=hook)) for hook in group_hooks
                ],
            log:
                f"{layout.LOGS}/sae/train_sae_{group}.log",
            benchmark:
                f"{layout.BENCHMARKS}/sae/train_sae_{group}.tsv"
            conda:
                "../../environment.yml"
            threads: MODEL_JOB_THREADS
            resources:
                **model_job_resources("train_sae", group_layers),
            params:
                layers=group_layers,
                config_hash=SAE_CONFIG_HASH,
            script:
                "../scripts/train_sae.py"

    else:

        rule:
            name:
                f"load_pretrained_sae_{group}"
            input:
                manifest=layout.MODEL_MANIFEST,
            output:
                saes=[
                    directory(layout.SAE_DIR.format(hook=hook)) for hook in group_hooks
                ],
            log:
                f"{layout.LOGS}/sae/load_pretrained_sae_{group}.log",
            benchmark:
                f"{layout.BENCHMARKS}/sae/load_pretrained_sae_{group}.tsv"
            conda:
                "../../environment.yml"
            threads: MODEL_JOB_THREADS
            resources:
                **model_job_resources("load_pretrained_sae", group_layers),
            params:
                layers=group_layers,
                sae_ids=[SAE_IDS[layer] for layer in group_layers],
                config_hash=SAE_CONFIG_HASH,
            script:
                "../scripts/load_pretrained_sae.py"

    rule:
        name:
            f"encode_features_{group}"
        input:
            saes=[layout.SAE_DIR.format(hook=hook) for hook in group_hooks],
            activations=[layout.activations("prompts", hook) for hook in group_hooks],
        output:
            features=[layout.FEATURES.format(hook=hook) for hook in group_hooks],
        log:
            f"{layout.LOGS}/sae/encode_features_{group}.log",
        benchmark:
            f"{layout.BENCHMARKS}/sae/encode_features_{group}.tsv"
        conda:
            "../../environment.yml"
        threads: MODEL_JOB_THREADS
        resources:
            **model_job_resources("encode_features", group_layers),
        params:
            layers=group_layers,
            config_hash=SAE_CONFIG_HASH,
        script:
            "../scripts/encode_features.py"

    rule:
        name:
            f"sae_quality_{group}"
        input:
            manifest=layout.MODEL_MANIFEST,
            prompts=layout.PROMPTS,
            corpus=layout.CORPUS,
            saes=[layout.SAE_DIR.format(hook=hook) for hook in group_hooks],
            prompt_activations=[
                layout.activations("prompts", hook) for hook in group_hooks
            ],
            corpus_activations=[
                layout.activations("corpus", hook) for hook in group_hooks
            ],
        output:
            quality=[layout.SAE_QUALITY_LAYER.format(hook=hook) for hook in group_hooks],
        log:
            f"{layout.LOGS}/sae/sae_quality_{group}.log",
        benchmark:
            f"{layout.BENCHMARKS}/sae/sae_quality_{group}.tsv"
        conda:
            "../../environment.yml"
        threads: MODEL_JOB_THREADS
        resources:
            **model_job_resources("sae_quality", group_layers),
        params:
            layers=group_layers,
            config_hash=SAE_CONFIG_HASH,
        script:
            "../scripts/sae_quality.py"


rule aggregate_sae_quality:
    input:
        quality=[layout.SAE_QUALITY_LAYER.format(hook=hook) for hook in HOOKS],
    output:
        quality=layout.SAE_QUALITY,
    log:
        f"{layout.LOGS}/sae/aggregate_sae_quality.log",
    conda:
        "../../environment.yml"
    params:
        config_hash=SAE_CONFIG_HASH,
    script:
        "../scripts/aggregate_sae_quality.py"
