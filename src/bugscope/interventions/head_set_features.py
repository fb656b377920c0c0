"""Which critical SAE features a head-set patch turns on: the seed's "any 8 even heads -> at least 5
critical features active -> success; 4 even heads -> only 2-3".

At each focus layer an SAE set covers, every even-head set of `patching.exhaustive`
(all sets of a size within its budget, else seeded draws, as in the exhaustive stage) is patched
from the correct format into the buggy one on the eligible targets of the bug's pair kind, with
the per-head method of `patching` (`patching.positions` and `operation`). The layer's output at
the SAE set's site (the residual stream, or the MLP output the patch feeds) at the decision
position is encoded by the layer's SAE, and the critical features active there (> 0) are counted.

Critical feature sets (column `feature_set`): `top`, the layer's CRITICAL_TOP_N most
correct-format-up discriminative features (direction down, the ranking `interventions.top_set`
uses); `critical`, the SAE set's named category `critical` of the layer (the seed's ids), where
the config has one. Each summary row carries two references over the same targets: the count of
the unpatched buggy prompt (`unpatched_active`, the empty head set) and of the source prompt itself
(`source_active`, the correct format); the `*activation` columns give the set's mean activation
the same way, which moves where a count of active features cannot (a feature active in both
formats). Success of the same head sets is the exhaustive table's.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from bugscope.data.prompts import BUG_PAIR_KIND, is_selection_pair
from bugscope.features.named import named_feature_ids
from bugscope.interventions.sae_features import top_set
from bugscope.patching.head_sets import HeadSet, exhaustive_head_sets
from bugscope.patching.pairs import PatchPair, PatchSpec, make_pairs
from bugscope.patching.study import eligible_pairs, spec_from_config
from bugscope.stats import cluster_bootstrap_mean_ci_columns

CRITICAL_TOP_N = 5  # the seed's five critical numerical features (10049, 11664, 8234, 15789, 22156)
CRITICAL_CATEGORY = "critical"  # the named category of the seed's critical features
UNPATCHED = HeadSet("none", "reference", (), "none", -1)

PROMPT_COLUMNS = ["sae_set", "layer", "feature_set", "n_features", "head_set", "pool", "k", "heads", "prompt_id",
                  "pair_id", "n_active", "unpatched_active", "source_active", "activation", "unpatched_activation",
                  "source_activation"]


def critical_sets(discriminative: pl.DataFrame, named_cfg: Mapping, layer: int) -> dict[str, tuple[int, ...]]:
    """feature_set -> feature ids at `layer`: `top` (CRITICAL_TOP_N correct-format-up) and the named `critical`."""
    out = {}
    top = top_set(discriminative, layer, CRITICAL_TOP_N)
    if top is not None and top.correct_up:
        out["top"] = top.correct_up
    named = named_feature_ids(named_cfg).get(layer, {}).get(CRITICAL_CATEGORY)
    if named:
        out[CRITICAL_CATEGORY] = tuple(named)
    return out


def even_head_sets(n_heads: int, config: dict, layer: int) -> list[HeadSet]:
    ex = config["patching"]["exhaustive"]
    return exhaustive_head_sets(n_heads, pools=["even"], budget=ex["budget"], samples=ex["samples"],
                                seed=config["seed"], layer=layer, sizes=ex["sizes"])


@torch.inference_mode()
def count_active(patcher, pairs: Sequence[PatchPair], layer: int, head_sets: Sequence[HeadSet], sae,
                 feature_sets: Mapping[str, Sequence[int]], spec: PatchSpec, *, read: str,
                 desc: str = "head sets -> features") -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """({feature_set: [len(head_sets), n_pairs, 2]}, {feature_set: [n_pairs, 2]}): how many of each
    set's features the SAE of site `read` finds active at the decision position of `layer` (index 0)
    and their mean activation (index 1), per head set patched by `spec`, and in the source prompts."""
    sdev, sdtype = next(sae.parameters()).device, sae.W_dec.dtype
    ids = {name: torch.tensor(list(f), dtype=torch.long, device=sdev) for name, f in feature_sets.items()}

    def counts(resid: torch.Tensor) -> dict[str, torch.Tensor]:  # [..., d_model] -> {name: [..., 2]}
        f = sae.encode(resid.to(sdev, sdtype))
        return {name: torch.stack([(f[..., i] > 0).sum(-1).double(), f[..., i].double().mean(-1)], -1).cpu()
                for name, i in ids.items()}

    n = len(pairs)
    patched = {name: np.zeros((len(head_sets), n, 2)) for name in ids}
    source = {name: np.zeros((n, 2)) for name in ids}
    n_ctx = max(len(p.target["input_ids"]) for p in pairs)
    rows = patcher.rows_per_forward(n_ctx - min(min(p.target_positions) for p in pairs), n_ctx)
    per_batch = max(1, min(n, patcher.max_prompts, rows))
    per_forward = max(1, rows // per_batch)
    means = patcher.mean_values(pairs, [layer], spec.site) if spec.operation == "mean" else None
    bar = tqdm(total=math.ceil(n / per_batch) * math.ceil(len(head_sets) / per_forward), desc=desc,
               unit="forward", disable=not patcher.progress)
    for start in range(0, n, per_batch):
        part = pairs[start:start + per_batch]
        cols = slice(start, start + len(part))
        prep = patcher.prepare(part, [layer], spec, means)
        for name, c in counts(patcher.site_output([p.source for p in part], layer, read)).items():
            source[name][cols] = c.numpy()
        for j in range(0, len(head_sets), per_forward):
            chunk = head_sets[j:j + per_forward]
            for name, c in counts(patcher.patched_site_output(prep, layer, chunk, spec.site, read)).items():
                patched[name][j:j + len(chunk), cols] = c.numpy()
            bar.update()
    bar.close()
    return patched, source


def head_set_features(patcher, prompts: pl.DataFrame, layers: Sequence[int], config: dict, *,
                      saes: Mapping[tuple[str, int], object], sites: Mapping[str, str],
                      feature_sets: Mapping[tuple[str, int], Mapping], unpatched: dict[int, float]
                      ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(per prompt, summary) for every (SAE set, layer) of `saes` (its SAE, of the site `sites[set]`)
    and `feature_sets` (its critical sets)."""
    spec, target, source = spec_from_config(config)
    direction = config["patching"]["direction"]
    pairs = make_pairs(prompts.filter(pl.col("pair_kind") == BUG_PAIR_KIND), target, source, spec.positions)
    pairs = eligible_pairs(pairs, direction, unpatched)
    pair_of = dict(zip(prompts["prompt_id"].to_list(), prompts["pair_id"].to_list()))
    out = []
    for (sae_set, layer), sae in saes.items():
        sets = feature_sets[(sae_set, layer)]
        if not pairs or not sets:
            continue
        head_sets = [UNPATCHED, *even_head_sets(patcher.n_heads, config, layer)]
        patched, src = count_active(patcher, pairs, layer, head_sets, sae, sets, spec, read=sites[sae_set], desc=f"head sets -> features L{layer}")
        pids = [p.target["prompt_id"] for p in pairs]
        for name, ids in sets.items():
            r, n, _ = patched[name].shape
            active, activation = patched[name][..., 0], patched[name][..., 1]
            out.append(pl.DataFrame({
                "sae_set": [sae_set] * (r * n), "layer": np.full(r * n, layer, dtype=np.int32),
                "feature_set": [name] * (r * n), "n_features": np.full(r * n, len(ids), dtype=np.int32),
                "head_set": np.repeat([s.name for s in head_sets], n), "pool": np.repeat([s.pool for s in head_sets], n),
                "k": np.repeat([len(s.heads) for s in head_sets], n).astype(np.int32),
                "heads": [list(s.heads) for s in head_sets for _ in range(n)],
                "prompt_id": np.tile(np.asarray(pids, dtype=np.int32), r),
                "pair_id": np.tile(np.asarray([pair_of[p] for p in pids], dtype=np.int32), r),
                "n_active": active.reshape(-1).astype(np.int32),
                "unpatched_active": np.tile(active[0], r).astype(np.int32),
                "source_active": np.tile(src[name][:, 0], r).astype(np.int32),
                "activation": activation.reshape(-1), "unpatched_activation": np.tile(activation[0], r),
                "source_activation": np.tile(src[name][:, 1], r),
            }, schema_overrides={"heads": pl.List(pl.Int32)}))
    per_prompt = (pl.concat(out) if out else pl.DataFrame(schema=PROMPT_SCHEMA)).select(PROMPT_COLUMNS)
    return per_prompt, summarise(per_prompt, config)


PROMPT_SCHEMA = {"sae_set": pl.String, "layer": pl.Int32, "feature_set": pl.String, "n_features": pl.Int32,
                 "head_set": pl.String, "pool": pl.String, "k": pl.Int32, "heads": pl.List(pl.Int32),
                 "prompt_id": pl.Int32, "pair_id": pl.Int32, "n_active": pl.Int32, "unpatched_active": pl.Int32,
                 "source_active": pl.Int32, "activation": pl.Float64, "unpatched_activation": pl.Float64,
                 "source_activation": pl.Float64}
KEYS = ["sae_set", "layer", "feature_set", "n_features", "head_set", "pool", "k"]


def summarise(per_prompt: pl.DataFrame, config: dict) -> pl.DataFrame:
    """Per (SAE set, layer, feature set, head set) and pair subset (`pairs`: all, or heldout = the odd
    pair ids, on which the `top` features were not ranked): the mean count of active critical
    features over the eligible targets, with a cluster-bootstrap CI over number pairs, and the two
    references over the same targets."""
    boot = config["bootstrap"]
    parts = []
    for _, group in per_prompt.group_by(["sae_set", "layer", "feature_set"], maintain_order=True):
        for subset in PAIR_SUBSETS:
            g = group if subset == "all" else group.filter(~is_selection_pair(pl.col("pair_id")))
            if g.is_empty():
                continue
            sets = g.select(KEYS).unique(maintain_order=True)
            ref = g.filter(pl.col("head_set") == UNPATCHED.name).sort("prompt_id")
            names = sets["head_set"].to_list()
            columns = []
            for value, unpatched, source in (("n_active", "unpatched_active", "source_active"),
                                             ("activation", "unpatched_activation", "source_activation")):
                wide = g.pivot(on="head_set", index="prompt_id", values=value, sort_columns=False).sort("prompt_id")
                columns += [wide[h].to_numpy().astype(np.float64) for h in names]
                columns += [ref[unpatched].to_numpy().astype(np.float64), ref[source].to_numpy().astype(np.float64)]
            mean, low, high = cluster_bootstrap_mean_ci_columns(
                np.column_stack(columns), ref["pair_id"].to_numpy(), n_resamples=boot["n_resamples"],
                confidence=boot["confidence"], seed=config["seed"])
            m, a = sets.height, sets.height + 2  # counts, then activations
            parts.append(sets.with_columns(
                pairs=pl.lit(subset), mean_active=pl.Series(mean[:m]), active_low=pl.Series(low[:m]),
                active_high=pl.Series(high[:m]), unpatched_active=pl.lit(float(mean[m])),
                source_active=pl.lit(float(mean[m + 1])), mean_activation=pl.Series(mean[a:a + m]),
                activation_low=pl.Series(low[a:a + m]), activation_high=pl.Series(high[a:a + m]),
                unpatched_activation=pl.lit(float(mean[a + m])), source_activation=pl.lit(float(mean[a + m + 1])),
                n_prompts=pl.lit(ref.height, dtype=pl.Int32), n_pairs=pl.lit(ref["pair_id"].n_unique(), dtype=pl.Int32)))
    if not parts:
        return pl.DataFrame(schema=SUMMARY_SCHEMA)
    return pl.concat(parts).select(list(SUMMARY_SCHEMA)).sort("sae_set", "layer", "feature_set", "pairs", "k", "head_set")


PAIR_SUBSETS = ("all", "heldout")
SUMMARY_SCHEMA = {**{k: PROMPT_SCHEMA[k] for k in KEYS}, "pairs": pl.String, "mean_active": pl.Float64,
                  "active_low": pl.Float64, "active_high": pl.Float64, "unpatched_active": pl.Float64,
                  "source_active": pl.Float64, "mean_activation": pl.Float64, "activation_low": pl.Float64,
                  "activation_high": pl.Float64, "unpatched_activation": pl.Float64,
                  "source_activation": pl.Float64, "n_prompts": pl.Int32, "n_pairs": pl.Int32}
