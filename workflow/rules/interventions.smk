# SAE-feature interventions: at the focus layers (and interventions.layers), the SAE spliced in at
# its site with its error term kept, features of the buggy-format prompts ablated, clamped to the
# same question's correct-format values or steered, against random features of matched firing
# rate. Logic: bugscope.interventions.
from bugscope.config import head_set_feature_sets, intervention_sae_sets

INTERVENTIONS_HASH = stage_hash(config, "interventions")
INTERVENTION_SETS = intervention_sae_sets(config)


rule feature_interventions:
    input:
        unpack(focus_layer_input),
        manifest=layout.MODEL_MANIFEST,
        prompts=layout.PROMPTS,
        discriminative=[
            layout.per_set(layout.DISCRIMINATIVE_FEATURES, name)
            for name in INTERVENTION_SETS
        ],
        # Every SAE of the sets: the focus layers are known only once the overlap stage has run.
        saes=[
            layout.per_set(layout.SAE_DIR, name, hook=hook)
            for name in INTERVENTION_SETS
            for hook in set_hooks(name)
        ],
    output:
        prompts=layout.INTERVENTIONS_PROMPTS,
        summary=layout.INTERVENTIONS,
    log:
        f"{layout.LOGS}/interventions/feature_interventions.log",
    benchmark:
        f"{layout.BENCHMARKS}/interventions/feature_interventions.tsv"
    conda:
        "../../environment.yml"
    threads: MODEL_JOB_THREADS
    resources:
        **model_job_resources("feature_interventions"),
    params:
        sae_sets=INTERVENTION_SETS,
        set_layers={name: SAE_SETS[name]["layers"] for name in INTERVENTION_SETS},
        config_hash=INTERVENTIONS_HASH,
    script:
        "../scripts/feature_interventions.py"


# The critical SAE features each even-head set of patching.exhaustive turns on at the focus layers:
# the seed's "any 8 even heads activate at least 5 critical features". Logic: bugscope.interventions.head_set_features.
HEAD_SET_FEATURE_SETS = head_set_feature_sets(config)


rule head_set_features:
    input:
        unpack(focus_layer_input),
        manifest=layout.MODEL_MANIFEST,
        prompts=layout.PROMPTS,
        scores=layout.BASELINE_SCORES,
        discriminative=[
            layout.per_set(layout.DISCRIMINATIVE_FEATURES, name)
            for name in HEAD_SET_FEATURE_SETS
        ],
        saes=[
            layout.per_set(layout.SAE_DIR, name, hook=hook)
            for name in HEAD_SET_FEATURE_SETS
            for hook in set_hooks(name)
        ],
    output:
        prompts=layout.HEAD_SET_FEATURES_PROMPTS,
        summary=layout.HEAD_SET_FEATURES,
    log:
        f"{layout.LOGS}/interventions/head_set_features.log",
    benchmark:
        f"{layout.BENCHMARKS}/interventions/head_set_features.tsv"
    conda:
        "../../environment.yml"
    threads: MODEL_JOB_THREADS
    resources:
        **model_job_resources("head_set_features"),
    params:
        sae_sets=HEAD_SET_FEATURE_SETS,
        set_layers={name: SAE_SETS[name]["layers"] for name in HEAD_SET_FEATURE_SETS},
        config_hash=stage_hash(config, "head_set_features"),
    script:
        "../scripts/head_set_features.py"
