"""The ledger file (config/claims.yaml): the tables a claim may name, and the shape of each claim.

The grammar of a check and the verdict rules are in `bugscope.claims`, which evaluates them.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from bugscope import tables

TESTS = ("near", "range", "at_least", "at_most", "below", "above", "local_max")
AGGREGATES = ("single", "min", "max", "max_abs", "min_abs")


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
        if c.get("source", "seed document") not in ("seed document", "paper"):
            raise LedgerError(f"{path}: claim {cid}: source must be 'seed document' (the default) or 'paper'.")
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
                _check_shape(cid, check, path)
    return claims


def _check_shape(cid: str, check: dict, path) -> None:
    if check.get("table") not in TABLES:
        raise LedgerError(f"{path}: claim {cid}: table {check.get('table')!r} is not one of {', '.join(TABLES)}.")
    if "metric" not in check:
        raise LedgerError(f"{path}: claim {cid}: a check needs a 'metric' (a column or 'a / b').")
    tests = [t for t in TESTS if t in check]
    if len(tests) != 1:
        raise LedgerError(f"{path}: claim {cid}: a check needs exactly one test of {', '.join(TESTS)}; found {tests}.")
    if check.get("aggregate", "single") not in AGGREGATES:
        raise LedgerError(f"{path}: claim {cid}: aggregate must be one of {', '.join(AGGREGATES)}.")


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
