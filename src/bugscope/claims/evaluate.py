"""The claims ledger: every quantitative claim of the seed study, checked against the measured tables.

`config/claims.yaml` lists the claims; `bugscope.claims.checks` has the grammar of a check and how
one is decided (`bugscope.claims.decide`: on intervals). The ledger opens with this run's
preconditions (`bugscope.claims.preconditions`); each claim is then decided by its first testable
form, its p-values Holm-adjusted within its section, and evaluated again at every layer the focus
choice picks often ("layer-dependent" where the verdicts differ).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping

import polars as pl

from bugscope.claims.checks import check_outcome, check_text, rule_text, run_check
from bugscope.claims.decide import FAIL, INCONCLUSIVE, PASS, adjust_family, combine
from bugscope.claims.preconditions import Outcome, ceiling, evaluate_needs, premise
from bugscope.claims.select import Context, NotTestable
from bugscope.claims.spec import CLAIM_SOURCES

VERDICTS = ("holds", "fails", "inconclusive", "layer-dependent", "not testable here")
VERDICT_OF = {PASS: "holds", FAIL: "fails", INCONCLUSIVE: "inconclusive"}

# Where a claim comes from: the seed document, the published paper (arXiv 2508.19414) and its code,
# or a control claim of the ground truth (bugscope.claims.truth).
SOURCES = CLAIM_SOURCES
RESULT_SCHEMA = {
    "claim_id": pl.String, "source": pl.String, "section": pl.String, "claim": pl.String, "study_value": pl.String,
    "verdict": pl.String, "form": pl.String, "form_tested": pl.String, "table": pl.String, "metric": pl.String,
    "rule": pl.String, "selected": pl.String, "measured": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64,
    "n": pl.Int64, "n_unit": pl.String, "sae_set": pl.String, "agrees_across_sae_sets": pl.Boolean,
    "family_tests": pl.Int64, "detail": pl.String,
}


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
    notes += [check_text(i, c, r, claim["study_value"], alpha, ctx) for i, (c, r) in enumerate(zip(checks, results))]
    if others:
        notes.append("on the other SAE sets: " + ", ".join(f"{name}: {v}" for name, v in others.items()))
    tested = [v for v in others.values() if v in ("holds", "fails", "inconclusive")]
    first = results[0]
    return {"verdict": verdict, "form": form["form"], "form_tested": form["description"].strip(),
            "table": ", ".join(dict.fromkeys(c["table"] for c in checks)), "metric": checks[0]["metric"],
            "rule": "; ".join(rule_text(c, claim["study_value"], ctx) for c in checks),
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
    others = [layer for layer in ctx.chosen_layers() if layer not in (ctx.focus or [])]
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
    for layer in ctx.chosen_layers():
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
