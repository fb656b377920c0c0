"""Preconditions of a claim (research notes section 9): what must hold before a claim about a fix,
a component or a feature count can be decided at all. A claim names the ones it needs
(`needs:` in the claims file); where one fails, the claim is "not testable", with the numbers.

- premise: the format gap on the bug's pair kind (correct format minus buggy format accuracy,
  paired over number pairs) has its CI lower bound at least `premise_min_gap`;
- ceiling: the whole-residual patch at the claim's layer (decision position) fixes the bug, its
  success lower bound at least `ceiling_min_success`, and beats the random-head control there
  (Fisher, alpha) where that control was run. A site where nothing can fix anything says nothing
  about which heads do, or do not, fix it;
- eligible_pairs: the selected row rests on at least `min_eligible_pairs` eligible number pairs;
- sources_judged: every row the claim reads judges some source right under its criterion;
- features_can_move: the mean count of active features differs by at least half a feature between
  the unpatched target and the source, so a patch can move it (five features active in every
  condition cannot);
- reading_probe: the closeness probe (bugscope.data.reading) at the claim's layer and position tells
  the reading families from the decimal family on the held-out wording and pairs, its accuracy's
  lower bound at least `reading_probe_min_accuracy`.

The thresholds are the config's `claims.verdicts`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import polars as pl

from bugscope.claims.select import success_counts
from bugscope.data.prompts import ALL, BUG_PAIR_KIND
from bugscope.stats import fisher_exact_p


@dataclass
class Outcome:
    name: str
    ok: bool | None  # None: cannot be evaluated here (its table was not produced)
    text: str


def _fmt(v) -> str:
    return "null" if v is None else f"{v:.3g}"


def premise(tables: Mapping[str, pl.DataFrame | None], verdicts: Mapping) -> Outcome:
    df = tables.get("baseline_contrast")
    if df is None or "pair_kind" not in df.columns:
        return Outcome("premise", None, "premise: the baseline contrast table was not produced")
    row = df.filter(pl.col("pair_kind") == BUG_PAIR_KIND)
    if row.height != 1:
        return Outcome("premise", None, f"premise: no single {BUG_PAIR_KIND} row in the baseline contrast")
    r = row.row(0, named=True)
    need = float(verdicts["premise_min_gap"])
    ok = r["accuracy_gap_low"] is not None and r["accuracy_gap_low"] >= need
    return Outcome("premise", ok, f"premise: format gap on {BUG_PAIR_KIND} (correct minus buggy accuracy) "
                   f"{_fmt(r['accuracy_gap'])} [{_fmt(r['accuracy_gap_low'])}, {_fmt(r['accuracy_gap_high'])}] "
                   f"over {r['n_pairs']} number pairs; needs lower bound >= {need:g} -> {'pass' if ok else 'fail'}")


def _bug_rows(df: pl.DataFrame, layer: int, positions: str) -> pl.DataFrame:
    return df.filter(pl.col("pair_kind") == BUG_PAIR_KIND, pl.col("order") == ALL, pl.col("layer") == layer,
                     pl.col("positions") == positions)


def _count(r: Mapping) -> tuple[int, int]:
    return success_counts(r["success_rate"], r["n_eligible"]) or (0, int(r["n_eligible"] or 0))


def ceiling(tables: Mapping[str, pl.DataFrame | None], layer: int | None, verdicts: Mapping) -> Outcome:
    df = tables.get("head_patching")
    if df is None:
        return Outcome("ceiling", None, "ceiling: the head-patching table (with the ceiling rows) was not produced")
    if layer is None:
        return Outcome("ceiling", None, "ceiling: the claim's row names no layer")
    positions = verdicts.get("patch_positions", "decision")
    where = "decision position" if positions == "decision" else f"{positions} positions"
    rows = _bug_rows(df, layer, positions)
    ceil = rows.filter(pl.col("family") == "ceiling")
    if ceil.height != 1:
        return Outcome("ceiling", None, f"ceiling: no whole-residual row at layer {layer}"
                       + ("" if positions == "decision" else f" ({where})"))
    c = ceil.row(0, named=True)
    need = float(verdicts["ceiling_min_success"])
    ok = c["success_low"] is not None and c["success_low"] >= need
    k, n = _count(c)
    text = (f"ceiling: whole-residual patch at layer {layer}, {where}, fixes {k}/{n} eligible targets "
            f"(success {_fmt(c['success_rate'])} [{_fmt(c['success_low'])}, {_fmt(c['success_high'])}], "
            f"{c['n_eligible_pairs']} number pairs); needs lower bound >= {need:g}")
    controls = rows.filter(pl.col("family") == "random_control")
    for r in controls.iter_rows(named=True):
        kr, nr = _count(r)
        p = fisher_exact_p(k, n, kr, nr)
        beats = p <= float(verdicts["alpha"]) and k / max(n, 1) > kr / max(nr, 1)
        ok = ok and beats
        text += f"; beats {r['head_set']} ({kr}/{nr}): Fisher p={p:.3g} -> {'yes' if beats else 'no'}"
    if controls.height == 0:
        text += "; no random-head control was run at this layer"
    return Outcome("ceiling", ok, text + f" -> {'pass' if ok else 'fail'}")


def eligible_pairs(row: Mapping, verdicts: Mapping) -> Outcome:
    n = row.get("n_eligible_pairs")
    if n is None:
        return Outcome("eligible_pairs", None, "eligible_pairs: the row has no count of eligible number pairs")
    need = int(verdicts["min_eligible_pairs"])
    ok = n >= need
    return Outcome("eligible_pairs", ok, f"eligible_pairs: {n} eligible number pairs; needs >= {need} "
                   f"-> {'pass' if ok else 'fail'}")


def sources_judged(matched: pl.DataFrame) -> Outcome:
    """Every row the claim reads (all steps of a chain, not only the one its aggregate picks) judges
    some source right: a step whose criterion judges none right measures the criterion, not the patch."""
    if "source_success" not in matched.columns:
        return Outcome("sources_judged", None, "sources_judged: the rows have no source_success")
    worst = matched.sort("source_success").row(0, named=True)
    ok = (worst["source_success"] or 0) > 0
    where = ", ".join(f"{k}={worst[k]}" for k in ("setting", "layer", "head_set") if k in worst)
    return Outcome("sources_judged", ok, f"sources_judged: {_fmt(worst['source_success'])} of the sources are right "
                   f"under the criterion at {where} (the lowest of {matched.height} rows read) "
                   f"-> {'pass' if ok else 'fail'}")


def features_can_move(row: Mapping) -> Outcome:
    if "unpatched_active" not in row or "source_active" not in row:
        return Outcome("features_can_move", None, "features_can_move: the row has no unpatched / source counts")
    # at least half a feature apart on average: two bootstrap means of 4.99 and 5.0 cannot move
    ok = abs((row["source_active"] or 0) - (row["unpatched_active"] or 0)) >= 0.5
    return Outcome("features_can_move", ok, f"features_can_move: {_fmt(row['unpatched_active'])} features active "
                   f"unpatched, {_fmt(row['source_active'])} in the source -> {'pass' if ok else 'fail'}")


def reading_probe(tables: Mapping[str, pl.DataFrame | None], row: Mapping, verdicts: Mapping) -> Outcome:
    df = tables.get("reading_closeness")
    if df is None:
        return Outcome("reading_probe", None, "reading_probe: the reading closeness table was not produced")
    where = {k: row.get(k) for k in ("variant", "layer", "position")}
    match = df.filter(pl.col("measure") == "transfer_accuracy", pl.col("family") == ALL,
                      *(pl.col(k) == v for k, v in where.items()))
    if match.height != 1:
        return Outcome("reading_probe", None, f"reading_probe: no single held-out accuracy row at {where}")
    r = match.row(0, named=True)
    need = float(verdicts["reading_probe_min_accuracy"])
    ok = r["value_low"] is not None and r["value_low"] >= need
    return Outcome("reading_probe", ok, f"reading_probe: the closeness probe at layer {r['layer']} ({r['position']}) "
                   f"tells the families apart on the held-out wording and pairs with accuracy {_fmt(r['value'])} "
                   f"[{_fmt(r['value_low'])}, {_fmt(r['value_high'])}] over {r['n_pairs']} number pairs; "
                   f"needs lower bound >= {need:g} -> {'pass' if ok else 'fail'}")


def evaluate_needs(needs, rows: list[Mapping], tables: Mapping[str, pl.DataFrame | None],
                   verdicts: Mapping, matched: pl.DataFrame | None = None) -> list[Outcome]:
    """The outcome of each precondition a claim names, on the rows its checks selected: the first
    check's row names the layer and the measure; eligible_pairs reads the fewest of any row."""
    out = []
    row = rows[0]
    for name in needs:
        if name == "premise":
            out.append(premise(tables, verdicts))
        elif name == "ceiling":
            out.append(ceiling(tables, row.get("layer"), verdicts))
        elif name == "eligible_pairs":
            counted = [r for r in rows if r.get("n_eligible_pairs") is not None]
            out.append(eligible_pairs(min(counted, key=lambda r: r["n_eligible_pairs"]) if counted else row, verdicts))
        elif name == "sources_judged":
            out.append(sources_judged(matched if matched is not None else pl.DataFrame([row])))
        elif name == "reading_probe":
            out.append(reading_probe(tables, row, verdicts))
        else:
            out.append(features_can_move(row))
    return out
