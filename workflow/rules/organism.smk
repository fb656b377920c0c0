# The planted format bug (a positive control, research notes section 10). Logic: bugscope.organism.
# plant_organism fine-tunes the planted heads of the base model; the organism is then studied by
# this workflow's own rules, used a second time as a Snakemake module whose paths move under
# results/organism/ (bugscope.layout.ORGANISM_PREFIXES), with the organism's config
# (bugscope.organism.study.study_config). Its prompts are the base run's table, copied.
# The organism's default targets: its study's, under results/organism/ (none when it is off).
ORGANISM_TARGETS = []


rule plant_organism:
    input:
        manifest=layout.MODEL_MANIFEST,
        prompts=layout.PROMPTS,
    output:
        manifest=layout.organism(layout.MODEL_MANIFEST),
        checkpoint=directory(layout.organism(layout.MODEL_CHECKPOINT)),
    log:
        f"{layout.LOGS}/plant_organism.log",
    benchmark:
        f"{layout.BENCHMARKS}/plant_organism.tsv"
    conda:
        "../../environment.yml"
    threads: MODEL_JOB_THREADS
    resources:
        **model_job_resources("plant_organism"),
    params:
        config_hash=stage_hash(config, "organism"),
    script:
        "../scripts/plant_organism.py"


# The organism's prompts (and its reading families') are the base run's, bit for bit: copied, not rebuilt.
rule organism_prompts:
    input:
        prompts=layout.PROMPTS,
        reading_prompts=layout.READING_PROMPTS,
    output:
        prompts=layout.organism(layout.PROMPTS),
        reading_prompts=layout.organism(layout.READING_PROMPTS),
    log:
        layout.organism(f"{layout.LOGS}/build_prompts.log"),
    localrule: True
    conda:
        "../../environment.yml"
    shell:
        "(cp {input.prompts} {output.prompts} && cp {input.reading_prompts} {output.reading_prompts}) 2> {log}"


rule organism_localisation:
    input:
        manifest=layout.organism(layout.MODEL_MANIFEST),
        heads=layout.organism(layout.PATCHING_SUMMARY),
        residual_map=layout.organism(layout.PATCHING_RESIDUAL_MAP),
        unedited_scores=layout.BASELINE_SCORES,
        planted_scores=layout.organism(layout.BASELINE_SCORES),
    output:
        scores=layout.ORGANISM_LOCALISATION,
        html=report(
            layout.ORGANISM_LOCALISATION_HTML,
            caption="../report/localisation.rst",
            category="5. Planted organism",
            labels={"table": "localisation"},
        ),
    log:
        f"{layout.LOGS}/organism_localisation.log",
    localrule: True
    conda:
        "../../environment.yml"
    params:
        config_hash=stage_hash(config, "organism_localisation"),
    script:
        "../scripts/organism_localisation.py"


rule fig_organism_comparison:
    input:
        **(
            {"unedited_residual_map": layout.PATCHING_RESIDUAL_MAP}
            if config["patching"]["residual_map"]["enabled"]
            else {}
        ),
        manifest=layout.organism(layout.MODEL_MANIFEST),
        unedited_accuracy=layout.BASELINE_ACCURACY,
        planted_accuracy=layout.organism(layout.BASELINE_ACCURACY),
        unedited_heads=layout.PATCHING_SUMMARY,
        planted_heads=layout.organism(layout.PATCHING_SUMMARY),
        unedited_lens=layout.LENS,
        planted_lens=layout.organism(layout.LENS),
        # the unedited model's residual map where its config makes one (the organism's always does)
        planted_residual_map=layout.organism(layout.PATCHING_RESIDUAL_MAP),
    output:
        **figure_outputs("organism_comparison", "5. Planted organism"),
    log:
        f"{layout.LOGS}/figures/organism_comparison.log",
    localrule: True
    conda:
        "../../environment.yml"
    params:
        png_scale=config["figures"]["png_scale"],
    script:
        "../scripts/fig_organism_comparison.py"


if config["organism"]["enabled"]:
    from bugscope.organism.study import study_config

    ORGANISM_CONFIG = study_config(config)

    module organism:
        snakefile:
            "../Snakefile"
        config:
            ORGANISM_CONFIG
        replace_prefix:
            layout.ORGANISM_PREFIXES

    # The organism's own model and prompts come from plant_organism and organism_prompts; the rules
    # about the organism exist once, here.
    use rule * from organism exclude prepare_model, build_prompts, build_reading_prompts, all, plant_organism, organism_prompts, organism_localisation, fig_organism_comparison as organism_*

    ORGANISM_TARGETS = [
        layout.organism(path) for path in stages.targets(ORGANISM_CONFIG)
    ]
