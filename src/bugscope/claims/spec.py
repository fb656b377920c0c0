"""The ledger file (config/claims.yaml): the tables a claim may name, and the shape of each claim.

The grammar of a check and the verdict rules are in `bugscope.claims`, which evaluates them.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from bugscope import tables

TESTS = ("near", "range", "at_least", "at_most", "below", "above", "local_max", "selects")
AGGREGATES = ("single", "min", "max", "max_abs", "min_abs")
# Where a claim comes from: the seed document, the paper, or a control the pipeline adds (a claim
# false by construction on the planted model, bugscope.claims.truth).
CLAIM_SOURCES = ("seed document", "paper", "rival explanation", "control")

# What a claim may name in `needs:` (bugscope.claims.preconditions evaluates them).
PRECONDITIONS = ("premise", "ceiling", "eligible_pairs", "sources_judged", "features_can_move", "reading_probe")

# The value of a metric under "no effect": a tolerance window around a claimed value must not
# contain it (a "1.25x amplification" window of +/- 0.3 would pass at 1.0), and a bound equal to it
# is strict. A check can name its own with `null:`.
METRIC_NULLS = {
    "amplification_geomean": 1.0, "amplification_excess": 1.0, "amplification_original_mean_of_ratios": 1.0,
    "ratio": 1.0, "format_effect_pct": 0.0, "accuracy_gap": 0.0, "delta_original_success": 0.0,
    "effect_size": 0.0, "mean_diff": 0.0,
}


# The tables the ledger can test, by the name a claim uses (bugscope.tables declares each).
TABLES: dict[str, tables.Table] = {
    "baseline_accuracy": tables.BASELINE_ACCURACY,
    "baseline_scores": tables.BASELINE_SCORES,
    "baseline_contrast": tables.BASELINE_CONTRAST,
    "feature_overlap": tables.FEATURE_OVERLAP,
    "discriminative_features": tables.DISCRIMINATIVE_FEATURES,
    "named_features": tables.NAMED_FEATURES,
    "feature_tokens": tables.FEATURE_TOKENS,
    "head_feature_attribution": tables.HEAD_FEATURE_ATTRIBUTION,
    "head_parity": tables.HEAD_PARITY,
    "head_patching": tables.PATCHING_SUMMARY,
    "head_replacement": tables.PATCHING_REPLACEMENT,
    "head_subsets_exhaustive": tables.PATCHING_EXHAUSTIVE,
    "residual_map": tables.PATCHING_RESIDUAL_MAP,
    "head_bidirectional": tables.PATCHING_BIDIRECTIONAL,
    "listed_pairs": tables.PATCHING_LISTED_PAIRS,
    "original_decomposition": tables.PATCHING_ORIGINAL_DECOMPOSITION,
    "sae_quality": tables.SAE_QUALITY,
    "interventions": tables.INTERVENTIONS,
    "head_set_features": tables.HEAD_SET_FEATURES,
    "probes": tables.PROBES,
    "reading_accuracy": tables.READING_ACCURACY,
    "reading_closeness": tables.READING_CLOSENESS,
    "reading_steering": tables.READING_STEERING,
}


class LedgerError(ValueError):
    """The ledger file is malformed; the message names the claim and the key."""


def load_ledger(path: str | Path) -> list[dict]:
    """The claims of a ledger file, checked for shape (the columns a check names are checked when it runs)."""
    with open(path) as fh:
        doc = yaml.safe_load(fh) or {}
    claims = doc.get("claims")
    if not isinstance(claims, list) or not claims:
        raise LedgerError(f"{path}: expected a top-level 'claims:' list with at least one claim.")
    seen = set()
    for c in claims:
        cid = c.get("id")
        for key in ("id", "section", "claim", "study_value", "forms"):
            if key not in c:
                raise LedgerError(f"{path}: claim {cid or '?'} has no '{key}'.")
        if cid in seen:
            raise LedgerError(f"{path}: claim id {cid!r} appears twice.")
        seen.add(cid)
        if c.get("source", "seed document") not in CLAIM_SOURCES:
            raise LedgerError(f"{path}: claim {cid}: source must be one of {', '.join(CLAIM_SOURCES)} "
                              "('seed document' is the default).")
        _check_expected(c.get("expected", {}), f"{path}: claim {cid}")
        for form in c["forms"]:
            if form.get("form") not in ("literal", "agnostic"):
                raise LedgerError(f"{path}: claim {cid}: each form needs 'form: literal' or 'form: agnostic'.")
            if "description" not in form or not form.get("checks"):
                raise LedgerError(f"{path}: claim {cid} ({form['form']}): a form needs a description and checks.")
            wanted = form.get("requires_sae")
            if wanted is not None and (not isinstance(wanted, dict) or set(wanted) != {"release", "site"}):
                raise LedgerError(f"{path}: claim {cid} ({form['form']}): requires_sae must be "
                                  "{release: <SAE-Lens release>, site: <hook site>}.")
            for check in form["checks"]:
                _check_shape(cid, check, c["study_value"], path)
        needs = c.get("needs", [])
        unknown = [n for n in needs if n not in PRECONDITIONS]
        if not isinstance(needs, list) or unknown:
            raise LedgerError(f"{path}: claim {cid}: needs must be a list of {', '.join(PRECONDITIONS)}; "
                              f"unknown: {unknown}.")
    return claims


def _check_expected(expected, where: str) -> None:
    from bugscope.claims.truth import EXPECTATIONS, ROLES

    if not isinstance(expected, dict) or any(k not in ROLES or v not in EXPECTATIONS for k, v in expected.items()):
        raise LedgerError(f"{where}: expected must map a model ({', '.join(ROLES)}) to one of "
                          f"{', '.join(EXPECTATIONS)}; found {expected!r}.")


def load_expected_preconditions(path: str | Path) -> dict[str, dict[str, str]]:
    """The ledger file's `expected_preconditions:` (precondition -> model -> expectation)."""
    with open(path) as fh:
        doc = yaml.safe_load(fh) or {}
    expected = doc.get("expected_preconditions", {}) or {}
    for name, by_role in expected.items():
        if name not in PRECONDITIONS:
            raise LedgerError(f"{path}: expected_preconditions names {name!r}; preconditions are "
                              f"{', '.join(PRECONDITIONS)}.")
        _check_expected(by_role, f"{path}: expected_preconditions.{name}")
    return expected


def metric_null(check: dict) -> float | None:
    """The check's null value: its own `null:`, else the metric's (METRIC_NULLS), else None."""
    if "null" in check:
        return float(check["null"])
    return METRIC_NULLS.get(check["metric"].strip())


def _refuse_window_with_null(cid: str, check: dict, study_value, path) -> None:
    null = metric_null(check)
    if null is None:
        return
    if "near" in check:
        try:
            t, tol = float(check["near"].get("target", study_value)), float(check["near"]["tolerance"])
        except (TypeError, ValueError):
            raise LedgerError(f"{path}: claim {cid}: near needs a numeric target (or a numeric study_value).") from None
        lo, hi = t - tol, t + tol
    elif "range" in check:
        lo, hi = map(float, check["range"])
    else:
        return
    claimed = float(check["near"].get("target", study_value)) if "near" in check else None
    if lo <= null <= hi and claimed != null:
        raise LedgerError(f"{path}: claim {cid}: the window [{lo:g}, {hi:g}] of {check['metric']} contains its null "
                          f"{null:g} (no effect), so it would pass without an effect. Narrow the tolerance so that "
                          "the window excludes the null, or test the effect against the null separately.")


def _check_shape(cid: str, check: dict, study_value, path) -> None:
    if check.get("table") not in TABLES:
        raise LedgerError(f"{path}: claim {cid}: table {check.get('table')!r} is not one of {', '.join(TABLES)}.")
    if "metric" not in check:
        raise LedgerError(f"{path}: claim {cid}: a check needs a 'metric' (a column or 'a / b').")
    tests = [t for t in TESTS if t in check]
    if len(tests) != 1:
        raise LedgerError(f"{path}: claim {cid}: a check needs exactly one test of {', '.join(TESTS)}; found {tests}.")
    if check.get("aggregate", "single") not in AGGREGATES:
        raise LedgerError(f"{path}: claim {cid}: aggregate must be one of {', '.join(AGGREGATES)}.")
    _refuse_window_with_null(cid, check, study_value, path)


def metric_columns(metric: str) -> list[str]:
    return [p.strip() for p in metric.split("/")]


def referenced_columns(check: dict) -> list[str]:
    """Every column of its table a check reads: where keys, metric, CI, `also` and `after` marks."""
    cols = list(check.get("where", {}))
    cols += metric_columns(check["metric"])
    cols += list(check.get("ci", []))
    cols += list(check.get("also", {}))
    cols += list(check.get("beside", []))
    for v in check.get("where", {}).values():
        if isinstance(v, dict) and "after" in v:
            cols.append(v["after"])
    for test in ("below", "above"):
        if test in check:
            cols += list(check[test].get("where", {}))
    return cols
