"""The claims ledger: every quantitative claim of the seed study, checked against the measured tables.

`config/claims.yaml` lists the claims. Each claim has one or more *forms*, tried in order: the
`literal` form tests the seed's statement as written (its layer numbers and feature ids, so it
usually `requires_model` Llama-3.1-8B); an `agnostic` form tests what the claim means on any model
("a middle layer of maximum overlap between two layers of low overlap"). The first form that can be
tested decides the verdict:

- `holds`: every check of the form passes;
- `fails`: a check does not pass;
- `not testable here`: no form can be tested (the model is not the one the ids belong to, a table
  was not produced, no row matches, the metric is null); `detail` says why, form by form.

A check selects rows of one table (`where`), reduces them to one row (`aggregate`), reads `metric`
(a column, or `a / b` for the ratio of two columns) and applies one test:

    near: {target, tolerance}     |value - target| <= tolerance (target defaults to study_value)
    range: [low, high]            low <= value <= high
    at_least: x / at_most: x      value >= x / value <= x
    below: {where: {...}}         value < the same metric on the row the inner `where` selects
    above: {where: {...}, ci: b}  value > the same metric on every row the inner `where` selects;
                                  with `ci: true` the selected row's CI lies entirely above all of
                                  theirs (its lower bound above the highest of their upper bounds)
    local_max: true               the selected layer's CI lies above the CI of some earlier and
                                  some later layer (feature_overlap rows)

`also: {column: {at_most/at_least/above/below: x}}` adds a condition on other columns of the
selected row (e.g. a p-value, or a CI bound: `{format_effect_pct_low: {above: 0}}`; above / below
are strict). `beside: [columns]` reports other columns of the selected row (with their `_low` /
`_high` interval where the table has one) in `detail` without testing them: an overlap is shown
with its same-format chance level. Decisions use point estimates unless a check tests a CI bound;
each row reports the interval and n beside them.

`where` values: a scalar (equality), a list (membership), `{not: v}`, `{between: [a, b]}`,
`{depth: f}` (the layer round(f * (num_layers - 1)): a layer at the same relative depth as the
seed's), `{after: <bool column>, by: n}` (the analysed layer n places after the row marked by that
column), and the tokens `$focus` (the focus layers), `$buggy_format`, `$correct_format`,
`$half_even_heads` / `$quarter_even_heads` (half / a quarter of the even heads: 8 / 4 of Llama's 16).
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
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import polars as pl

from bugscope.claims.decide import FAIL, INCONCLUSIVE, PASS, PTest, adjust_family, combine, region_outcome
from bugscope.claims.preconditions import Outcome, ceiling, evaluate_needs, premise
from bugscope.claims.spec import (
    TABLES,
    LedgerError,
    metric_columns,
    metric_null,
)
from bugscope.config import verdict_defaults
from bugscope.data.prompts import ALL, BUG_PAIR_KIND
from bugscope.stats import fewest_clusters_to_decide, fisher_exact_p

VERDICTS = ("holds", "fails", "inconclusive", "layer-dependent", "not testable here")
VERDICT_OF = {PASS: "holds", FAIL: "fails", INCONCLUSIVE: "inconclusive"}

# Metrics whose interval is exact over number pairs where the table gives one (success over eligible
# targets: bugscope.stats.clustered_proportion_columns), so it stands with few pairs.
EXACT_INTERVAL_METRICS = ("success_rate", "broken_rate")
# Metrics of the patching tables over every target, not the eligible ones: their n is n_pairs.
OVER_ALL_TARGETS = ("accuracy", "flip_rate", "mean_logit_diff", "original_success", "delta_original_success",
                    "fixed_rate_all_wrong")
# The interval columns of the rates whose names do not follow <metric>_low / <metric>_high.
RATE_INTERVALS = {"success_rate": ["success_low", "success_high"], "broken_rate": ["broken_low", "broken_high"],
                  "flip_rate": ["flip_low", "flip_high"], "mean_logit_diff": ["logit_diff_low", "logit_diff_high"],
                  "delta_original_success": ["delta_low", "delta_high"]}
EXACT_INTERVAL_TABLES = ("head_patching", "head_replacement", "head_subsets_exhaustive", "residual_map",
                         "head_bidirectional", "original_decomposition", "interventions")


# Rows a check selects unless its `where` names the column: the bug's pair kind with both question
# orders pooled (the control kinds and the single orders are separate rows of these tables).
DEFAULT_WHERE: dict[str, dict] = {
    "baseline_accuracy": {"pair_kind": BUG_PAIR_KIND, "order": ALL},
    "head_patching": {"pair_kind": BUG_PAIR_KIND, "order": ALL},
    "head_replacement": {"pair_kind": BUG_PAIR_KIND, "order": ALL},
    "head_subsets_exhaustive": {"pair_kind": BUG_PAIR_KIND, "order": ALL},
    "residual_map": {"pair_kind": BUG_PAIR_KIND, "order": ALL},
    "head_bidirectional": {"pair_kind": BUG_PAIR_KIND, "order": ALL},
    "interventions": {"pair_kind": BUG_PAIR_KIND, "order": ALL},
}


def _where(table: str, where: Mapping | None, df: pl.DataFrame, sae_set: str | None = None) -> dict:
    defaults = {k: v for k, v in DEFAULT_WHERE.get(table, {}).items() if k in df.columns}
    if sae_set is not None and "sae_set" in df.columns:
        defaults["sae_set"] = sae_set
    return {**defaults, **(where or {})}


# Where a claim comes from: the seed document, or the published paper (arXiv 2508.19414) and its code.
SOURCES = ("seed document", "paper")
RESULT_SCHEMA = {
    "claim_id": pl.String, "source": pl.String, "section": pl.String, "claim": pl.String, "study_value": pl.String,
    "verdict": pl.String, "form": pl.String, "form_tested": pl.String, "table": pl.String, "metric": pl.String,
    "rule": pl.String, "selected": pl.String, "measured": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64,
    "n": pl.Int64, "n_unit": pl.String, "sae_set": pl.String, "agrees_across_sae_sets": pl.Boolean,
    "family_tests": pl.Int64, "detail": pl.String,
}


class NotTestable(Exception):
    """This form cannot be tested on these tables; the message says why. `precondition`: a
    precondition of the claim failed (the claim is then "not testable", with its numbers)."""

    def __init__(self, message: str, precondition: bool = False, other_model: bool = False):
        super().__init__(message)
        self.precondition = precondition
        self.other_model = other_model  # the form is about another model: no news on this run


@dataclass
class Context:
    """What the ledger needs from the run: the model, the formats and the focus layers."""

    model_name: str
    model_checkpoint: str
    num_layers: int
    num_heads: int
    buggy_format: str
    correct_format: str
    focus: list[int] | None  # None: unresolved (focus_layers auto and no overlap table)
    sae_sets: tuple[dict, ...] = ({"name": "main", "source": "train", "release": None, "site": "resid_post"},)
    # claims.verdicts of the config, and the confidence of its intervals (bootstrap.confidence)
    verdicts: Mapping = field(default_factory=lambda: {**verdict_defaults(), "confidence": 0.95,
                                                       "focus_min_frequency": 0.05})
    # with focus_layers auto: {layer: how often the overlap bootstrap chooses it} (focus.focus_frequencies)
    focus_choice: Mapping[int, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Mapping, focus: list[int] | None, focus_choice: Mapping[int, float] | None = None
                    ) -> "Context":
        sets = tuple({k: s[k] for k in ("name", "source", "release", "site")} for s in config["sae"]["sets"])
        verdicts = {**config["claims"]["verdicts"], "confidence": config["bootstrap"]["confidence"],
                    "focus_min_frequency": config["focus_min_frequency"]}
        focus_choice = dict(focus_choice or {}) if config["focus_layers"] == "auto" else {}
        return cls(config["model"]["name"], config["model"]["checkpoint"], config["model"]["num_layers"],
                   config["model"]["num_heads"], config["prompts"]["buggy_format"], config["prompts"]["correct_format"],
                   focus, focus_choice=focus_choice, sae_sets=sets, verdicts=verdicts)

    def sae_set_for(self, form: Mapping) -> str:
        """The SAE set a form reads: the one its `requires_sae` names (release and site), else the primary."""
        wanted = form.get("requires_sae")
        if not wanted:
            return self.sae_sets[0]["name"]
        for s in self.sae_sets:
            if s["release"] == wanted["release"] and s["site"] == wanted["site"]:
                return s["name"]
        have = ", ".join(f"{s['name']} ({s['release'] or 'trained here'}, {s['site']})" for s in self.sae_sets)
        raise NotTestable(f"its feature ids belong to the SAEs {wanted['release']} at {wanted['site']}; this run's "
                          f"SAE sets are {have}")

    def is_model(self, wanted: str) -> bool:
        norm = lambda s: "".join(ch for ch in s.lower() if ch.isalnum())  # noqa: E731
        return norm(wanted) in norm(self.model_name) or norm(wanted) in norm(self.model_checkpoint)


# --- evaluation -----------------------------------------------------------------------------------


def resolve_value(value: Any, ctx: Context) -> Any:
    """`value` with its "$name" references (the formats, the focus layers, head counts ...) resolved in `ctx`."""
    if isinstance(value, str) and value.startswith("$"):
        if value == "$buggy_format":
            return ctx.buggy_format
        if value == "$correct_format":
            return ctx.correct_format
        if value == "$focus":
            if ctx.focus is None:
                raise NotTestable("the focus layer is unresolved (focus_layers auto and no overlap table)")
            return list(ctx.focus)
        if value == "$all":
            return float(ctx.verdicts["all_fraction"])
        if value == "$none":
            return float(ctx.verdicts["none_fraction"])
        if value == "$half_even_heads":
            return (ctx.num_heads + 1) // 2 // 2
        if value == "$quarter_even_heads":
            return max(1, (ctx.num_heads + 1) // 2 // 4)
        raise LedgerError(f"unknown token {value!r}; expected $focus, $buggy_format, $correct_format, "
                          "$all, $none, $half_even_heads or $quarter_even_heads.")
    return value


def select(df: pl.DataFrame, where: Mapping[str, Any], ctx: Context) -> pl.DataFrame:
    """Rows of `df` matching `where` (see the module docstring); `after` marks are applied last."""
    later = {}
    for col, raw in where.items():
        if col not in df.columns:
            raise LedgerError(f"column {col!r} is not in the table (columns: {', '.join(df.columns)}).")
        if isinstance(raw, dict) and "after" in raw:
            later[col] = raw
            continue
        if isinstance(raw, dict) and "not" in raw:
            v = resolve_value(raw["not"], ctx)
            cond = ~pl.col(col).is_in(v) if isinstance(v, list) else pl.col(col) != v
        elif isinstance(raw, dict) and "between" in raw:
            lo, hi = raw["between"]
            cond = pl.col(col).is_between(lo, hi)
        elif isinstance(raw, dict) and "depth" in raw:
            cond = pl.col(col) == round(float(raw["depth"]) * (ctx.num_layers - 1))
        else:
            v = resolve_value(raw, ctx)
            cond = pl.col(col).is_in(v) if isinstance(v, list) else pl.col(col) == v
        df = df.filter(cond)
    for col, raw in later.items():
        mark, by = raw["after"], int(raw.get("by", 1))
        ordered = df.sort(col)
        marked = ordered.with_row_index("_i").filter(pl.col(mark))
        if marked.height != 1:
            raise NotTestable(f"expected one row marked {mark}, found {marked.height}")
        i = int(marked["_i"][0]) + by
        if not 0 <= i < ordered.height:
            raise NotTestable(f"no analysed {col} {by} place(s) after the one marked {mark}")
        df = ordered.slice(i, 1)
    return df


def _require_every_listed_value(sel: pl.DataFrame, where: Mapping[str, Any], ctx: Context, name: str) -> None:
    """A check on listed items (feature ids, layers) is tested on all of them or not at all: scored
    on the subset that happens to be present, it would pass more easily."""
    for col, raw in where.items():
        v = resolve_value(raw, ctx) if not isinstance(raw, dict) else None
        if isinstance(v, list):
            missing = sorted(set(v) - set(sel[col].to_list()))
            if missing:
                raise NotTestable(f"{col} {missing} of the claim's {v} are not in {name}")


def _values(df: pl.DataFrame, metric: str) -> pl.Series:
    cols = metric_columns(metric)
    for c in cols:
        if c not in df.columns:
            raise LedgerError(f"metric column {c!r} is not in the table (columns: {', '.join(df.columns)}).")
    if len(cols) == 1:
        return df[cols[0]].cast(pl.Float64)
    if len(cols) == 2:
        a, b = df[cols[0]].cast(pl.Float64), df[cols[1]].cast(pl.Float64)
        return pl.Series([x / y if (x is not None and y not in (None, 0)) else None for x, y in zip(a, b)],
                         dtype=pl.Float64)
    raise LedgerError(f"metric {metric!r}: expected a column or 'a / b'.")


def _pick(df: pl.DataFrame, values: pl.Series, aggregate: str) -> int:
    """Row index chosen by the aggregate among rows with a finite metric."""
    ok = [i for i, v in enumerate(values) if v is not None and math.isfinite(v)]
    if not ok:
        raise NotTestable("the metric is null on every selected row")
    if aggregate == "single":
        if df.height != 1:
            raise LedgerError(f"the selection matches {df.height} rows where one was expected; narrow 'where' "
                              "or give an aggregate (min, max, max_abs, min_abs).")
        return 0
    key = {"min": lambda i: values[i], "max": lambda i: -values[i],
           "max_abs": lambda i: -abs(values[i]), "min_abs": lambda i: abs(values[i])}[aggregate]
    return min(ok, key=key)


def _ci(df: pl.DataFrame, row: int, check: dict, value: float) -> tuple[float | None, float | None]:
    metric = check["metric"]
    names = check.get("ci") or RATE_INTERVALS.get(metric.strip()) or [f"{metric}_low", f"{metric}_high"]
    if "/" in metric or not all(n in df.columns for n in names):
        return None, None
    lo, hi = df[names[0]][row], df[names[1]][row]
    if check.get("aggregate", "").endswith("_abs") and value < 0 and lo is not None and hi is not None:
        lo, hi = -hi, -lo
    return lo, hi


ALSO_OPS = {"at_most": lambda v, x: v <= x, "at_least": lambda v, x: v >= x,
            "above": lambda v, x: v > x, "below": lambda v, x: v < x}


def _beside(df: pl.DataFrame, row: int, col: str) -> str:
    """'col=v [low, high]' of the selected row, for `beside` (not tested)."""
    if col not in df.columns:
        raise LedgerError(f"beside: column {col!r} is not in the table (columns: {', '.join(df.columns)}).")
    v = df[col][row]
    lo, hi = (df[f"{col}_{b}"][row] if f"{col}_{b}" in df.columns else None for b in ("low", "high"))
    ci = f" [{lo:.3g}, {hi:.3g}]" if lo is not None and hi is not None else ""
    return f"{col}={v:.3g}{ci}" if v is not None else f"{col}=null"


def _describe_row(df: pl.DataFrame, row: int, where: Mapping) -> str:
    keys = [k for k in ("layer", "feature_id", "head_set", "setting") if k in df.columns]
    keys += [k for k, v in where.items() if k in df.columns and k not in keys and not k.startswith("is_")
             and not isinstance(v, (dict, list))]
    return ", ".join(f"{k}={df[k][row]}" for k in keys if df[k][row] is not None)


def _rule_text(check: dict, study_value, ctx: Context | None = None) -> str:
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
    low, high = _ci(sel, row, check, value)
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
    rate, n = df[metric.strip()][i], df["n_eligible"][i]
    if n is None or rate is None or not math.isfinite(rate):
        return (0, int(n or 0)) if n is not None and not n else None
    return int(round(rate * n)), int(n)


def _compare(check: dict, sel: pl.DataFrame, row: int, other: pl.DataFrame, where: Mapping, value: float,
             low, high, direction: str) -> tuple[str | None, list[PTest], str]:
    """Two arms: Fisher's test on success counts, else separate intervals (`decide` module docstring)."""
    metric = check["metric"]
    mine = _counts(sel, row, metric)
    ref_values = _values(other, metric)
    if mine is not None and all(_counts(other, j, metric) is not None for j in range(other.height)):
        tests, notes = [], []
        for j in range(other.height):
            k2, n2 = _counts(other, j, metric)
            p = fisher_exact_p(*mine, k2, n2)
            r1, r2 = mine[0] / max(mine[1], 1), k2 / max(n2, 1)
            label = f"{mine[0]}/{mine[1]} vs {k2}/{n2} at {_describe_row(other, j, where)}"
            tests.append(PTest(label, p, "effect", r1 > r2 if direction == "above" else r1 < r2))
            notes.append(label)
        return None, tests, "Fisher's exact test: " + "; ".join(notes)
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
                         f"{_describe_row(other, j, where)}: separate intervals decide")


def _also(check: dict, sel: pl.DataFrame, row: int) -> tuple[list[str], list[PTest], list[str]]:
    """The `also` conditions: p-value gates (tests), interval bounds (outcomes), other columns
    (a condition not met makes the check inconclusive; met, it decides nothing)."""
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
                outcome = PASS if met else FAIL if excluded else INCONCLUSIVE
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
    where = _where(name, check.get("where"), df, sae_set)
    sel = select(df, where, ctx)
    if sel.height == 0:
        raise NotTestable(f"no row of {name} matches {dict(where)}")
    _require_every_listed_value(sel, where, ctx, name)
    values = _values(sel, check["metric"])
    row = _pick(sel, values, check.get("aggregate", "single"))
    value = float(values[row])
    spec = TABLES[name]
    n = (int(sel[spec.n_column][row]) if spec.n_column in sel.columns and sel[spec.n_column][row] is not None
         else None)
    n_unit = spec.n_unit
    if n is None and name == "baseline_scores":
        n, n_unit = 1, "named prompt"
    if check["metric"].startswith("heldout_") and "n_heldout_pairs" in sel.columns:  # the held-out half's own n
        n, n_unit = sel["n_heldout_pairs"][row], "held-out number pairs"
    elif check["metric"].strip() in OVER_ALL_TARGETS and "n_pairs" in sel.columns:
        n, n_unit = sel["n_pairs"][row], "number pairs"
    low, high, kind, why = _interval(sel, row, check, value, n_unit, n, ctx)
    if check.get("aggregate", "single").endswith("_abs"):
        value = abs(value)
    outcomes, tests, notes = [], [], []
    if "below" in check or "above" in check:
        direction = "below" if "below" in check else "above"
        inner = check[direction]["where"]
        other = select(df, _where(name, inner, df, sae_set), ctx)
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
        else:
            outcomes.append(region_outcome(low, high, lo, hi, strict_lo=strict_lo, strict_hi=strict_hi))
        fewest = _fewest(check, ctx)
        if fewest:
            notes.append(fewest)
    if why:
        notes.append(why)
    more, more_tests, also_notes = _also(check, sel, row)
    outcomes += more
    tests += more_tests
    notes += also_notes
    for col in check.get("beside", []):
        notes.append(f"beside: {_beside(sel, row, col)}")
    return {"outcomes": outcomes, "tests": tests, "value": value, "low": low, "high": high, "n": n,
            "n_unit": n_unit if n is not None else None, "interval": kind,
            "selected": _describe_row(sel, row, where), "row": sel.row(row, named=True), "matched": sel,
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


def _check_text(i: int, check: dict, result: dict, study_value, alpha: float, ctx: Context) -> str:
    ci = (f" [{result['low']:.3g}, {result['high']:.3g}]" if result["low"] is not None and result["interval"] != "named"
          else " (exact: a named item)" if result["interval"] == "named" else "")
    n = f", n={result['n']} {result['n_unit']}" if result["n"] is not None else ""
    tests = "".join(f"; {t.text(alpha)}" for t in result["tests"])
    note = f"; {result['note']}" if result["note"] else ""
    return (f"check {i + 1}: {result['value']:.4g}{ci}{n} at {result['selected']}; requires "
            f"{_rule_text(check, study_value, ctx)} -> {check_outcome(result, alpha)}{tests}{note}")


def _try_form(claim: dict, form: dict, tables, ctx: Context) -> dict:
    """The checks of one form and its preconditions; raises NotTestable."""
    if "requires_model" in form and not ctx.is_model(form["requires_model"]):
        raise NotTestable(f"its feature ids/layers belong to {form['requires_model']}; this run is {ctx.model_name}",
                          other_model=True)
    sae_set = ctx.sae_set_for(form)
    results = [run_check(c, tables, ctx, claim["study_value"], sae_set) for c in form["checks"]]
    needs = evaluate_needs(claim.get("needs", []), [r["row"] for r in results], tables, ctx.verdicts,
                           matched=results[0]["matched"])
    failed = [o for o in needs if o.ok is False]
    unknown = [o for o in needs if o.ok is None]
    if failed or unknown:
        raise NotTestable("; ".join(o.text for o in failed + unknown), precondition=True)
    return {"sae_set": sae_set, "results": results, "needs": needs}


def evaluate_claim(claim: dict, tables: Mapping[str, pl.DataFrame | None], ctx: Context) -> dict:
    """One ledger row, with the tests of its checks Holm-adjusted within the claim alone (`evaluate`
    adjusts them within the claim's section)."""
    return evaluate([claim], tables, ctx).row(-1, named=True)


def _decided_row(claim: dict, form: dict, tried: dict, tables, ctx: Context, alpha: float,
                 reasons: list) -> dict:
    results, checks = tried["results"], form["checks"]
    verdict = VERDICT_OF[combine(check_outcome(r, alpha) for r in results)]
    per_set = any(_per_set(tables.get(c["table"])) for c in checks)
    others = _other_set_verdicts(form, tables, ctx, claim["study_value"], tried["sae_set"], alpha) if per_set else {}
    # Why an earlier form was not tested, unless it is about another model (then it says nothing here).
    notes = [f"{kind} form not tested: {why}" for kind, why in reasons if not why.other_model]
    notes += [o.text for o in tried["needs"]]
    notes += [_check_text(i, c, r, claim["study_value"], alpha, ctx) for i, (c, r) in enumerate(zip(checks, results))]
    if others:
        notes.append("on the other SAE sets: " + ", ".join(f"{name}: {v}" for name, v in others.items()))
    tested = [v for v in others.values() if v in ("holds", "fails", "inconclusive")]
    first = results[0]
    return {"verdict": verdict, "form": form["form"], "form_tested": form["description"].strip(),
            "table": ", ".join(dict.fromkeys(c["table"] for c in checks)), "metric": checks[0]["metric"],
            "rule": "; ".join(_rule_text(c, claim["study_value"], ctx) for c in checks),
            "selected": first["selected"], "measured": first["value"],
            # a named item's value has no interval: none is printed ([v, v] would be one never computed)
            "ci_low": None if first["interval"] == "named" else first["low"],
            "ci_high": None if first["interval"] == "named" else first["high"], "n": first["n"], "n_unit": first["n_unit"],
            "sae_set": tried["sae_set"] if per_set else None,
            "agrees_across_sae_sets": all(v == verdict for v in tested) if tested else None,
            "detail": "; ".join(notes)}


def evaluate(claims: list[dict], tables: Mapping[str, pl.DataFrame | None], ctx: Context) -> pl.DataFrame:
    """The ledger: the precondition rows, then one row per claim. Each claim is decided by its first
    testable form; the p-values of the decided forms are Holm-adjusted within each section."""
    alpha = float(ctx.verdicts["alpha"])
    decided, family_tests = [], {}
    for c in claims:
        reasons, chosen = [], None
        for form in c["forms"]:
            try:
                chosen = (form, _try_form(c, form, tables, ctx))
                break
            except NotTestable as why:
                reasons.append((form["form"], why))
        if chosen:
            family_tests.setdefault(c["section"], []).extend(t for r in chosen[1]["results"] for t in r["tests"])
        decided.append((c, chosen, reasons))
    for tests in family_tests.values():
        adjust_family(tests)
    rows = precondition_rows(tables, ctx)
    for c, chosen, reasons in decided:
        base = {"claim_id": c["id"], "source": c.get("source", SOURCES[0]), "section": c["section"],
                "claim": c["claim"].strip(), "study_value": str(c["study_value"]),
                "family_tests": len(family_tests.get(c["section"], []))}
        if chosen:
            row = {**base, **_decided_row(c, chosen[0], chosen[1], tables, ctx, alpha, reasons)}
            rows.append(_with_other_focus_layers(row, c, chosen[0], tables, ctx, alpha))
            continue
        why = "; ".join(f"{kind}: {w}" for kind, w in reasons)
        blocked = [w for _, w in reasons if w.precondition]
        rows.append({**base, "verdict": "not testable here", "form": None, "form_tested": None,
                     "table": ", ".join(dict.fromkeys(ch["table"] for f in c["forms"] for ch in f["checks"])),
                     "metric": c["forms"][0]["checks"][0]["metric"], "rule": None, "selected": None,
                     "measured": None, "ci_low": None, "ci_high": None, "n": None, "n_unit": None, "sae_set": None,
                     "agrees_across_sae_sets": None,
                     "detail": ("not testable: " + "; ".join(str(w) for w in blocked)) if blocked else why})
    return pl.DataFrame(rows, schema=RESULT_SCHEMA)


def _uses_focus(form: dict) -> bool:
    return "$focus" in repr([c.get("where") for c in form["checks"]] + [c.get(t, {}).get("where") for c in form["checks"]
                                                                    for t in ("above", "below") if t in c])


def _with_other_focus_layers(row: dict, claim: dict, form: dict, tables, ctx: Context, alpha: float) -> dict:
    """The claim evaluated again at every other layer the focus choice picks often (research notes
    section 9: the layer choice inside the uncertainty); "layer-dependent" where the verdicts differ."""
    floor = float(ctx.verdicts["focus_min_frequency"])
    others = sorted(layer for layer, f in ctx.focus_choice.items() if f >= floor and [layer] != list(ctx.focus or []))
    if not others or not _uses_focus(form):
        return row
    freq = ctx.focus_choice
    verdicts = {layer: row["verdict"] for layer in (ctx.focus or [])}
    for layer in others:
        try:
            tried = _try_form(claim, form, tables, replace(ctx, focus=[layer]))
            verdicts[layer] = VERDICT_OF[combine(check_outcome(r, alpha) for r in tried["results"])]
        except NotTestable as why:
            verdicts[layer] = "not testable here" + (" (a precondition fails)" if why.precondition else "")
    text = "verdict by focus layer (how often the overlap bootstrap chooses it): " + "; ".join(
        f"{layer} ({freq.get(layer, 0):.0%}): {v}" for layer, v in sorted(verdicts.items()))
    decided = {v for v in verdicts.values() if v in VERDICT_OF.values()}
    out = {**row, "detail": f"{text}; {row['detail']}"}
    if len(decided) > 1:
        out["verdict"] = "layer-dependent"
    return out


def precondition_rows(tables: Mapping[str, pl.DataFrame | None], ctx: Context) -> list[dict]:
    """The ledger's opening rows: the premise, and the ceiling and eligible pairs at each focus layer."""
    rows = []
    outcomes = [premise(tables, ctx.verdicts)]
    floor = float(ctx.verdicts["focus_min_frequency"])
    chosen = sorted(set(ctx.focus or []) | {layer for layer, f in ctx.focus_choice.items() if f >= floor})
    for layer in chosen:
        c = ceiling(tables, layer, ctx.verdicts)
        outcomes.append(Outcome(f"ceiling_layer_{layer}", c.ok, c.text))
    for o in outcomes:
        verdict = {True: "holds", False: "fails", None: "not testable here"}[o.ok]
        rows.append({"claim_id": f"precondition_{o.name}", "source": "this run", "section": "preconditions",
                     "claim": o.text.split(":", 1)[0], "study_value": None, "verdict": verdict, "form": None,
                     "form_tested": None, "table": None, "metric": None, "rule": None, "selected": None,
                     "measured": None, "ci_low": None, "ci_high": None, "n": None, "n_unit": None, "sae_set": None,
                     "agrees_across_sae_sets": None, "family_tests": None, "detail": o.text})
    return rows


def _other_set_verdicts(form: dict, tables: Mapping[str, pl.DataFrame | None], ctx: Context, study_value,
                        tested_on: str, alpha: float) -> dict[str, str]:
    """An agnostic form's verdict on every other SAE set ("does it hold with other SAEs?"); a literal
    form is about one set's feature ids, so it has none. Its tests are not part of any family."""
    if form["form"] != "agnostic":
        return {}
    out = {}
    for s in ctx.sae_sets:
        if s["name"] == tested_on:
            continue
        try:
            results = [run_check(c, tables, ctx, study_value, s["name"]) for c in form["checks"]]
            out[s["name"]] = VERDICT_OF[combine(check_outcome(r, alpha) for r in results)]
        except NotTestable:
            out[s["name"]] = "not testable"
    return out


def _per_set(df: pl.DataFrame | None) -> bool:
    return df is not None and "sae_set" in df.columns


def prepare_tables(raw: Mapping[str, pl.DataFrame], prompts: pl.DataFrame | None) -> dict[str, pl.DataFrame]:
    """Tables as the ledger reads them: baseline scores gain the prompt's numbers (`correct`, `wrong`)."""
    out = dict(raw)
    if "baseline_scores" in out and prompts is not None and "correct" not in out["baseline_scores"].columns:
        out["baseline_scores"] = out["baseline_scores"].join(
            prompts.select("prompt_id", "correct", "wrong"), on="prompt_id", how="left")
    return out

