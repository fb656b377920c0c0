"""Feature analyses on the encoded SAE features: overlap between the formats, discriminative and
named features (workflow/rules/features.smk).

Modules: `values` (prompt pairs and per-prompt feature values), `overlap`, `baselines` (its
same-format chance levels), `discriminative`,
`named` and `stages` (the stage drivers). The direct attribution of attention heads to SAE
features lives in bugscope.attribution, the bootstrap helpers in bugscope.stats; their names are
re-exported here so that `from bugscope.features import ...` keeps working (the attribution's on
first use: it loads torch, which the light jobs that import this package never need). The two config
helpers the workflow calls while it parses (`check_config`, `attribution_layers`) live in
bugscope.config, so that parsing imports none of these modules.
"""

from bugscope.config import attribution_layers
from bugscope.config import check_features_config as check_config
from bugscope.features.baselines import baseline_couples, baseline_overlap
from bugscope.features.discriminative import (
    DISCRIMINATIVE_COLUMNS,
    bh_qvalues,
    discriminative_features,
    paired_test,
    unpaired_test,
)
from bugscope.features.named import NAMED_SCHEMA, named_feature_ids, named_features
from bugscope.features.overlap import (
    AMPLIFICATION_ORIGINAL,
    COMPARISONS,
    HELDOUT_VARIANT,
    OVERLAP_STATS,
    SUMMARY_COLUMNS,
    compare_top_sets,
    focus_layers,
    middle_layers,
    pair_overlap,
    pooled_overlap,
    summarise_overlap,
)
from bugscope.features.stages import (
    load_layer_values,
    load_prompt_frame,
    run_attribution,
    run_discriminative,
    run_named,
    run_overlap,
    source_provenance,
)
from bugscope.features.values import (
    POSITION_MODES,
    dense_matrix,
    position_weights,
    prompt_pairs,
    prompt_values,
    top_k,
)
from bugscope.stats import bootstrap_indices, derived_seed, ratio_bootstrap

_ATTRIBUTION_NAMES = (
    "NORMALISATIONS", "COMPONENTS", "ATTRIBUTION_COLUMNS", "PARITY_COLUMNS", "EncoderView", "LayerCapture",
    "ParityResult", "encoder_view", "sae_pre_and_acts", "capture_decision", "head_outputs", "attribute_layer",
    "summarise_attribution", "parity_test", "parity_rows", "attribution_features",
)

__all__ = [
    # values
    "POSITION_MODES", "prompt_pairs", "position_weights", "prompt_values", "top_k", "dense_matrix",
    # overlap
    "OVERLAP_STATS", "AMPLIFICATION_ORIGINAL", "COMPARISONS", "compare_top_sets", "pair_overlap", "pooled_overlap",
    "middle_layers", "summarise_overlap", "focus_layers", "HELDOUT_VARIANT", "SUMMARY_COLUMNS",
    # baselines
    "baseline_couples", "baseline_overlap",
    # discriminative
    "DISCRIMINATIVE_COLUMNS", "bh_qvalues", "paired_test", "unpaired_test", "discriminative_features",
    # named
    "NAMED_SCHEMA", "named_feature_ids", "named_features",
    # stages
    "check_config", "attribution_layers", "load_prompt_frame", "load_layer_values", "source_provenance",
    "run_overlap", "run_discriminative", "run_named", "run_attribution",
    # bugscope.attribution (loaded on first use, __getattr__ below)
    *_ATTRIBUTION_NAMES,
    # bugscope.stats, bugscope.sae
    "derived_seed", "bootstrap_indices", "ratio_bootstrap",
]

def __getattr__(name: str):
    if name in _ATTRIBUTION_NAMES:
        from bugscope import attribution

        return getattr(attribution, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
