"""The table registry: every Parquet table of the pipeline, declared once.

A declaration says where the table lives (`bugscope.layout`), its kind (the `bugscope.kind`
metadata), the stage whose config sections it depends on (`bugscope.config.STAGE_SECTIONS`), the columns
its readers rely on and, where the claims ledger reads it, the column holding each row's n. Readers and writers take the
declaration, so the kind and the stage's config hash are checked in one place (`read`, `check`)
and written in one place (`write`, `written_together`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Sequence

from bugscope import layout
from bugscope.config import stage_hash

# The declarations are all the workflow reads when it parses (the ledger's tables): Polars, Arrow and
# bugscope.io (which imports torch) are imported by the functions that read and write.
if TYPE_CHECKING:
    import polars as pl
    import pyarrow as pa


@dataclass(frozen=True)
class Table:
    path: str  # layout template; {hook}, {dataset}, {group} are filled by the rule
    kind: str
    stage: str | None  # key of STAGE_SECTIONS: the settings the table depends on (None: checked by its kind only)
    n_column: str | None = None  # the column with each row's n (claims ledger): its independent clusters
    n_unit: str | None = None  # what n_column counts, as the ledger prints it
    columns: tuple[str, ...] = ()  # the columns its readers rely on (checked on read and on write)

    def config_hash(self, config: dict) -> str | None:
        return stage_hash(config, self.stage) if self.stage else None


# Every patching table, per prompt and summarised, whichever rule writes it.
PATCH_PROMPT_COLUMNS = ("method", "positions", "layer", "head_set", "prompt_id", "pair_id", "pair_kind", "order",
                        "logit_diff", "baseline_logit_diff", "source_logit_diff")
PATCH_SUMMARY_COLUMNS = ("method", "positions", "pair_kind", "order", "layer", "head_set", "family", "n_eligible",
                         "n_eligible_pairs",
                         "success_rate", "recovery", "recovery_low", "recovery_high")

# `columns` names what identifies a row and what every reader of the table uses, not all columns.
PROMPTS = Table(layout.PROMPTS, "prompts", "prompts",
               columns=("prompt_id", "question_id", "pair_id", "pair_kind", "order", "format", "family", "wording",
                        "numbers_pos", "decision_pos"))
READING_PROMPTS = Table(layout.READING_PROMPTS, "reading_prompts", "reading_prompts", columns=PROMPTS.columns)

BASELINE_SCORES = Table(layout.BASELINE_SCORES, "baseline_scores", "baseline",
                        columns=("prompt_id", "pair_id", "pair_kind", "order", "format", "is_correct"))
BASELINE_ACCURACY = Table(
    layout.BASELINE_ACCURACY, "baseline_accuracy", "baseline", "n_pairs", "number pairs",
    columns=("format", "pair_kind", "order", "n_prompts", "accuracy", "accuracy_low", "accuracy_high"))
BASELINE_CONTRAST = Table(
    layout.BASELINE_CONTRAST, "baseline_contrast", "baseline", "n_pairs", "number pairs",
    columns=("pair_kind", "n_pairs", "accuracy_gap", "accuracy_gap_low", "accuracy_gap_high"))
BASELINE_GENERATION = Table(
    layout.BASELINE_GENERATION, "baseline_generation", "baseline",
    columns=("prompt_id", "generated_answer", "format", "is_correct"))

LENS_PROMPTS = Table(layout.LENS_PROMPTS, "lens_prompts", "baseline",
                     columns=("prompt_id", "pair_id", "pair_kind", "order", "format", "layer", "lens_logit_diff",
                              "attn_attribution", "mlp_attribution", "embedding_attribution"))
LENS = Table(layout.LENS, "lens", "baseline", "n_pairs", "number pairs",
             columns=("format", "pair_kind", "order", "layer", "n_pairs", "lens_logit_diff", "lens_logit_diff_low",
                      "lens_logit_diff_high", "lens_accuracy", "lens_accuracy_low", "lens_accuracy_high",
                      "attn_attribution", "mlp_attribution"))

PROBE_PROMPTS = Table(layout.PROBE_PROMPTS, "probe_prompts", "probes",
                      columns=("prompt_id", "pair_id", "pair_kind", "order", "test_format", "layer", "family",
                               "train_format", "probe_right"))
PROBES = Table(layout.PROBES, "probes", "probes", "n_pairs", "number pairs",
               columns=("variant", "layer", "family", "train_format", "test_format", "pair_kind", "order", "n_pairs",
                        "probe_accuracy", "probe_accuracy_low", "probe_accuracy_high", "output_accuracy",
                        "knows_minus_says", "knows_minus_says_low", "knows_minus_says_high"))

READING_SCORES = Table(layout.READING_SCORES, "reading_scores", "reading_model",
                       columns=("prompt_id", "condition", "draw", "logit_diff"))
READING_FEATURES = Table(layout.READING_FEATURES, "reading_features", "reading_model",
                         columns=("layer", "role", "draw", "feature_id", "score"))
READING_FEATURE_PROMPTS = Table(layout.READING_FEATURE_PROMPTS, "reading_feature_prompts", "reading_model",
                                columns=("layer", "prompt_id", "activation"))
READING_ACCURACY = Table(layout.READING_ACCURACY, "reading_accuracy", "reading", "n_pairs", "number pairs",
                         columns=("family", "wording", "format", "n_prompts", "n_pairs", "accuracy", "accuracy_low",
                                  "accuracy_high"))
READING_CLOSENESS_PROMPTS = Table(layout.READING_CLOSENESS_PROMPTS, "reading_closeness_prompts", "reading",
                                  columns=("prompt_id", "pair_id", "format", "family", "wording", "layer", "position",
                                           "score", "read_as_version"))
_LONG = ("n_prompts", "n_pairs", "measure", "value", "value_low", "value_high")
READING_CLOSENESS = Table(layout.READING_CLOSENESS, "reading_closeness", "reading", "n_pairs", "number pairs",
                          columns=("variant", "layer", "position", "family", "format", "pair_kind", *_LONG))
READING_FEATURE_SUMMARY = Table(layout.READING_FEATURE_SUMMARY, "reading_feature_summary", "reading", "n_pairs",
                                "number pairs", columns=("layer", "family", "format", "pair_kind", *_LONG))
READING_STEERING = Table(layout.READING_STEERING, "reading_steering", "reading", "n_pairs", "number pairs",
                         columns=("condition", "subject", "pair_kind", *_LONG))

PROMPT_ACTIVATIONS = Table(
    layout.ACTIVATIONS.replace("{dataset}", "prompts"), "activations", "activations",
    columns=("prompt_id", "position", "activation"))
READING_ACTIVATIONS = Table(
    layout.ACTIVATIONS.replace("{dataset}", "reading"), "activations", "reading_model",
    columns=("prompt_id", "position", "activation"))
CORPUS = Table(layout.CORPUS, "corpus", "sae", columns=("prompt_id", "source", "split", "input_ids", "n_tokens"))
CORPUS_ACTIVATIONS = Table(
    layout.ACTIVATIONS.replace("{dataset}", "corpus"), "activations", "sae",
    columns=("prompt_id", "position", "activation"))
FEATURES = Table(layout.FEATURES, "features", "sae", columns=("prompt_id", "position", "feature_id", "activation"))
SAE_QUALITY_COLUMNS = ("layer", "hook_name", "ev_prompts", "ev_corpus", "l0_corpus", "dead_fraction")
SAE_QUALITY_LAYER = Table(layout.SAE_QUALITY_LAYER, "sae_quality", "sae", columns=SAE_QUALITY_COLUMNS)
SAE_QUALITY = Table(layout.SAE_QUALITY, "sae_quality", "sae", "n_tokens_corpus", "corpus tokens", columns=SAE_QUALITY_COLUMNS)

# One row per (layer, variant, format): format is null on the cross-format rows (per_pair, pooled,
# per_pair_heldout, original_single_pair) and names the format (or "both") on the same-format
# baseline rows. The per_pair_heldout rows have the per_pair columns, measured on the odd pair ids
# and marked (is_min_overlap, is_max_overlap_middle) on the even ones (bugscope.features.overlap).
FEATURE_OVERLAP = Table(
    layout.FEATURE_OVERLAP, "feature_overlap", "features", "n_number_pairs", "number pairs",
    columns=("layer", "variant", "format", "k", "n_pairs", "overlap_pct", "overlap_pct_low", "overlap_pct_high",
             "is_min_overlap", "is_max_overlap_middle"))
FEATURE_OVERLAP_PAIRS = Table(
    layout.FEATURE_OVERLAP_PAIRS, "feature_overlap_pairs", "features",
    columns=("layer", "question_id", "pair_id", "overlap_pct"))
DISCRIMINATIVE_FEATURES = Table(
    layout.DISCRIMINATIVE_FEATURES, "discriminative_features", "features", "n_pairs", "number pairs",
    columns=("layer", "comparison", "direction", "rank", "feature_id", "q_value", "significant",
             "heldout_mean_a", "heldout_mean_b", "heldout_firing_rate_a", "heldout_firing_rate_b"))
NAMED_FEATURES = Table(
    layout.NAMED_FEATURES, "named_features", "features", "n_pairs", "number pairs",
    columns=("layer", "category", "feature_id", "ratio", "n_pairs"))
HEAD_FEATURE_ATTRIBUTION = Table(
    layout.HEAD_FEATURE_ATTRIBUTION, "head_feature_attribution", "features",
    columns=("layer", "feature_id", "format", "component", "head", "direct_attribution"))
HEAD_PARITY = Table(
    layout.HEAD_PARITY, "head_parity", "features", "n_heads", "heads",
    columns=("layer", "target", "feature_id", "statistic", "value", "p_value", "familywise_p_value"))
# Feature pages (bugscope.features.pages): one row per (selection, feature, pair split, format,
# level, role, token) at a page layer; level "role" rows pool a role's tokens (token ""), level
# "token" rows one token string. A feature chosen twice (named and ranked) has rows under each.
FEATURE_TOKENS = Table(
    layout.FEATURE_TOKENS, "feature_tokens", "feature_pages", "n_pairs", "number pairs",
    columns=("layer", "feature_id", "selection", "rank", "pairs", "format", "level", "role", "token", "n_tokens",
             "n_prompts", "n_pairs", "mean_activation", "mean_activation_low", "mean_activation_high",
             "firing_rate", "firing_rate_low", "firing_rate_high", "activation_share"))
FEATURE_CONTEXTS = Table(
    layout.FEATURE_CONTEXTS, "feature_contexts", "feature_pages",
    columns=("layer", "feature_id", "rank", "corpus_id", "source", "position", "activation", "left", "token",
             "right"))


def _patching_prompts(path: str, stage: str) -> Table:
    return Table(path, "patching_prompts", stage, columns=PATCH_PROMPT_COLUMNS)


PATCHING_SWEEP_GROUP = _patching_prompts(layout.PATCHING_SWEEP_GROUP, "patching_sweep")
PATCHING_SUBSETS_PROMPTS = _patching_prompts(layout.PATCHING_SUBSETS_PROMPTS, "patching_focus")
PATCHING_ORIGINAL_METHOD_PROMPTS = _patching_prompts(layout.PATCHING_ORIGINAL_METHOD_PROMPTS, "patching_focus")
PATCHING_PROMPTS = _patching_prompts(layout.PATCHING_PROMPTS, "patching_summary")
PATCHING_ORIGINAL_METHOD = Table(layout.PATCHING_ORIGINAL_METHOD, "patching_summary", "patching_focus",
                                 columns=PATCH_SUMMARY_COLUMNS)
# The original procedure and the decomposition of its gap to the per-head method
# (bugscope.patching.original_method): per prompt, and one row per (setting, layer, head set). n_prompts is
# the targets judged (original_success is over all of them; success_rate over n_eligible).
ORIGINAL_DECOMPOSITION_COLUMNS = ("setting", "step", "chain", "changed", "layer", "head_set", "n_prompts",
                                  "n_eligible", "success_rate", "success_low", "success_high", "original_success",
                                  "original_success_low", "original_success_high", "delta_original_success")
PATCHING_ORIGINAL_DECOMPOSITION_PROMPTS = Table(
    layout.PATCHING_ORIGINAL_DECOMPOSITION_PROMPTS, "original_decomposition_prompts", "patching_original",
    columns=("setting", "layer", "head_set", "prompt_id", "pair_id", "judged", "baseline_judged", "source_judged"))
PATCHING_ORIGINAL_DECOMPOSITION = Table(
    layout.PATCHING_ORIGINAL_DECOMPOSITION, "original_decomposition", "patching_original", "n_eligible_pairs",
    "eligible number pairs",
    columns=ORIGINAL_DECOMPOSITION_COLUMNS)
# One row per (pair kind, order, layer, head set); success_rate and recovery are over the
# n_eligible targets (source right, target wrong), so that is their n.
PATCHING_SUMMARY = Table(
    layout.PATCHING_SUMMARY, "patching_summary", "patching_summary", "n_eligible_pairs", "eligible number pairs",
    columns=PATCH_SUMMARY_COLUMNS)

# The focus-layer experiments: per-prompt rows and their summaries (success and recovery over
# n_eligible; in the break direction, success is taking the source's wrong answer).
PATCHING_REPLACEMENT_PROMPTS = _patching_prompts(layout.PATCHING_REPLACEMENT_PROMPTS, "patching_replacement")
PATCHING_REPLACEMENT = Table(layout.PATCHING_REPLACEMENT, "patching_summary", "patching_replacement", "n_eligible_pairs",
                             "eligible number pairs",
                             columns=(*PATCH_SUMMARY_COLUMNS, "fraction"))
PATCHING_EXHAUSTIVE_PROMPTS = _patching_prompts(layout.PATCHING_EXHAUSTIVE_PROMPTS, "patching_exhaustive")
# One row per (pair kind, order, layer, head set) with the set's composition (n_even, n_odd,
# composition) and k relative to the even pool (k_of_even_pool = k / number of even heads).
PATCHING_EXHAUSTIVE = Table(layout.PATCHING_EXHAUSTIVE, "patching_summary", "patching_exhaustive", "n_eligible_pairs",
                            "eligible number pairs",
                            columns=(*PATCH_SUMMARY_COLUMNS, "k", "n_even", "n_odd", "composition"))
PATCHING_RESIDUAL_MAP_PROMPTS = Table(
    layout.PATCHING_RESIDUAL_MAP_PROMPTS, "residual_map_prompts", "patching_residual_map",
    columns=("layer", "rank", "prompt_id", "pair_id", "logit_diff", "baseline_logit_diff", "source_logit_diff"))
PATCHING_RESIDUAL_MAP = Table(
    layout.PATCHING_RESIDUAL_MAP, "residual_map", "patching_residual_map", "n_eligible_pairs", "eligible number pairs",
    columns=("pair_kind", "order", "layer", "rank", "n_eligible", "success_rate", "recovery", "recovery_low",
             "recovery_high"))
PATCHING_BIDIRECTIONAL_PROMPTS = _patching_prompts(layout.PATCHING_BIDIRECTIONAL_PROMPTS, "patching_bidirectional")
PATCHING_BIDIRECTIONAL = Table(layout.PATCHING_BIDIRECTIONAL, "patching_summary", "patching_bidirectional", "n_eligible_pairs",
                               "eligible number pairs",
                         columns=(*PATCH_SUMMARY_COLUMNS, "direction"))
# One row per (direction, layer, head set, listed number pair): both orders of the pair.
PATCHING_LISTED_PAIRS = Table(
    layout.PATCHING_LISTED_PAIRS, "listed_pairs", "patching_bidirectional", "n_eligible", "eligible prompts",
    columns=("direction", "layer", "head_set", "correct", "wrong", "n_eligible", "n_success", "success_rate"))
# SAE-feature interventions: one row per (SAE set, layer, feature set, family, sample, intervention,
# scale) and target prompt; summarised per pairs (all / heldout), pair kind and order, with the
# patching summary's rates (success and recovery over the n_eligible targets).
INTERVENTION_CONDITION_COLUMNS = ("sae_set", "layer", "feature_set", "family", "sample", "intervention", "scale")
INTERVENTIONS_PROMPTS = Table(
    layout.INTERVENTIONS_PROMPTS, "interventions_prompts", "interventions",
    columns=(*INTERVENTION_CONDITION_COLUMNS, "prompt_id", "pair_id", "pair_kind", "order", "logit_diff",
             "baseline_logit_diff", "source_logit_diff"))
INTERVENTIONS = Table(
    layout.INTERVENTIONS, "interventions", "interventions", "n_eligible_pairs", "eligible number pairs",
    columns=(*INTERVENTION_CONDITION_COLUMNS, "n_features", "pairs", "pair_kind", "order", "n_eligible",
             "success_rate", "success_low", "success_high", "recovery", "recovery_low", "recovery_high",
             "accuracy", "accuracy_low", "accuracy_high", "baseline_accuracy", "broken_rate", "broken_low",
             "broken_high", "n_prompts", "n_pairs"))

HEAD_SET_FEATURES_PROMPTS = Table(
    layout.HEAD_SET_FEATURES_PROMPTS, "head_set_features_prompts", "head_set_features",
    columns=("sae_set", "layer", "feature_set", "head_set", "k", "prompt_id", "pair_id", "n_active"))
HEAD_SET_FEATURES = Table(
    layout.HEAD_SET_FEATURES, "head_set_features", "head_set_features", "n_pairs", "number pairs",
    columns=("sae_set", "layer", "feature_set", "n_features", "head_set", "pool", "k", "pairs", "mean_active", "active_low",
             "active_high", "unpatched_active", "source_active", "mean_activation", "unpatched_activation",
             "source_activation", "n_prompts", "n_pairs"))

# The ledger reads every table above that it names; it is a summary of them, so no hash of its own.
CLAIMS = Table(
    layout.CLAIMS, "claims", None,
    columns=("claim_id", "verdict", "form", "measured", "ci_low", "ci_high", "n"))
ORGANISM_LOCALISATION = Table(layout.ORGANISM_LOCALISATION, "localisation", "organism_localisation",
                              columns=("score", "value", "low", "high", "n", "n_unit", "detail"))
CLAIMS_TRUTH = Table(layout.CLAIMS_TRUTH, "claims_truth", None, columns=("claim_id", "expected", "obtained", "agrees"))


def check(table: Table, config: dict, path: str | os.PathLike | None = None) -> dict:
    """The metadata of `table` at `path`, after checking its kind, its stage's config hash and its
    declared columns (for readers that stream the file themselves)."""
    import pyarrow.parquet as pq

    from bugscope import io

    path = path or table.path
    meta = io.check_table(path, kind=table.kind, config_hash=table.config_hash(config))
    _check_columns(table, pq.read_schema(path).names, f"{path}")
    return meta


def _check_columns(table: Table, names: Sequence[str], where: str) -> None:
    from bugscope import io

    missing = [c for c in table.columns if c not in names]
    if missing:
        raise io.StaleTableError(
            f"{where} lacks the column(s) {missing} of a '{table.kind}' table: it was written by another "
            f"version of the pipeline. Remake it with `snakemake --cores all --force {where}`.")


def read(table: Table, config: dict, path: str | os.PathLike | None = None,
         columns: Sequence[str] | None = None) -> tuple[pa.Table, dict]:
    """(Arrow table, metadata) of a checked table; a stale, foreign or truncated one is refused
    with the command that remakes it."""
    import pyarrow.parquet as pq

    from bugscope import io

    path = path or table.path
    data, meta = io.read_table(path, kind=table.kind, config_hash=table.config_hash(config), columns=columns)
    _check_columns(table, pq.read_schema(path).names, f"{path}")
    return data, meta


def frame(table: Table, config: dict, path: str | os.PathLike | None = None,
          columns: Sequence[str] | None = None) -> pl.DataFrame:
    """`read` as a Polars frame, without the metadata."""
    import polars as pl

    return pl.from_arrow(read(table, config, path, columns)[0])


def write(table: Table, data: pa.Table | pl.DataFrame, path: str | os.PathLike, meta: Mapping[str, object]) -> None:
    """Write `data` atomically at `path` with its kind and provenance `meta` (config_hash included)."""
    with written_together() as put:
        put(table, data, path, meta)


@contextlib.contextmanager
def written_together() -> Iterator[Callable[..., None]]:
    """Yield `put(table, data, path, meta)` for the outputs of one rule. Each is written at once
    under a temporary name (so a group of large tables need not sit in memory together); all are
    renamed into place when the block ends, and none appears if anything in it fails."""
    import polars as pl

    from bugscope import io

    with contextlib.ExitStack() as stack:
        def put(table: Table, data: pa.Table | pl.DataFrame, path: str | os.PathLike,
                meta: Mapping[str, object]) -> None:
            arrow = data.to_arrow() if isinstance(data, pl.DataFrame) else data
            _check_columns(table, arrow.schema.names, f"the {table.kind} table for {path}")
            tmp = stack.enter_context(io.atomic_path(path))
            io.write_parquet(arrow, tmp, {"kind": table.kind, **meta})
        yield put
