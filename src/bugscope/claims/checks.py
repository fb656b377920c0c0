"""One check of a claim: the grammar of the ledger file, and how a check is evaluated on the tables.

`config/claims.yaml` lists the claims. Each claim has one or more *forms*, tried in order: the
`literal` form tests the seed's statement as written (its layer numbers and feature ids, so it
usually `requires_model` Llama-3.1-8B); an `agnostic` form tests what the claim means on any model
("a middle layer of maximum overlap between two layers of low overlap"). The first form that can be
tested decides the verdict:

- `holds` / `fails` / `inconclusive`: decided on intervals (`bugscope.claims.decide`): every check
  passes / one fails / neither;
- `not testable here`: no form can be tested (the model is not the one the ids belong to, a table
  was not produced, no row matches, the metric is null, or a precondition the claim `needs`
  failed: `bugscope.claims.preconditions`); `detail` says why.

A check selects rows of one table (`where`), reduces them to one row (`aggregate`), reads `metric`
(a column) and its interval (`<metric>_low` / `<metric>_high`, the rate columns of
`RATE_INTERVALS`, or the check's `ci: [low, high]`), and applies one test against a region:

    near: {target, tolerance}     the interval within target +/- tolerance (target defaults to
                                  study_value); an equivalence test (TOST) against that margin
    range: [low, high]            the interval within [low, high]
    at_least: x / at_most: x      the interval at or above / at or below x ($all / $none: the
                                  config's claims.verdicts.all_fraction / none_fraction); a bound at
                                  the metric's null (spec.METRIC_NULLS, or `null:`) is strict
    below / above: {where: {...}} against the rows the inner `where` selects: Fisher's exact test
                                  on success counts (success_rate with n_eligible), else separate
                                  intervals
    local_max: true               the selected layer's CI lies above the CI of some earlier and
                                  some later layer (never "fails": not shown is not disproved)
    selects: true                 the check only picks the row; its `also` conditions decide

Pass: the interval inside the region; fail: outside it; otherwise inconclusive. A value without an
interval decides nothing unless the check says `exact: true` (named items measured without
sampling); a bootstrap over fewer than `min_bootstrap_clusters` clusters decides nothing.
`also: {column: {at_most/at_least/above/below: x}}` adds conditions on the selected row: on a
p / q column a significance test (Holm within the claim's section, at claims.verdicts.alpha); on a
`_low` / `_high` column an interval condition; on any other column a condition that can only
withhold a verdict. `beside: [columns]` reports other columns of the selected row (with their
interval) in `detail` without testing them: an overlap is shown with its same-format chance level.

`where` values: a scalar (equality), a list (membership), `{not: v}`, `{between: [a, b]}`,
`{depth: f}` (the layer round(f * (num_layers - 1)): a layer at the same relative depth as the
seed's), `{after: <bool column>, by: n}` (the analysed layer n places after the row marked by that
column), and the tokens `$focus` (the focus layers), `$buggy_format`, `$correct_format`,
`$half_even_heads` / `$quarter_even_heads` (half / a quarter of the even heads: 8 / 4 of Llama's 16),
`$min_gap` (claims.verdicts.premise_min_gap: the smallest accuracy gap that counts as an effect),
`$damage_floor` (minus claims.verdicts.max_control_damage: the largest drop on the controls that is no damage).
A list in `where` (feature ids, `$focus`) must be matched in full: a check whose listed values are
not all in the table is not testable, never scored on the ones present. Correlation claims are
signed ("tied to the even heads" is r < 0 with odd = 1); an aggregate ending in `_abs` tests the
absolute value, which no such claim may use.
Unless a check names them, `pair_kind` and `order` select the bug's kind with both orders pooled
(`DEFAULT_WHERE`).

SAE sets: the feature tables and the SAE quality table hold one set's rows per `sae_set`. A form
reads the primary set (the first of `sae.sets`) unless it declares `requires_sae: {release, site}`
(the seed's feature ids belong to Llama Scope's MLP-output SAEs): it then reads the set with that
release and site, and is not testable on a run without one. An agnostic form is also evaluated on
every other set: `agrees_across_sae_sets` says whether its verdict is the same there (null with one
set, or where no other set could test it).

A claim on a selected item (a marked layer, a top-ranked feature, the most correlated feature) is
tested on data that did not select it, which the ledger says in the form's description: marks and
ranks chosen on the even pair ids and statistics of the odd ones (feature_overlap rows of variant
per_pair_heldout, discriminative heldout_* columns), or a familywise p (head_parity).
"""

from __future__ import annotations

import math
from typing import Mapping

import polars as pl

from bugscope.claims.decide import FAIL, INCONCLUSIVE, PASS, PTest, combine, region_outcome
from bugscope.claims.select import (
    ALSO_OPS,
    EXACT_INTERVAL_METRICS,
    EXACT_INTERVAL_TABLES,
    OVER_ALL_TARGETS,
    Context,
    NotTestable,
    beside_text,
    describe_row,
    interval_of,
    metric_values,
    pick_row,
    require_every_listed_value,
    resolve_value,
    select,
    success_counts,
    where_for,
)
from bugscope.claims.spec import TABLES, LedgerError, metric_null
from bugscope.stats import fewest_clusters_to_decide, fisher_exact_p


def rule_text(check: dict, study_value, ctx: Context | None = None) -> str:
    """The requirement of a check as the ledger prints it (decided on the interval: `decide`)."""
    m = check["metric"]
    if check.get("aggregate", "single") != "single":
        m = f"{check['aggregate']}({m})"

    def bound(key: str) -> str:
        return f"{_bound(check, key, ctx):g}" if ctx else str(check[key])

    if "near" in check:
        t = check["near"].get("target", study_value)
        return f"|{m} - {t}| <= {check['near']['tolerance']}"
    if "range" in check:
        return f"{check['range'][0]} <= {m} <= {check['range'][1]}"
    if "at_least" in check:
        return f"{m} >= {bound('at_least')}"
    if "at_most" in check:
        return f"{m} <= {bound('at_most')}"
    if "below" in check:
        return f"{m} < {check['metric']} at {check['below']['where']}"
    if "above" in check:
        return f"{m} > {check['metric']} at every row of {check['above']['where']}"
    if "selects" in check:
        return f"{m} selects the row; " + ", ".join(f"{c} {op} {x}" for c, cond in check.get("also", {}).items()
                                                    for op, x in cond.items())
    return f"{m}: CI above the CI of an earlier and a later layer"


def _interval(sel: pl.DataFrame, row: int, check: dict, value: float, n_unit: str | None, n: int | None,
              ctx: Context) -> tuple[float | None, float | None, str, str]:
    """(low, high, kind, why not): the interval a check decides on. kind: exact (an exact interval),
    named (`exact: true`: a value of named items without sampling error), bootstrap, or none."""
    low, high = interval_of(sel, row, check, value)
    if check.get("exact"):
        v = abs(value) if check.get("aggregate", "single").endswith("_abs") else value
        return v, v, "named", ""
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return None, None, "none", "no interval: a point estimate decides nothing"
    if check["metric"].strip() in EXACT_INTERVAL_METRICS and check["table"] in EXACT_INTERVAL_TABLES:
        return low, high, "exact", ""
    floor = int(ctx.verdicts["min_bootstrap_clusters"])
    unit = n_unit or ""
    if n is not None and ("pairs" in unit or "questions" in unit) and n < floor:
        return low, high, "bootstrap", (f"a bootstrap over {n} {unit} (fewer than {floor}) has a degenerate "
                                        "percentile interval")
    return low, high, "bootstrap", ""


def _bound(check: dict, key: str, ctx: Context) -> float:
    """An `at_least` / `at_most` bound, its token ($all, $none) resolved."""
    return float(resolve_value(check[key], ctx))


def _region(check: dict, study_value, ctx: Context) -> tuple[float, float, bool, bool]:
    """(lo, hi, strict lo, strict hi) of a one-row test: where the claim is true."""
    null = metric_null(check)
    if "near" in check:
        t, tol = float(check["near"].get("target", study_value)), float(check["near"]["tolerance"])
        return t - tol, t + tol, False, False
    if "range" in check:
        return float(check["range"][0]), float(check["range"][1]), False, False
    if "at_least" in check:
        x = _bound(check, "at_least", ctx)
        return x, math.inf, null is not None and x == null, False
    x = _bound(check, "at_most", ctx)
    return -math.inf, x, False, null is not None and x == null


def _counts(df: pl.DataFrame, i: int, metric: str) -> tuple[int, int] | None:
    """(successes, targets) of a success rate on eligible targets, for Fisher's test."""
    if metric.strip() not in EXACT_INTERVAL_METRICS or "n_eligible" not in df.columns:
        return None
    return success_counts(df[metric.strip()][i], df["n_eligible"][i])


def _compare(check: dict, sel: pl.DataFrame, row: int, other: pl.DataFrame, where: Mapping, value: float,
             low, high, direction: str) -> tuple[str | None, list[PTest], str]:
    """Two arms: Fisher's test on success counts, else separate intervals (`decide` module docstring)."""
    metric = check["metric"]
    mine = _counts(sel, row, metric)
    ref_values = metric_values(other, metric)
    if mine is not None and all(_counts(other, j, metric) is not None for j in range(other.height)):
        tests = []
        for j in range(other.height):
            k2, n2 = _counts(other, j, metric)
            p = fisher_exact_p(*mine, k2, n2)
            r1, r2 = mine[0] / max(mine[1], 1), k2 / max(n2, 1)
            label = f"{mine[0]}/{mine[1]} vs {k2}/{n2} at {describe_row(other, j, where)}"
            tests.append(PTest(label, p, "effect", r1 > r2 if direction == "above" else r1 < r2))
        return None, tests, f"Fisher's exact test on success counts against {other.height} row(s), Holm in the section"
    if check.get("exact"):  # named items measured without sampling: the values themselves compare
        finite = [j for j, v in enumerate(ref_values) if v is not None and math.isfinite(v)]
        if not finite:
            raise NotTestable("the comparison rows' metric is null")
        refs = [ref_values[j] for j in finite]
        ok = value > max(refs) if direction == "above" else value < min(refs)
        return PASS if ok else FAIL, [], f"exact values: {value:.4g} against {', '.join(f'{r:.4g}' for r in refs)}"
    lo_col, hi_col = check.get("ci") or [f"{metric}_low", f"{metric}_high"]
    if low is None or lo_col not in other.columns:
        return INCONCLUSIVE, [], "no interval to compare (a point-estimate comparison decides nothing)"
    o_lo = [v for v in other[lo_col].to_list() if v is not None and math.isfinite(v)]
    o_hi = [v for v in other[hi_col].to_list() if v is not None and math.isfinite(v)]
    if not o_lo or not o_hi:
        raise NotTestable("the comparison rows have no CI")
    if direction == "above":
        outcome = PASS if low > max(o_hi) else FAIL if high < max(o_lo) else INCONCLUSIVE
    else:
        outcome = PASS if high < min(o_lo) else FAIL if low > min(o_hi) else INCONCLUSIVE
    finite = [j for j, v in enumerate(ref_values) if v is not None and math.isfinite(v)]
    j = max(finite, key=lambda i: ref_values[i]) if direction == "above" else min(finite, key=lambda i: ref_values[i])
    return outcome, [], (f"CI [{low:.3g}, {high:.3g}] against {other.height} comparison row(s), e.g. "
                         f"{ref_values[j]:.4g} [{other[lo_col][j]:.3g}, {other[hi_col][j]:.3g}] at "
                         f"{describe_row(other, j, where)}: separate intervals decide")


def _is_universal(check: dict) -> bool:
    """min with a lower bound, max (or max_abs) with an upper bound: a claim about every row."""
    agg = check.get("aggregate", "single")
    return (agg == "min" and "at_least" in check) or (agg in ("max", "max_abs") and "at_most" in check)


def _row_n(sel: pl.DataFrame, row: int, check: dict) -> tuple[int | None, str | None]:
    """(n, unit) of a row: its independent clusters for the check's metric."""
    spec = TABLES[check["table"]]
    n = (int(sel[spec.n_column][row]) if spec.n_column in sel.columns and sel[spec.n_column][row] is not None
         else None)
    n_unit = spec.n_unit
    if n is None and check["table"] == "baseline_scores":
        n, n_unit = 1, "named prompt"
    if check["metric"].startswith("heldout_") and "n_heldout_pairs" in sel.columns:  # the held-out half's own n
        n, n_unit = sel["n_heldout_pairs"][row], "held-out number pairs"
    elif check["metric"].strip() in OVER_ALL_TARGETS and "n_pairs" in sel.columns:
        n, n_unit = sel["n_pairs"][row], "number pairs"
    return n, n_unit


def _row_outcome(sel: pl.DataFrame, i: int, check: dict, values, region, ctx: Context) -> str:
    """One row's outcome against the region, on its own interval."""
    n, n_unit = _row_n(sel, i, check)
    low, high, _, why = _interval(sel, i, check, float(values[i]), n_unit, n, ctx)
    if why:
        return INCONCLUSIVE
    lo, hi, strict_lo, strict_hi = region
    return region_outcome(low, high, lo, hi, strict_lo=strict_lo, strict_hi=strict_hi)


def _also(check: dict, sel: pl.DataFrame, row: int, degenerate: bool = False) -> tuple[list[str], list[PTest],
                                                                                      list[str]]:
    """The `also` conditions: p-value gates (tests), interval bounds (outcomes; inconclusive where
    the check's bootstrap is `degenerate`), other columns (a condition not met makes the check
    inconclusive; met, it decides nothing)."""
    outcomes, tests, notes = [], [], []
    for col, cond in check.get("also", {}).items():
        v = sel[col][row]
        if v is None:
            raise NotTestable(f"{col} is null on the selected row")
        for op, x in cond.items():
            if op not in ALSO_OPS:
                raise LedgerError(f"also: {col}: {op!r} is not one of {', '.join(ALSO_OPS)}.")
            if col.endswith(("p_value", "q_value")):
                kind = "significant" if op in ("at_most", "below") else "not_significant"
                tests.append(PTest(f"{col}", float(v), kind))
                continue
            met = ALSO_OPS[op](v, x)
            base = col.rsplit("_", 1)[0]
            other = f"{base}_high" if col.endswith("_low") else f"{base}_low" if col.endswith("_high") else None
            if other in sel.columns and sel[other][row] is not None and op in ALSO_OPS:
                w = sel[other][row]
                excluded = not ALSO_OPS[op](w, x) if col.endswith("_low") == (op in ("above", "at_least")) else False
                outcome = INCONCLUSIVE if degenerate else PASS if met else FAIL if excluded else INCONCLUSIVE
                notes.append(f"{base} interval [{min(v, w):.3g}, {max(v, w):.3g}] {op} {x} -> {outcome}")
            else:
                outcome = PASS if met else INCONCLUSIVE
                notes.append(f"{col}={v:.3g} {op} {x} -> {'met' if met else 'not met (inconclusive)'} "
                             "(a point condition: it can only withhold a verdict)")
                if met:
                    continue
            outcomes.append(outcome)
    return outcomes, tests, notes


def run_check(check: dict, tables: Mapping[str, pl.DataFrame | None], ctx: Context, study_value,
              sae_set: str | None = None) -> dict:
    """Evaluate one check on the rows of SAE set `sae_set` (default: the primary set): {'outcomes',
    'tests', 'value', 'low', 'high', 'n', 'selected', 'row', 'note'}; raises NotTestable. The check's
    outcome is `check_outcome` once the tests' family is Holm-adjusted."""
    name = check["table"]
    df = tables.get(name)
    if df is None:
        raise NotTestable(f"table {name} was not produced by this workflow (its stage is missing or did not run)")
    sae_set = sae_set or ctx.sae_sets[0]["name"]
    if "sae_set" in df.columns and sae_set not in df["sae_set"].unique().to_list():
        raise NotTestable(f"table {name} has no rows of SAE set {sae_set} (this stage does not run on its site)")
    where = where_for(name, check.get("where"), df, sae_set)
    sel = select(df, where, ctx)
    if sel.height == 0:
        raise NotTestable(f"no row of {name} matches {dict(where)}")
    require_every_listed_value(sel, where, ctx, name)
    values = metric_values(sel, check["metric"])
    row = pick_row(sel, values, check.get("aggregate", "single"))
    value = float(values[row])
    n, n_unit = _row_n(sel, row, check)
    low, high, kind, why = _interval(sel, row, check, value, n_unit, n, ctx)
    if check.get("aggregate", "single").endswith("_abs"):
        value = abs(value)
    outcomes, tests, notes = [], [], []
    if "below" in check or "above" in check:
        direction = "below" if "below" in check else "above"
        inner = check[direction]["where"]
        other = select(df, where_for(name, inner, df, sae_set), ctx)
        if other.height == 0 or (direction == "below" and other.height != 1):
            raise NotTestable(f"the comparison {inner} matches {other.height} rows of {name}")
        outcome, tests, note = _compare(check, sel, row, other, inner, value, low if not why else None, high,
                                        direction)
        outcomes += [outcome] if outcome else []
        notes.append(note)
    elif "local_max" in check:
        lo_col, hi_col = check.get("ci") or [f"{check['metric']}_low", f"{check['metric']}_high"]
        layer = sel["layer"][row]
        rest = select(df, {k: v for k, v in where.items() if k != "layer" and not isinstance(v, dict)
                           and not (k.startswith("is_") and v is True)}, ctx)
        if low is None:
            raise NotTestable("local_max needs a CI on the selected row")
        earlier = rest.filter(pl.col("layer") < layer, pl.col(hi_col) < low)["layer"].to_list()
        later = rest.filter(pl.col("layer") > layer, pl.col(hi_col) < low)["layer"].to_list()
        # Not being shown a local maximum is not being shown none: never "fail" on this test.
        outcomes.append(PASS if earlier and later and not why else INCONCLUSIVE)
        notes.append(f"lower layers (CI entirely below): before {earlier or 'none'}, after {later or 'none'}")
    elif check.get("selects"):
        notes.append("selection step: its value picked the row and is not tested; the conditions below decide")
    else:
        lo, hi, strict_lo, strict_hi = _region(check, study_value, ctx)
        if why:
            outcomes.append(INCONCLUSIVE)
        elif _is_universal(check):
            # "every row is at least x" (min) / "at most x" (max): each row's interval counts, not
            # only the extreme point estimate's
            per_row = [_row_outcome(sel, i, check, values, (lo, hi, strict_lo, strict_hi), ctx)
                       for i in range(sel.height) if values[i] is not None and math.isfinite(values[i])]
            outcomes.append(combine(per_row))
            if len(per_row) > 1:
                notes.append(f"every one of {len(per_row)} rows: {sum(o == PASS for o in per_row)} pass, "
                             f"{sum(o == FAIL for o in per_row)} fail")
        else:
            outcomes.append(region_outcome(low, high, lo, hi, strict_lo=strict_lo, strict_hi=strict_hi))
        fewest = _fewest(check, ctx)
        if fewest:
            notes.append(fewest)
    if why:
        notes.append(why)
    more, more_tests, also_notes = _also(check, sel, row, degenerate=bool(why) and kind == "bootstrap")
    outcomes += more
    tests += more_tests
    notes += also_notes
    for col in check.get("beside", []):
        notes.append(f"beside: {beside_text(sel, row, col)}")
    return {"outcomes": outcomes, "tests": tests, "value": value, "low": low, "high": high, "n": n,
            "n_unit": n_unit if n is not None else None, "interval": kind,
            "selected": describe_row(sel, row, where), "row": sel.row(row, named=True), "matched": sel,
            "note": "; ".join(notes)}


def _fewest(check: dict, ctx: Context) -> str:
    """The fewest eligible pairs at which a success-rate region can be decided at all."""
    if check["metric"].strip() not in EXACT_INTERVAL_METRICS or not ({"at_least", "at_most"} & set(check)):
        return ""
    conf = float(ctx.verdicts["confidence"])
    n = (fewest_clusters_to_decide(at_least=_bound(check, "at_least", ctx), confidence=conf) if "at_least" in check
         else fewest_clusters_to_decide(at_most=_bound(check, "at_most", ctx), confidence=conf))
    return (f"decidable from {n} eligible targets, one per number pair" if n
            else "not decidable at any sample size")


def check_outcome(result: dict, alpha: float) -> str:
    return combine([*result["outcomes"], *(t.outcome(alpha) for t in result["tests"])])


def check_text(i: int, check: dict, result: dict, study_value, alpha: float, ctx: Context) -> str:
    ci = (f" [{result['low']:.3g}, {result['high']:.3g}]" if result["low"] is not None and result["interval"] != "named"
          else " (exact: a named item)" if result["interval"] == "named" else "")
    n = f", n={result['n']} {result['n_unit']}" if result["n"] is not None else ""
    tests = "".join(f"; {t.text(alpha)}" for t in result["tests"])
    note = f"; {result['note']}" if result["note"] else ""
    return (f"check {i + 1}: {result['value']:.4g}{ci}{n} at {result['selected']}; requires "
            f"{rule_text(check, study_value, ctx)} -> {check_outcome(result, alpha)}{tests}{note}")
