# Knows vs says (research notes section 11): linear probes on the cached residual stream at the
# decision position, beside the model's own answers. Logic: bugscope.data.probes (NumPy and
# scikit-learn, no torch: a light job).


rule probes:
    input:
        prompts=layout.PROMPTS,
        scores=layout.BASELINE_SCORES,
        activations=[
            layout.activations("prompts", hook) for hook in stages.probe_hooks(config)
        ],
    output:
        predictions=layout.PROBE_PROMPTS,
        summary=layout.PROBES,
    log:
        f"{layout.LOGS}/probes.log",
    benchmark:
        f"{layout.BENCHMARKS}/probes.tsv"
    localrule: True
    conda:
        "../../environment.yml"
    params:
        config_hash=stage_hash(config, "probes"),
    script:
        "../scripts/probes.py"
