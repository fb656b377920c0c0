"""Localisation scores: does the organism's own study find where the bug was planted?

Read from the organism's patching tables on the bug's pairs (both orders pooled), at the positions
its sweep patched:
- the layer the head sweep itself picks (best recovery of all heads) and whether it is the planted
  one: the organism's ledger reads its location claims at the planted layer (the ground truth), and
  this says whether the pipeline's own choice would have read them there too;
- the planted layer's rank among the analysed layers by the recovery of patching all heads (the head
  sweep) and by the best recovery of the residual map over positions (1 = the best layer);
- the precision and recall of the planted heads among the single heads whose recovery CI lies above
  the random-head control of their size: the recovery expected of one head drawn at random at that
  layer, the mean over its heads (the sweep's random_k controls patch 4-5 heads at once, a bar no
  single head of a distributed mechanism clears);
- the recovery of the planted head set beside the whole-residual ceiling at that layer, and their ratio.

`behaviour_change` adds what planting did to the answers, per format and pair kind: the paired
change in accuracy (planted minus unedited, per prompt, CI over number pairs) and how many prompts
changed their answer. The correct format should not move. Its paired change is the measure, not the
planted accuracy against the unedited model's interval: the unedited model names the last-asked
number on the control kinds, exactly 0.5 on every pair, so its bootstrap interval is [0.5, 0.5] and
no change at all could fall inside it.
"""

from __future__ import annotations

import polars as pl

from bugscope.data.prompts import ALL, BUG_PAIR_KIND, PAIR_KINDS
from bugscope.stats import cluster_bootstrap_mean_ci_columns

LOCALISATION_SCHEMA = {"score": pl.String, "value": pl.Float64, "low": pl.Float64, "high": pl.Float64,
                       "n": pl.Int64, "n_unit": pl.String, "detail": pl.String}


def _bug(df: pl.DataFrame) -> pl.DataFrame:
    return df.filter(pl.col("pair_kind") == BUG_PAIR_KIND, pl.col("order") == ALL)


def _rank(values: dict[int, float], layer: int) -> int | None:
    """1 + the number of layers with a higher value (ties share the better rank)."""
    if layer not in values or values[layer] is None:
        return None
    return 1 + sum(v is not None and v > values[layer] for v in values.values())


def localisation(heads: pl.DataFrame, residual_map: pl.DataFrame | None, layer: int, planted: list[int],
                 positions: str) -> pl.DataFrame:
    """The localisation scores of a planted `layer` and heads `planted` (see the module docstring)."""
    sweep = _bug(heads).filter(pl.col("positions") == positions)
    rows = []
    by_layer = {r["layer"]: r["recovery"] for r in sweep.filter(pl.col("head_set") == "all").iter_rows(named=True)}
    rank = _rank(by_layer, layer)
    scored = {k: v for k, v in by_layer.items() if v is not None}
    choice = max(scored, key=lambda k: (scored[k], -k)) if scored else None
    rows.append({"score": "head_sweep_choice", "value": None if choice is None else float(choice), "n": len(scored),
                 "n_unit": "layers", "detail": "the layer the head sweep itself picks (best recovery of all heads): "
                 + ("none" if choice is None else "the planted layer" if choice == layer else
                    f"not the planted layer {layer}: the location claims at the planted layer are the ground truth, "
                    "not this choice")})
    rows.append({"score": "head_sweep_layer_rank", "value": None if rank is None else float(rank), "n": len(by_layer),
                 "n_unit": "layers", "detail": "recovery of all heads patched, by layer: "
                 + ", ".join(f"{k}: {v:.3g}" for k, v in sorted(by_layer.items()) if v is not None)})
    if residual_map is not None:
        best = _bug(residual_map).group_by("layer").agg(pl.col("recovery").max())
        by_map = {r["layer"]: r["recovery"] for r in best.iter_rows(named=True)}
        rank = _rank(by_map, layer)
        rows.append({"score": "residual_map_layer_rank", "value": None if rank is None else float(rank),
                     "n": len(by_map), "n_unit": "layers", "detail": "best recovery over positions, by layer: "
                     + ", ".join(f"{k}: {v:.3g}" for k, v in sorted(by_map.items()) if v is not None)})
    at = sweep.filter(pl.col("layer") == layer)
    singles = at.filter(pl.col("head_set").str.contains(r"^head\d+$"))
    bar = singles["recovery"].mean() if singles.height else None
    found = sorted(int(r["head_set"][4:]) for r in singles.iter_rows(named=True)
                   if bar is not None and r["recovery_low"] is not None and r["recovery_low"] > bar)
    hits = len(set(found) & set(planted))
    control_text = ("no single-head rows at this layer" if bar is None
                    else f"recovery of one head drawn at random ({bar:.3g}, the mean over the layer's heads)")
    rows.append({"score": "planted_head_precision", "value": hits / len(found) if found else None, "n": len(found),
                 "n_unit": "heads found", "detail": f"heads whose recovery CI lies above the {control_text}: {found}"})
    rows.append({"score": "planted_head_recall", "value": hits / len(planted), "n": len(planted),
                 "n_unit": "planted heads", "detail": f"planted heads {planted}; found {sorted(set(found) & set(planted))}"})
    planted_set = "even" if planted == list(range(0, 2 * len(planted), 2)) else "odd" if planted == list(
        range(1, 2 * len(planted) + 1, 2)) else None
    sets = {r["head_set"]: r for r in at.iter_rows(named=True)}
    ceiling = next((r for r in sets.values() if r["family"] == "ceiling"), None)
    mine = sets.get(planted_set) if planted_set else None
    for name, r in (("planted_set_recovery", mine), ("ceiling_recovery", ceiling)):
        rows.append({"score": name, "value": None if r is None else r["recovery"],
                     "low": None if r is None else r["recovery_low"], "high": None if r is None else r["recovery_high"],
                     "n": None if r is None else r["n_eligible_pairs"], "n_unit": "eligible number pairs",
                     "detail": f"head set {planted_set if name == 'planted_set_recovery' else 'resid_post'} at layer "
                     f"{layer}, {positions} positions" + ("" if r is not None else ": no row")})
    ratio = (mine["recovery"] / ceiling["recovery"] if mine and ceiling and ceiling["recovery"] else None)
    rows.append({"score": "planted_share_of_ceiling", "value": ratio, "n": None, "n_unit": None,
                 "detail": "planted-set recovery / whole-residual recovery (ratio of the point estimates)"})
    return pl.DataFrame(rows, schema=LOCALISATION_SCHEMA)


def behaviour_change(unedited: pl.DataFrame, planted: pl.DataFrame, *, formats: list[str], n_resamples: int,
                     confidence: float, seed: int) -> pl.DataFrame:
    """Rows `<format>_change_<kind>` (see the module docstring): planted minus unedited accuracy,
    paired per prompt, with its CI over number pairs, n the number pairs, the changed prompts in the detail.
    `unedited`, `planted`: baseline score tables (prompt_id, pair_id, pair_kind, format, is_correct)."""
    joined = (unedited.select("prompt_id", "pair_id", "pair_kind", "format", pl.col("is_correct").alias("before"))
              .join(planted.select("prompt_id", pl.col("is_correct").alias("after")), on="prompt_id"))
    rows = []
    for fmt in formats:
        for kind in [k for k in PAIR_KINDS if k in set(joined["pair_kind"])]:
            part = joined.filter(pl.col("format") == fmt, pl.col("pair_kind") == kind)
            change = (part["after"].cast(pl.Float64) - part["before"].cast(pl.Float64)).to_numpy()
            point, low, high = cluster_bootstrap_mean_ci_columns(change[:, None], part["pair_id"].to_numpy(),
                                                                  n_resamples=n_resamples, confidence=confidence,
                                                                  seed=seed)
            flipped = int((part["after"] != part["before"]).sum())
            rows.append({"score": f"{fmt}_change_{kind}", "value": float(point[0]), "low": float(low[0]),
                         "high": float(high[0]), "n": part["pair_id"].n_unique(), "n_unit": "number pairs",
                         "detail": f"{fmt} accuracy, planted minus unedited, paired per prompt: {flipped} of "
                         f"{part.height} prompts changed their answer ({int((part['after'] & ~part['before']).sum())} "
                         f"now right, {int((~part['after'] & part['before']).sum())} now wrong); unedited "
                         f"{part['before'].mean():.3g}, planted {part['after'].mean():.3g}"})
    return pl.DataFrame(rows, schema=LOCALISATION_SCHEMA)
