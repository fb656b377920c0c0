# Figures, report tables and the claims ledger. Logic: bugscope.figures (overlap and amplification:
# bugscope.figures.overlap), bugscope.claims.
# One rule per figure, each reading only the tables it draws, so that editing one figure's script
# reruns only that rule. Every figure, report table and the ledger are default targets
# (FIGURES, REPORT_TABLES and figure_targets in common.smk).
from pathlib import Path

CLAIMS_LEDGER = config["claims"]["ledger"] or str(
    Path(str(workflow.current_basedir)).parents[1] / "config" / "claims.yaml"
)
PNG_SCALE = config["figures"]["png_scale"]


rule fig_baseline_accuracy:
    input:
        accuracy=layout.BASELINE_ACCURACY,
    output:
        **figure_outputs("baseline_accuracy", "1. Baseline"),
    log:
        f"{layout.LOGS}/figures/baseline_accuracy.log",
    localrule: True
    conda:
        "../../environment.yml"
    params:
        png_scale=PNG_SCALE,
    script:
        "../scripts/fig_baseline_accuracy.py"


rule fig_lens:
    input:
        lens=layout.LENS,
    output:
        **figure_outputs("lens", "1. Baseline"),
    log:
        f"{layout.LOGS}/figures/lens.log",
    localrule: True
    conda:
        "../../environment.yml"
    params:
        png_scale=PNG_SCALE,
    script:
        "../scripts/fig_lens.py"


rule fig_probes:
    input:
        probes=layout.PROBES,
    output:
        **figure_outputs("probes", "1. Baseline"),
    log:
        f"{layout.LOGS}/figures/probes.log",
    localrule: True
    conda:
        "../../environment.yml"
    params:
        png_scale=PNG_SCALE,
    script:
        "../scripts/fig_probes.py"


rule fig_reading:
    input:
        accuracy=layout.READING_ACCURACY,
        closeness=layout.READING_CLOSENESS,
    output:
        **figure_outputs("reading", "1. Baseline"),
    log:
        f"{layout.LOGS}/figures/reading.log",
    localrule: True
    conda:
        "../../environment.yml"
    params:
        png_scale=PNG_SCALE,
    script:
        "../scripts/fig_reading.py"


rule fig_reading_steering:
    input:
        steering=layout.READING_STEERING,
    output:
        **figure_outputs("reading_steering", "1. Baseline"),
    log:
        f"{layout.LOGS}/figures/reading_steering.log",
    localrule: True
    conda:
        "../../environment.yml"
    params:
        png_scale=PNG_SCALE,
    script:
        "../scripts/fig_reading_steering.py"


rule fig_feature_overlap:
    input:
        overlap=layout.per_set(layout.FEATURE_OVERLAP, PRIMARY_SET),
    output:
        **figure_outputs("feature_overlap", "2. SAE features"),
    log:
        f"{layout.LOGS}/figures/feature_overlap.log",
    localrule: True
    conda:
        "../../environment.yml"
    params:
        png_scale=PNG_SCALE,
    script:
        "../scripts/fig_feature_overlap.py"


rule fig_amplification:
    input:
        overlap=layout.per_set(layout.FEATURE_OVERLAP, PRIMARY_SET),
    output:
        **figure_outputs("amplification", "2. SAE features"),
    log:
        f"{layout.LOGS}/figures/amplification.log",
    localrule: True
    conda:
        "../../environment.yml"
    params:
        png_scale=PNG_SCALE,
    script:
        "../scripts/fig_amplification.py"


rule fig_format_features:
    input:
        unpack(focus_layer_input),
        discriminative=layout.per_set(layout.DISCRIMINATIVE_FEATURES, PRIMARY_SET),
        named=layout.per_set(layout.NAMED_FEATURES, PRIMARY_SET),
    output:
        **figure_outputs("format_features", "2. SAE features"),
    log:
        f"{layout.LOGS}/figures/format_features.log",
    localrule: True
    conda:
        "../../environment.yml"
    params:
        png_scale=PNG_SCALE,
    script:
        "../scripts/fig_format_features.py"


rule fig_head_attribution:
    input:
        unpack(focus_layer_input),
        attribution=layout.per_set(layout.HEAD_FEATURE_ATTRIBUTION, PRIMARY_SET),
    output:
        **figure_outputs("head_attribution", "3. Attention heads"),
    log:
        f"{layout.LOGS}/figures/head_attribution.log",
    localrule: True
    conda:
        "../../environment.yml"
    params:
        png_scale=PNG_SCALE,
    script:
        "../scripts/fig_head_attribution.py"


rule fig_sae_quality:
    input:
        quality=layout.SAE_QUALITY,
    output:
        **figure_outputs("sae_quality", "2. SAE features"),
    log:
        f"{layout.LOGS}/figures/sae_quality.log",
    localrule: True
    conda:
        "../../environment.yml"
    params:
        png_scale=PNG_SCALE,
    script:
        "../scripts/fig_sae_quality.py"


rule fig_head_sweep:
    input:
        summary=layout.PATCHING_SUMMARY,
    output:
        **figure_outputs("head_sweep", "3. Attention heads"),
    log:
        f"{layout.LOGS}/figures/head_sweep.log",
    localrule: True
    conda:
        "../../environment.yml"
    params:
        png_scale=PNG_SCALE,
    script:
        "../scripts/fig_head_sweep.py"


rule fig_head_subsets:
    input:
        summary=layout.PATCHING_SUMMARY,
    output:
        **figure_outputs("head_subsets", "3. Attention heads"),
    log:
        f"{layout.LOGS}/figures/head_subsets.log",
    localrule: True
    conda:
        "../../environment.yml"
    params:
        png_scale=PNG_SCALE,
    script:
        "../scripts/fig_head_subsets.py"


rule fig_interventions:
    input:
        summary=layout.INTERVENTIONS,
    output:
        **figure_outputs("interventions", "2. SAE features"),
    log:
        f"{layout.LOGS}/figures/interventions.log",
    localrule: True
    conda:
        "../../environment.yml"
    params:
        png_scale=PNG_SCALE,
    script:
        "../scripts/fig_interventions.py"


rule fig_original_method:
    input:
        comparison=layout.PATCHING_ORIGINAL_METHOD,
    output:
        **figure_outputs("original_method", "3. Attention heads"),
    log:
        f"{layout.LOGS}/figures/original_method.log",
    localrule: True
    conda:
        "../../environment.yml"
    params:
        png_scale=PNG_SCALE,
    script:
        "../scripts/fig_original_method.py"


rule fig_replacement:
    input:
        summary=layout.PATCHING_REPLACEMENT,
    output:
        **figure_outputs("replacement", "3. Attention heads"),
    log:
        f"{layout.LOGS}/figures/replacement.log",
    localrule: True
    conda:
        "../../environment.yml"
    params:
        png_scale=PNG_SCALE,
    script:
        "../scripts/fig_replacement.py"


rule fig_residual_map:
    input:
        summary=layout.PATCHING_RESIDUAL_MAP,
    output:
        **figure_outputs("residual_map", "3. Attention heads"),
    log:
        f"{layout.LOGS}/figures/residual_map.log",
    localrule: True
    conda:
        "../../environment.yml"
    params:
        png_scale=PNG_SCALE,
    script:
        "../scripts/fig_residual_map.py"


rule fig_subsets_exhaustive:
    input:
        summary=layout.PATCHING_EXHAUSTIVE,
    output:
        **figure_outputs("subsets_exhaustive", "3. Attention heads"),
    log:
        f"{layout.LOGS}/figures/subsets_exhaustive.log",
    localrule: True
    conda:
        "../../environment.yml"
    params:
        png_scale=PNG_SCALE,
    script:
        "../scripts/fig_subsets_exhaustive.py"


rule fig_head_set_features:
    input:
        summary=layout.HEAD_SET_FEATURES,
    output:
        **figure_outputs("head_set_features", "3. Attention heads"),
    log:
        f"{layout.LOGS}/figures/head_set_features.log",
    localrule: True
    conda:
        "../../environment.yml"
    params:
        png_scale=PNG_SCALE,
    script:
        "../scripts/fig_head_set_features.py"


rule fig_original_decomposition:
    input:
        decomposition=layout.PATCHING_ORIGINAL_DECOMPOSITION,
    output:
        **figure_outputs("original_decomposition", "3. Attention heads"),
    log:
        f"{layout.LOGS}/figures/original_decomposition.log",
    localrule: True
    conda:
        "../../environment.yml"
    params:
        png_scale=PNG_SCALE,
    script:
        "../scripts/fig_original_decomposition.py"


rule report_table:
    input:
        table=lambda wildcards: REPORT_TABLES[wildcards.name],
    output:
        report(
            layout.REPORT_TABLE,
            caption="../report/tables.rst",
            category="5. Tables",
            labels={"table": "{name}"},
        ),
    log:
        f"{layout.LOGS}/figures/table_{{name}}.log",
    wildcard_constraints:
        name="|".join(REPORT_TABLES),
    localrule: True
    conda:
        "../../environment.yml"
    script:
        "../scripts/report_table.py"


rule claims_ledger:
    input:
        unpack(claims_inputs),
    output:
        claims=layout.CLAIMS,
        truth=layout.CLAIMS_TRUTH,
        markdown=layout.CLAIMS_MARKDOWN,
        html=report(
            layout.CLAIMS_HTML,
            caption="../report/claims.rst",
            category="4. Claims ledger",
            labels={"table": "claims ledger"},
        ),
    log:
        f"{layout.LOGS}/figures/claims_ledger.log",
    localrule: True
    conda:
        "../../environment.yml"
    params:
        table_sets=claims_table_sets(),
    script:
        "../scripts/claims_ledger.py"
