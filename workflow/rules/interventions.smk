# SAE-feature interventions: at the focus layers (and interventions.layers), the SAE spliced in at
# its site with its error term kept, features of the buggy-format prompts ablated, clamped to the
# same question's correct-format values or steered, against random features of matched firing
# rate. Logic: bugscope.interventions.
from bugscope.config import intervention_sae_sets

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
