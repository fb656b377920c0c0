"""Is the bug a version or date reading? (research notes section 11; Transluce's hypothesis)

In a version, a date or a section number, 9.11 comes after 9.8: read so, the buggy answer is right.
This module gives the reading families, prompts in which the version order is the right one, and
measures three things on them, with CIs over number pairs:

- accuracy: does the model answer each family by its own reading (`family_accuracy`)?
- closeness: a linear probe separates the reading families from the decimal family, trained on one
  wording of every family (even pair ids) and tested on another (odd pair ids), so that neither the
  template's tokens nor the numbers can carry it; applied to the analysis prompts, is the buggy
  format read more like a version than the correct one (`closeness_predictions`, `closeness_summary`)?
- the causal test: the reading direction (the difference of the family means at the decision
  position, on the training wording) projected out of the residual stream at the steered layers in
  the buggy format, against random directions of the same layers (`reading_directions`,
  bugscope.model.steering, `steering_summary`): the accuracy lift on every decimal pair, success and
  recovery on the eligible targets, the damage on the control pairs, and the change on the reading
  families, reported as evidence (it should drop if the direction is the reading).

The reading families stay out of SAE training, planting and every other stage: they live in their
own prompt table (layout.READING_PROMPTS), with the analysis table's columns (family, wording), prompt
and pair ids continuing the analysis table's, so that one activation file can hold both.

Light to import: NumPy, Polars and scikit-learn, no torch.
"""

from __future__ import annotations

import random
from typing import Mapping, Sequence

import numpy as np
import polars as pl

from bugscope.data.probes import fit_probe
from bugscope.data.prompts import (
    ALL,
    ANALYSIS,
    BUG_PAIR_KIND,
    CONTROLS,
    DECIMAL,
    Question,
    first_token_text,
    is_selection_pair,
    prompt_table,
    questions_of,
)
from bugscope.stats import (
    cluster_bootstrap_mean_ci_columns,
    cluster_bootstrap_ratio_ci_columns,
    cluster_resample_weights,
    cluster_resampled_means,
    derived_seed,
    percentile_interval,
)

TRAIN, TEST = "train", "test"  # the wordings of a reading family
# How a family writes a pair and which of its numbers is right: decimal order, version order, or a
# day of a month (version order too, on valid dates).
NUMBER_STYLES = ("decimal", "version", "date")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
MAX_DAY = 28  # valid in every month
_READING_STREAM = 33  # derived seed stream of the families' pairs
_DIRECTION_STREAM = 34  # derived seed stream of the random control directions
# The positions the closeness probe reads: the last token of the number named second, and the decision.
POSITIONS = {"numbers": "numbers_pos", "decision": "decision_pos"}
# Steering conditions: the reading direction and the random directions of the same layers; the reading
# features (SAE) and random features of the same layers, each tested against its own control.
NONE, READING, RANDOM = "none", "reading", "random"
READING_FEATURES, RANDOM_FEATURES = "reading_features", "random_features"
CONTROL_OF = {READING: RANDOM, READING_FEATURES: RANDOM_FEATURES}


def _draw(style: str, rng: random.Random, lo: int, hi: int) -> tuple[int, int, int]:
    """(x, y, zw): the bug's shape X.Y vs X.ZW with Y > Z, ZW a two-digit number; a date's day ZW at most MAX_DAY."""
    while True:
        x = rng.randint(1, 12) if style == "date" else rng.randint(lo, hi)
        y = rng.randint(2, 9)
        z = rng.randint(1, y - 1)
        w = rng.randint(1, 9)
        if style != "date" or 10 * z + w <= MAX_DAY:
            return x, y, 10 * z + w


def family_pairs(style: str, shape: tuple[int, int, int]) -> tuple[str, str]:
    """(right, other) of one drawn shape in a family's style: decimal X.Y over X.ZW; version X.ZW over
    X.Y; date "<month> ZW" over "<month> Y"."""
    x, y, zw = shape
    if style == "date":
        return f"{MONTHS[x - 1]} {zw}", f"{MONTHS[x - 1]} {y}"
    decimal = (f"{x}.{y}", f"{x}.{zw}")
    return decimal if style == "decimal" else decimal[::-1]


def reading_questions(config: dict, *, first_pair_id: int, taken: set[tuple[str, str]]) -> list[Question]:
    """Every family's questions: reading.n_pairs pairs of its own (drawn with its own generator,
    distinct from `taken` (the analysis pairs) and from the other families'), both orders, both wordings."""
    rcfg = config["reading"]
    lo, hi = config["prompts"]["integer_range"]
    seen = {tuple(sorted(p)) for p in taken}
    questions, pair_id = [], first_pair_id
    for index, (family, spec) in enumerate(rcfg["families"].items()):
        rng = random.Random(derived_seed(config["seed"], _READING_STREAM, index))
        pairs = []
        for _ in range(100 * rcfg["n_pairs"]):
            if len(pairs) == rcfg["n_pairs"]:
                break
            pair = family_pairs(spec["numbers"], _draw(spec["numbers"], rng, lo, hi))
            if tuple(sorted(pair)) not in seen:
                seen.add(tuple(sorted(pair)))
                pairs.append(pair)
        if len(pairs) < rcfg["n_pairs"]:
            raise ValueError(f"reading.families.{family}: only {len(pairs)} distinct pairs of its kind exist "
                             f"(reading.n_pairs={rcfg['n_pairs']}): lower reading.n_pairs or widen prompts.integer_range.")
        for wording in (TRAIN, TEST):
            questions += questions_of(pairs, spec[wording], family=family, wording=wording, first_pair_id=pair_id,
                                      kinds=[BUG_PAIR_KIND] * len(pairs))
        pair_id += len(pairs)
    return questions


def reading_formats(config: dict) -> dict:
    """The formats the families are asked in: the buggy and the correct one."""
    p = config["prompts"]
    return {name: p["formats"][name] for name in (p["buggy_format"], p["correct_format"])}


def build_reading_table(config: dict, tokenizer, analysis: pl.DataFrame):
    """The reading families' prompt table (an Arrow table of the analysis table's schema), its prompt,
    question and pair ids continuing the analysis table's."""
    questions = reading_questions(config, first_pair_id=int(analysis["pair_id"].max()) + 1,
                                  taken=set(zip(analysis["correct"], analysis["wrong"])))
    return prompt_table(questions, reading_formats(config), tokenizer, first_token_text(config["prompts"], tokenizer),
                        first_prompt_id=int(analysis["prompt_id"].max()) + 1,
                        first_question_id=int(analysis["question_id"].max()) + 1)


# --- the closeness probe --------------------------------------------------------------------------


def _family_weights(families: np.ndarray) -> np.ndarray:
    """Per row: the decimal family weighs as much as all reading families together, each of those the same."""
    labels, inverse, counts = np.unique(families, return_inverse=True, return_counts=True)
    n_reading = int((labels != DECIMAL).sum())
    weight = 1.0 / counts[inverse]
    return np.where(families == DECIMAL, weight, weight / max(n_reading, 1))


def closeness_predictions(vectors: Mapping[tuple[int, str], np.ndarray], meta: pl.DataFrame, *,
                          alphas: Sequence[float]) -> pl.DataFrame:
    """Per (layer, position, prompt): the probe's score (> 0: read as a version) and its reading.

    `vectors`: (layer, position name) -> [n, d] in `meta`'s row order; `meta` holds both prompt
    tables' rows (prompt_id, pair_id, pair_kind, order, format, family, wording). The probe is fitted
    on the reading table's training wording at the even pair ids, and applied to every row."""
    family = meta["family"].to_numpy()
    train = ((meta["wording"] == TRAIN) & is_selection_pair(meta["pair_id"])).to_numpy()
    if len(np.unique(family[train])) < 2 or DECIMAL not in set(family[train]):
        raise ValueError("the closeness probe needs the decimal family and at least one reading family on the training "
                         "wording: check reading.families and reading.n_pairs (>= 2 pairs each).")
    label = family != DECIMAL
    rows = []
    for (layer, position), x in sorted(vectors.items()):
        probe = fit_probe(x[train], label[train], _family_weights(family[train]), alphas)
        score = probe.decision_function(x)
        rows.append(meta.select("prompt_id", "pair_id", "pair_kind", "order", "format", "family", "wording")
                    .with_columns(layer=pl.lit(layer, pl.Int32), position=pl.lit(position),
                                  score=pl.Series(score), read_as_version=pl.Series(score > 0),
                                  trained_on=pl.Series(train)))
    return pl.concat(rows)


def pair_ci_row(values: np.ndarray, pairs: np.ndarray, boot: dict) -> dict:
    point, low, high = cluster_bootstrap_mean_ci_columns(values[:, None], pairs, **boot)
    return {"n_prompts": int(len(values)), "n_pairs": int(len(np.unique(pairs))), "value": float(point[0]),
            "value_low": float(low[0]), "value_high": float(high[0])}


def balanced_accuracy_row(right: np.ndarray, is_decimal: np.ndarray, pairs: np.ndarray, boot: dict) -> dict:
    """The probe's balanced accuracy, the mean of its accuracy on the decimal family and on the reading
    families (each family has as many rows): a probe that calls everything a version scores 0.5, not
    the reading families' share of the rows. CI: the same resamples of number pairs for both halves."""
    both = np.stack([np.where(is_decimal, right, np.nan), np.where(is_decimal, np.nan, right)], axis=1)
    labels, index = np.unique(pairs, return_inverse=True)
    weights = cluster_resample_weights(len(labels), n_resamples=boot["n_resamples"], seed=boot["seed"])
    resampled = cluster_resampled_means(both, index, weights).mean(1)
    low, high = percentile_interval(resampled[:, None], boot["confidence"])
    point = 0.5 * (right[is_decimal].mean() + right[~is_decimal].mean()) if is_decimal.any() and (~is_decimal).any() \
        else float("nan")
    return {"n_prompts": int(len(right)), "n_pairs": int(len(labels)), "value": float(point),
            "value_low": float(low[0]), "value_high": float(high[0])}


def kind_groups(frame: pl.DataFrame):
    """(pair kind, rows) for every kind, the controls pooled, and all kinds pooled."""
    yield ALL, frame
    for kind in sorted(set(frame["pair_kind"])):
        yield kind, frame.filter(pl.col("pair_kind") == kind)
    controls = frame.filter(pl.col("pair_kind") != BUG_PAIR_KIND)
    if controls.height and controls.height < frame.height:
        yield CONTROLS, controls


def _closeness_rows(part: pl.DataFrame, key: dict, formats: tuple[str, str], boot: dict) -> list[dict]:
    """The measures of one (layer, position): transfer accuracy per family (held-out wording and
    pairs), the rate read as a version per analysis format and kind, and the buggy - correct gap."""
    out = []
    held_out = part.filter(pl.col("wording") == TEST, ~is_selection_pair(pl.col("pair_id")))
    right = (held_out["read_as_version"] == (held_out["family"] != DECIMAL)).cast(pl.Float64).to_numpy()
    families = held_out["family"].to_numpy()
    pairs = held_out["pair_id"].to_numpy()
    out.append({**key, "measure": "transfer_accuracy", "family": ALL, "format": ALL, "pair_kind": BUG_PAIR_KIND,
                **balanced_accuracy_row(right, families == DECIMAL, pairs, boot)})
    for family in sorted(set(families)):
        mask = families == family
        out.append({**key, "measure": "transfer_accuracy", "family": family, "format": ALL, "pair_kind": BUG_PAIR_KIND,
                    **pair_ci_row(right[mask], pairs[mask], boot)})
    analysis = part.filter(pl.col("family") == DECIMAL, pl.col("wording") == ANALYSIS)
    buggy, correct = formats
    for kind, rows in kind_groups(analysis):
        for fmt in formats:
            f = rows.filter(pl.col("format") == fmt)
            out.append({**key, "measure": "version_rate", "family": DECIMAL, "format": fmt, "pair_kind": kind,
                        **pair_ci_row(f["read_as_version"].cast(pl.Float64).to_numpy(), f["pair_id"].to_numpy(), boot)})
        paired = (rows.filter(pl.col("format") == buggy).select("pair_id", "order", pl.col("read_as_version").alias("b"))
                  .join(rows.filter(pl.col("format") == correct).select("pair_id", "order",
                                                                       pl.col("read_as_version").alias("c")),
                        on=["pair_id", "order"]))
        gap = paired["b"].cast(pl.Float64).to_numpy() - paired["c"].cast(pl.Float64).to_numpy()
        out.append({**key, "measure": "buggy_minus_correct", "family": DECIMAL, "format": f"{buggy}-{correct}",
                    "pair_kind": kind, **pair_ci_row(gap, paired["pair_id"].to_numpy(), boot)})
    return out


def closeness_summary(predictions: pl.DataFrame, *, buggy_format: str, correct_format: str, min_accuracy: float,
                      n_resamples: int, confidence: float, seed: int) -> pl.DataFrame:
    """Per (variant, layer, position, measure, family, format, pair kind): value with its CI over
    number pairs (module docstring). variant `all_pairs`: every layer and position on every pair;
    `heldout_selected`: the (layer, position) whose buggy - correct gap on the bug's kind is largest
    on the even analysis pairs, every measure there on the odd ones. The choice is made among the
    probes that tell the families apart, a balanced accuracy of at least `min_accuracy` on the test
    wording of the even family pairs (claims.verdicts.reading_probe_min_accuracy; among all of them
    where none does): a gap read by a probe that calls everything a version means nothing."""
    boot = dict(n_resamples=n_resamples, confidence=confidence, seed=seed)
    formats = (buggy_format, correct_format)
    out = []
    for (layer, position), part in predictions.group_by("layer", "position", maintain_order=True):
        out += _closeness_rows(part, {"variant": "all_pairs", "layer": layer, "position": position}, formats, boot)
    selection = is_selection_pair(pl.col("pair_id"))
    valid = (predictions.filter(pl.col("wording") == TEST, selection)
             .with_columns(right=(pl.col("read_as_version") == (pl.col("family") != DECIMAL)).cast(pl.Float64),
                           decimal=pl.col("family") == DECIMAL)
             .group_by("layer", "position", "decimal").agg(pl.col("right").mean())
             .group_by("layer", "position").agg(balanced=pl.col("right").mean()))
    analysis = predictions.filter(pl.col("wording") == ANALYSIS, pl.col("pair_kind") == BUG_PAIR_KIND, selection)
    gaps = (analysis.group_by("layer", "position", "format").agg(pl.col("read_as_version").cast(pl.Float64).mean())
            .pivot(on="format", index=["layer", "position"], values="read_as_version")
            .with_columns(gap=pl.col(buggy_format) - pl.col(correct_format))
            .join(valid, on=["layer", "position"], how="left")
            .with_columns(valid=pl.col("balanced") >= min_accuracy))
    if gaps["valid"].any():
        gaps = gaps.filter(pl.col("valid"))
    gaps = gaps.sort(pl.col("gap"), "layer", "position", descending=[True, False, False])
    layer, position = gaps["layer"][0], gaps["position"][0]
    chosen = predictions.filter(pl.col("layer") == layer, pl.col("position") == position,
                                ~(is_selection_pair(pl.col("pair_id")) & (pl.col("wording") == ANALYSIS)))
    out += _closeness_rows(chosen, {"variant": "heldout_selected", "layer": layer, "position": position}, formats, boot)
    return pl.DataFrame(out).with_columns(confidence=pl.lit(confidence))


# --- accuracy on the families ---------------------------------------------------------------------


def family_accuracy(scores: pl.DataFrame, *, n_resamples: int, confidence: float, seed: int) -> pl.DataFrame:
    """Per (family, wording, format; each also pooled): the model's accuracy by the family's own
    reading, unsteered, with CIs over number pairs. `scores`: prompt rows with family, wording,
    format, pair_id and is_correct."""
    boot = dict(n_resamples=n_resamples, confidence=confidence, seed=seed)
    out = []
    for family in sorted(set(scores["family"])):
        rows = scores.filter(pl.col("family") == family)
        for wording in [ALL, *sorted(set(rows["wording"]))]:
            for fmt in [ALL, *sorted(set(rows["format"]))]:
                f = rows.filter(((pl.col("wording") == wording) | (wording == ALL)) &
                                ((pl.col("format") == fmt) | (fmt == ALL)))
                r = pair_ci_row(f["is_correct"].cast(pl.Float64).to_numpy(), f["pair_id"].to_numpy(), boot)
                out.append({"family": family, "wording": wording, "format": fmt, "n_prompts": r["n_prompts"],
                            "n_pairs": r["n_pairs"], "accuracy": r["value"], "accuracy_low": r["value_low"],
                            "accuracy_high": r["value_high"], "confidence": confidence})
    return pl.DataFrame(out)


# --- the causal test ------------------------------------------------------------------------------


def reading_directions(vectors: np.ndarray, family: np.ndarray) -> np.ndarray:
    """[d] unit vector: the mean of the reading families' rows (each family weighing the same) minus
    the decimal family's mean."""
    readings = [vectors[family == f].mean(0) for f in sorted(set(family)) if f != DECIMAL]
    diff = np.mean(readings, axis=0) - vectors[family == DECIMAL].mean(0)
    norm = np.linalg.norm(diff)
    if not norm > 0:
        raise ValueError("the reading direction is zero: the families' mean residuals are equal.")
    return diff / norm


def random_directions(d_model: int, layers: Sequence[int], n: int, seed: int) -> list[dict[int, np.ndarray]]:
    """`n` conditions of one random unit vector per layer (Gaussian, normalised), seeded per draw and layer."""
    out = []
    for draw in range(n):
        condition = {}
        for layer in layers:
            v = np.random.default_rng(derived_seed(seed, _DIRECTION_STREAM, draw, layer)).standard_normal(d_model)
            condition[layer] = v / np.linalg.norm(v)
        out.append(condition)
    return out


def steering_summary(steered: pl.DataFrame, prompts: pl.DataFrame, baseline: pl.DataFrame, *, buggy_format: str,
                     correct_format: str, n_resamples: int, confidence: float, seed: int) -> pl.DataFrame:
    """The causal test per condition (reading; random pooled over its draws), long format: per
    (condition, subject, pair kind, measure) value with its CI over number pairs.

    A tested condition (reading, reading_features) is compared with its own control (CONTROL_OF).
    `steered`: (prompt_id, condition, draw, logit_diff): condition `none` (unsteered) for every
    prompt it scores, the others for the steered ones; `prompts`: both tables' rows; `baseline`: the
    analysis prompts' unsteered (prompt_id, logit_diff) of the baseline stage, whose correct-format
    prompts are the sources that make a buggy-format target eligible. Measures on the analysis prompts (subject `decimal`), per kind: accuracy,
    accuracy_change (steered - unsteered, paired per prompt) and, for the reading direction,
    change_vs_random (its change minus the random directions' mean change, paired per prompt); on the
    eligible targets (subject `eligible`: the bug's kind, the buggy format wrong and the same
    question's correct format right, unsteered): success_rate and recovery (a ratio of sums); on
    each reading family (its test wording): accuracy_change."""
    boot = dict(n_resamples=n_resamples, confidence=confidence, seed=seed)
    meta = prompts.select("prompt_id", "question_id", "pair_id", "pair_kind", "format", "family", "wording")
    none = steered.filter(pl.col("condition") == NONE).select("prompt_id", pl.col("logit_diff").alias("unsteered"))
    per_condition = (steered.filter(pl.col("condition") != NONE)
                     .group_by("prompt_id", "condition").agg(pl.col("logit_diff"),
                                                             (pl.col("logit_diff") > 0).cast(pl.Float64).mean()
                                                             .alias("right"))
                     .join(none, on="prompt_id").join(meta, on="prompt_id")
                     .with_columns(change=pl.col("right") - (pl.col("unsteered") > 0).cast(pl.Float64)))
    out = []
    present = set(per_condition["condition"])
    for condition in [c for pair in CONTROL_OF.items() for c in pair if c in present]:
        rows = per_condition.filter(pl.col("condition") == condition, pl.col("format") == buggy_format)
        decimal = rows.filter(pl.col("family") == DECIMAL, pl.col("wording") == ANALYSIS)
        for kind, part in kind_groups(decimal):
            pairs = part["pair_id"].to_numpy()
            key = {"condition": condition, "subject": DECIMAL, "pair_kind": kind}
            out.append({**key, "measure": "accuracy", **pair_ci_row(part["right"].to_numpy(), pairs, boot)})
            out.append({**key, "measure": "accuracy_change", **pair_ci_row(part["change"].to_numpy(), pairs, boot)})
            if condition in CONTROL_OF and CONTROL_OF[condition] in present:
                random_change = (per_condition.filter(pl.col("condition") == CONTROL_OF[condition])
                                 .select("prompt_id", pl.col("change").alias("random_change")))
                vs = part.join(random_change, on="prompt_id")
                out.append({**key, "measure": "change_vs_random",
                            **pair_ci_row((vs["change"] - vs["random_change"]).to_numpy(), vs["pair_id"].to_numpy(),
                                      boot)})
        out += _eligible_rows(decimal, baseline, meta, condition, correct_format, boot)
        for family in sorted(set(rows["family"]) - {DECIMAL}):
            part = rows.filter(pl.col("family") == family, pl.col("wording") == TEST)
            out.append({"condition": condition, "subject": family, "pair_kind": BUG_PAIR_KIND,
                        "measure": "accuracy_change", **pair_ci_row(part["change"].to_numpy(), part["pair_id"].to_numpy(),
                                                                boot)})
    return pl.DataFrame(out).with_columns(confidence=pl.lit(confidence))


def _eligible_rows(decimal: pl.DataFrame, baseline: pl.DataFrame, meta: pl.DataFrame, condition: str,
                   correct_format: str, boot: dict) -> list[dict]:
    """Success rate and recovery on the eligible targets (the patching summary's measures): the bug's
    kind, wrong unsteered in the buggy format, right in the same question's correct format."""
    source = (meta.filter(pl.col("format") == correct_format).join(baseline.select("prompt_id", "logit_diff"),
                                                                   on="prompt_id")
              .select("question_id", pl.col("logit_diff").alias("source")))
    targets = (decimal.filter(pl.col("pair_kind") == BUG_PAIR_KIND).join(source, on="question_id")
               .filter(pl.col("unsteered") <= 0, pl.col("source") > 0))
    key = {"condition": condition, "subject": "eligible", "pair_kind": BUG_PAIR_KIND}
    pairs = targets["pair_id"].to_numpy()
    if not targets.height:
        empty = {"n_prompts": 0, "n_pairs": 0, "value": None, "value_low": None, "value_high": None}
        return [{**key, "measure": m, **empty} for m in ("success_rate", "recovery")]
    # each draw's logit difference over the unsteered one, on the source's gap: a ratio of sums
    gained = np.array([np.mean(ld) for ld in targets["logit_diff"].to_list()]) - targets["unsteered"].to_numpy()
    gap = targets["source"].to_numpy() - targets["unsteered"].to_numpy()
    point, low, high = cluster_bootstrap_ratio_ci_columns(gained[:, None], gap[:, None], pairs, **boot)
    return [
        {**key, "measure": "success_rate", **pair_ci_row(targets["right"].to_numpy(), pairs, boot)},
        {**key, "measure": "recovery", "n_prompts": targets.height, "n_pairs": int(len(np.unique(pairs))),
         "value": float(point[0]), "value_low": float(low[0]), "value_high": float(high[0])},
    ]
