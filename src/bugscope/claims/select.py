"""What a check reads: the run's context (model, formats, focus layers, thresholds), the rows a
`where` selects, the metric and its interval columns. The grammar is in `bugscope.claims.checks`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import polars as pl

from bugscope.claims.spec import LedgerError, metric_columns
from bugscope.config import verdict_defaults
from bugscope.data.prompts import ALL, BUG_PAIR_KIND

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
    "probes": {"pair_kind": BUG_PAIR_KIND, "order": ALL},
    "reading_closeness": {"pair_kind": BUG_PAIR_KIND},
    "reading_steering": {"pair_kind": BUG_PAIR_KIND},
}


def where_for(table: str, where: Mapping | None, df: pl.DataFrame, sae_set: str | None = None) -> dict:
    defaults = {k: v for k, v in DEFAULT_WHERE.get(table, {}).items() if k in df.columns}
    if sae_set is not None and "sae_set" in df.columns:
        defaults["sae_set"] = sae_set
    return {**defaults, **(where or {})}


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
    # and the positions the head sweep patched (patching.positions: its ceiling rows are read there)
    verdicts: Mapping = field(default_factory=lambda: {**verdict_defaults(), "confidence": 0.95,
                                                       "focus_min_frequency": 0.05, "patch_positions": "decision"})
    # with focus_layers auto: {layer: how often the overlap bootstrap chooses it} (focus.focus_frequencies)
    focus_choice: Mapping[int, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Mapping, focus: list[int] | None, focus_choice: Mapping[int, float] | None = None
                    ) -> "Context":
        sets = tuple({k: s[k] for k in ("name", "source", "release", "site")} for s in config["sae"]["sets"])
        verdicts = {**config["claims"]["verdicts"], "confidence": config["bootstrap"]["confidence"],
                    "focus_min_frequency": config["focus_min_frequency"],
                    "patch_positions": config["patching"]["positions"]}
        focus_choice = dict(focus_choice or {}) if config["focus_layers"] == "auto" else {}
        return cls(config["model"]["name"], config["model"]["checkpoint"], config["model"]["num_layers"],
                   config["model"]["num_heads"], config["prompts"]["buggy_format"], config["prompts"]["correct_format"],
                   focus, focus_choice=focus_choice, sae_sets=sets, verdicts=verdicts)

    def chosen_layers(self) -> list[int]:
        """The focus layers and every layer the focus choice picks in at least focus_min_frequency
        of the overlap bootstrap's resamples."""
        floor = float(self.verdicts["focus_min_frequency"])
        return sorted(set(self.focus or []) | {layer for layer, f in self.focus_choice.items() if f >= floor})

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
        if value == "$min_gap":  # the smallest accuracy gap that counts as an effect (the premise's)
            return float(ctx.verdicts["premise_min_gap"])
        if value == "$damage_floor":  # the largest accuracy drop on the controls that is no damage, negated
            return -float(ctx.verdicts["max_control_damage"])
        if value == "$half_even_heads":
            return (ctx.num_heads + 1) // 2 // 2
        if value == "$quarter_even_heads":
            return max(1, (ctx.num_heads + 1) // 2 // 4)
        raise LedgerError(f"unknown token {value!r}; expected $focus, $buggy_format, $correct_format, "
                          "$all, $none, $min_gap, $damage_floor, $half_even_heads or $quarter_even_heads.")
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


def require_every_listed_value(sel: pl.DataFrame, where: Mapping[str, Any], ctx: Context, name: str) -> None:
    """A check on listed items (feature ids, layers) is tested on all of them or not at all: scored
    on the subset that happens to be present, it would pass more easily."""
    for col, raw in where.items():
        v = resolve_value(raw, ctx) if not isinstance(raw, dict) else None
        if isinstance(v, list):
            missing = sorted(set(v) - set(sel[col].to_list()))
            if missing:
                raise NotTestable(f"{col} {missing} of the claim's {v} are not in {name}")


def metric_values(df: pl.DataFrame, metric: str) -> pl.Series:
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


def pick_row(df: pl.DataFrame, values: pl.Series, aggregate: str) -> int:
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


def interval_of(df: pl.DataFrame, row: int, check: dict, value: float) -> tuple[float | None, float | None]:
    metric = check["metric"]
    names = check.get("ci") or RATE_INTERVALS.get(metric.strip()) or [f"{metric}_low", f"{metric}_high"]
    if "/" in metric or not all(n in df.columns for n in names):
        return None, None
    lo, hi = df[names[0]][row], df[names[1]][row]
    if check.get("aggregate", "").endswith("_abs") and lo is not None and hi is not None:
        # the interval of |x|: an interval that straddles 0 reaches from 0 to its larger end
        lo, hi = (-hi, -lo) if hi <= 0 else (lo, hi) if lo >= 0 else (0.0, max(-lo, hi))
    return lo, hi


def success_counts(rate, n_eligible) -> tuple[int, int] | None:
    """(successes, eligible targets) of a success rate, for Fisher's test; (0, 0) with no eligible
    target, None where the count is unknown."""
    if n_eligible is None:
        return None
    n = int(n_eligible)
    if n == 0:
        return 0, 0
    if rate is None or not math.isfinite(rate):
        return None
    return int(round(rate * n)), n


ALSO_OPS = {"at_most": lambda v, x: v <= x, "at_least": lambda v, x: v >= x,
            "above": lambda v, x: v > x, "below": lambda v, x: v < x}


def beside_text(df: pl.DataFrame, row: int, col: str) -> str:
    """'col=v [low, high]' of the selected row, for `beside` (not tested)."""
    if col not in df.columns:
        raise LedgerError(f"beside: column {col!r} is not in the table (columns: {', '.join(df.columns)}).")
    v = df[col][row]
    lo, hi = (df[f"{col}_{b}"][row] if f"{col}_{b}" in df.columns else None for b in ("low", "high"))
    ci = f" [{lo:.3g}, {hi:.3g}]" if lo is not None and hi is not None else ""
    return f"{col}={v:.3g}{ci}" if v is not None else f"{col}=null"


def describe_row(df: pl.DataFrame, row: int, where: Mapping) -> str:
    keys = [k for k in ("layer", "feature_id", "head_set", "setting") if k in df.columns]
    keys += [k for k, v in where.items() if k in df.columns and k not in keys and not k.startswith("is_")
             and not isinstance(v, (dict, list))]
    if "sample" in df.columns and df["sample"][row] is not None and df["sample"][row] >= 0:
        keys.append("sample")  # which random control
    return ", ".join(f"{k}={df[k][row]}" for k in keys if df[k][row] is not None)
