# SAE stage: the training corpus and its activations, then per SAE set (sae.sets) one SAE per
# layer (trained here with SAE-Lens, or pretrained from SAE-Lens's directory), sparse feature tables
# and SAE quality. Logic: bugscope.sae and bugscope.data.corpus. Jobs handle resources.layers_per_job
# layers of one set each (rules <stage>_<set>_<group>) and write one output per layer.
import bugscope.sae.directory as bugscope_sae_directory

SAE_CONFIG_HASH = stage_hash(config, "sae")
# Pretrained: release, ids and hook sites are checked against SAE-Lens's directory now, before any job.
SAE_IDS = {
    name: bugscope_sae_directory.resolve_pretrained(
        s["release"], s["sae_id"], s["layers"], s["site"]
    )
    for name, s in SAE_SETS.items()
    if s["source"] == "pretrained"
}


rule prepare_corpus:
    input:
        manifest=layout.MODEL_MANIFEST,
        prompts=layout.PROMPTS,
    output:
        corpus=layout.CORPUS,
    log:
        f"{layout.LOGS}/sae/prepare_corpus.log",
    priority: SAE_CHAIN_PRIORITY
    localrule: True
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
    priority: SAE_CHAIN_PRIORITY
    conda:
        "../../environment.yml"
    threads: MODEL_JOB_THREADS
    resources:
        **model_job_resources("cache_corpus"),
    params:
        hooks=HOOKS,
        config_hash=SAE_CONFIG_HASH,
    script:
        "../scripts/cache_corpus.py"


for sae_set, group, group_layers in [
    (name, group, group_layers)
    for name, s in SAE_SETS.items()
    for group, group_layers in layer_groups(
        s["layers"], config["resources"]["layers_per_job"]
    ).items()
]:
    group_hooks = set_hooks(sae_set, group_layers)
    job = f"{sae_set}_{group}"

    if SAE_SETS[sae_set]["source"] == "train":

        rule:
            name:
                f"train_sae_{job}"
            input:
                manifest=layout.MODEL_MANIFEST,
                corpus=layout.CORPUS,
                activations=[layout.activations("corpus", hook) for hook in group_hooks],
            output:
                saes=[
                    directory(layout.per_set(layout.SAE_DIR, sae_set, hook=hook))
                    for hook in group_hooks
                ],
            log:
                f"{layout.LOGS}/sae/train_sae_{job}.log",
            benchmark:
                f"{layout.BENCHMARKS}/sae/train_sae_{job}.tsv"
            priority: SAE_CHAIN_PRIORITY
            conda:
                "../../environment.yml"
            threads: MODEL_JOB_THREADS
            resources:
                **model_job_resources("train_sae", group_layers, sae_set),
            params:
                sae_set=sae_set,
                layers=group_layers,
                config_hash=SAE_CONFIG_HASH,
            script:
                "../scripts/train_sae.py"

    else:

        rule:
            name:
                f"load_pretrained_sae_{job}"
            input:
                manifest=layout.MODEL_MANIFEST,
            output:
                saes=[
                    directory(layout.per_set(layout.SAE_DIR, sae_set, hook=hook))
                    for hook in group_hooks
                ],
            log:
                f"{layout.LOGS}/sae/load_pretrained_sae_{job}.log",
            benchmark:
                f"{layout.BENCHMARKS}/sae/load_pretrained_sae_{job}.tsv"
            priority: SAE_CHAIN_PRIORITY
            conda:
                "../../environment.yml"
            threads: MODEL_JOB_THREADS
            resources:
                **model_job_resources("load_pretrained_sae", group_layers, sae_set),
            params:
                sae_set=sae_set,
                layers=group_layers,
                sae_ids=[SAE_IDS[sae_set][layer] for layer in group_layers],
                config_hash=SAE_CONFIG_HASH,
            script:
                "../scripts/load_pretrained_sae.py"

    rule:
        name:
            f"encode_features_{job}"
        input:
            saes=[
                layout.per_set(layout.SAE_DIR, sae_set, hook=hook)
                for hook in group_hooks
            ],
            activations=[layout.activations("prompts", hook) for hook in group_hooks],
        output:
            features=[
                layout.per_set(layout.FEATURES, sae_set, hook=hook)
                for hook in group_hooks
            ],
        log:
            f"{layout.LOGS}/sae/encode_features_{job}.log",
        benchmark:
            f"{layout.BENCHMARKS}/sae/encode_features_{job}.tsv"
        priority: SAE_CHAIN_PRIORITY
        conda:
            "../../environment.yml"
        threads: MODEL_JOB_THREADS
        resources:
            **model_job_resources("encode_features", group_layers, sae_set),
        params:
            sae_set=sae_set,
            layers=group_layers,
            config_hash=SAE_CONFIG_HASH,
        script:
            "../scripts/encode_features.py"

    rule:
        name:
            f"sae_quality_{job}"
        input:
            manifest=layout.MODEL_MANIFEST,
            prompts=layout.PROMPTS,
            corpus=layout.CORPUS,
            saes=[
                layout.per_set(layout.SAE_DIR, sae_set, hook=hook)
                for hook in group_hooks
            ],
            prompt_activations=[
                layout.activations("prompts", hook) for hook in group_hooks
            ],
            corpus_activations=[
                layout.activations("corpus", hook) for hook in group_hooks
            ],
        output:
            quality=[
                layout.per_set(layout.SAE_QUALITY_LAYER, sae_set, hook=hook)
                for hook in group_hooks
            ],
        log:
            f"{layout.LOGS}/sae/sae_quality_{job}.log",
        benchmark:
            f"{layout.BENCHMARKS}/sae/sae_quality_{job}.tsv"
        conda:
            "../../environment.yml"
        threads: MODEL_JOB_THREADS
        resources:
            **model_job_resources("sae_quality", group_layers, sae_set),
        params:
            sae_set=sae_set,
            layers=group_layers,
            config_hash=SAE_CONFIG_HASH,
        script:
            "../scripts/sae_quality.py"


rule aggregate_sae_quality:
    input:
        quality=[
            layout.per_set(layout.SAE_QUALITY_LAYER, name, hook=hook)
            for name in SAE_SETS
            for hook in set_hooks(name)
        ],
    output:
        quality=layout.SAE_QUALITY,
    log:
        f"{layout.LOGS}/sae/aggregate_sae_quality.log",
    localrule: True
    conda:
        "../../environment.yml"
    params:
        config_hash=SAE_CONFIG_HASH,
    script:
        "../scripts/aggregate_sae_quality.py"
