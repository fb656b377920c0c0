"""SAE-feature interventions: edit an SAE's features inside the forward pass and score the buggy prompts.

At a layer's site (the SAE set's site, resid_post for the primary set) the SAE is spliced in with
its error term kept: the site's output x becomes

    decode(f') + (x - decode(f)),   f = encode(x), f' = the intervened features,

computed as x + (decode(f') - decode(f)), the same quantity, so that f' = f leaves x exactly as it
was (tests check the logits against the unpatched run within a dtype-derived tolerance). Only the
intervened positions change: the decision position by default (`interventions.positions`, with the
semantics of `patching.positions`: `decision`, `aligned`, `suffix`).

The targets are the buggy format's prompts, each with the correct format's prompt of the same
question as its source (`bugscope.patching.make_pairs`); every pair kind is run, so the control
pairs (pair kinds other than the bug's) show what an intervention breaks. Interventions (column
`intervention`):
- `none`: f' = f (the identity; its rates are the unpatched ones);
- `ablate`: the set's buggy-format-up features set to 0;
- `clamp`: every feature of the set set to its value in the source prompt (same question, correct
  format) at the matched position;
- `steer`: additive steering of the set's correct-format-up features, f'_i = f_i + scale * m_i with
  m_i the feature's mean activation over the correct-format (source) prompts at the intervened
  positions (zeros included); scale 0 is the identity. Additive rather than multiplicative: a
  multiplied feature that does not fire in a buggy prompt stays 0, so multiplication cannot add
  what the buggy format lacks.

Feature sets (column `feature_set`, one per layer): `top`, the top_n discriminative features of
each direction (buggy-format-up = direction up, correct-format-up = down; ranked on the number
pairs with an even pair_id where the features stage made that ranking, so the held-out rows
(`pairs` = heldout, the odd pair ids) test features not chosen on them); `named`, the SAE set's
named features of the layer (buggy_format_up ablated, correct_format_up steered, every category
clamped); and each of `interventions.feature_sets` (all three interventions on its features).
Each tested set (family `tested`) has `n_random_controls` random controls (family
`random_control`, same feature_set name, `sample` 0, 1, ...): every feature of the set replaced
by a random feature of the same firing-rate bin (quantile bins of the firing rate over the targets
and sources at the intervened positions; features of no tested set of the layer), seeded.

The summary (`summarise`) gives, per condition, the rates of `bugscope.patching.summary` (success
and recovery on the eligible targets, broken rate, accuracy before and after, with cluster-bootstrap
CIs over number pairs) per pair kind and order, pooled (`all`) and over the control kinds pooled
(`controls`), on all pairs and on the held-out pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import polars as pl
import torch

from bugscope.data.prompts import ALL, BUG_PAIR_KIND, CONTROLS, is_selection_pair
from bugscope.features.discriminative import SPLIT_COMPARISON
from bugscope.features.named import named_feature_ids
from bugscope.model.forward import LayerRunner, capture_sites, make_batch
from bugscope.model.sites import hook_name
from bugscope.patching.pairs import PatchPair, make_pairs
from bugscope.patching.summary import per_prompt_matrices, rate_columns
from bugscope.stats import derived_seed

INTERVENTIONS = ("none", "ablate", "clamp", "steer")
FOCUS = "focus"  # the token of interventions.layers for the focus layers
PAIR_SUBSETS = ("all", "heldout")  # heldout: odd pair ids (the top features are ranked on the even ones)
_RANDOM_STREAM = 15  # label of the random-control draws in stats.derived_seed

CONDITION_COLUMNS = ["sae_set", "layer", "feature_set", "family", "sample", "intervention", "scale", "n_features",
                     "feature_ids"]
PROMPT_COLUMNS = [*CONDITION_COLUMNS[:-1], "prompt_id", "source_prompt_id", "question_id", "pair_id", "pair_kind",
                  "order", "logit_diff", "baseline_logit_diff", "source_logit_diff", "is_correct", "baseline_correct"]


class InterventionConfigError(ValueError):
    """The interventions section cannot be run as written; the message says which key."""


@dataclass(frozen=True)
class FeatureSet:
    """The features one set intervenes on, by role."""

    name: str
    family: str  # tested | random_control
    sample: int  # -1 for a tested set
    buggy_up: tuple[int, ...]  # ablated
    correct_up: tuple[int, ...]  # steered
    clamped: tuple[int, ...]  # clamped to the source's values


@dataclass(frozen=True)
class Condition:
    feature_set: FeatureSet | None  # None: the identity
    intervention: str
    scale: float | None = None

    @property
    def features(self) -> tuple[int, ...]:
        if self.feature_set is None:
            return ()
        fs = self.feature_set
        return {"ablate": fs.buggy_up, "clamp": fs.clamped, "steer": fs.correct_up}[self.intervention]

    def row(self, sae_set: str, layer: int) -> dict:
        fs = self.feature_set
        return {"sae_set": sae_set, "layer": layer, "feature_set": fs.name if fs else "none",
                "family": fs.family if fs else "none", "sample": fs.sample if fs else -1,
                "intervention": self.intervention, "scale": self.scale, "n_features": len(self.features),
                "feature_ids": list(self.features)}


# --- which layers, which features -----------------------------------------------------------------


def intervention_layers(config: dict, focus: Sequence[int], covered: Sequence[int]) -> list[int]:
    """interventions.layers with the token `focus` replaced by the focus layers; each must be covered by the set."""
    out = []
    for item in config["interventions"]["layers"]:
        out += list(focus) if item == FOCUS else [int(item)]
    out = sorted(set(out))
    bad = [layer for layer in out if layer not in covered]
    if bad:
        raise InterventionConfigError(
            f"interventions.layers gives layers {bad}, which the SAE set does not cover (its layers: {sorted(covered)}). "
            "Remove them or add them to the set's layers.")
    return out


def _uniq(ids) -> tuple[int, ...]:
    return tuple(dict.fromkeys(int(i) for i in ids))


def top_set(discriminative: pl.DataFrame, layer: int, top_n: int) -> FeatureSet | None:
    """The top_n features of each direction at `layer` (ranked on the even pairs where that ranking exists)."""
    rows = discriminative.filter(pl.col("layer") == layer)
    comparison = SPLIT_COMPARISON if (rows["comparison"] == SPLIT_COMPARISON).any() else "buggy_vs_correct"
    rows = rows.filter(pl.col("comparison") == comparison, pl.col("rank") < top_n).sort("rank")
    up = _uniq(rows.filter(pl.col("direction") == "up")["feature_id"].to_list())
    down = _uniq(rows.filter(pl.col("direction") == "down")["feature_id"].to_list())
    if not up and not down:
        return None
    return FeatureSet("top", "tested", -1, up, down, _uniq([*up, *down]))


def named_set(named_cfg: Mapping, layer: int) -> FeatureSet | None:
    """The SAE set's named features of `layer`: buggy_format_up ablated, correct_format_up steered, all clamped."""
    cats = named_feature_ids(named_cfg).get(layer)
    if not cats:
        return None
    clamped = _uniq(i for ids in cats.values() for i in ids)
    return FeatureSet("named", "tested", -1, _uniq(cats.get("buggy_format_up", [])),
                      _uniq(cats.get("correct_format_up", [])), clamped)


def config_sets(config: dict, sae_set: str, layer: int) -> list[FeatureSet]:
    """interventions.feature_sets of this SAE set and layer (all three interventions on their features)."""
    primary = config["sae"]["sets"][0]["name"]
    out = []
    for s in config["interventions"]["feature_sets"]:
        if (s["sae_set"] or primary) == sae_set and int(s["layer"]) == layer:
            ids = _uniq(s["features"])
            out.append(FeatureSet(s["name"], "tested", -1, ids, ids, ids))
    return out


def firing_rate_bins(rates: np.ndarray, n_bins: int) -> np.ndarray:
    """[d_sae] bin of each feature: -1 for features that never fire, else quantile bins 0..n_bins-1 of the firing rates."""
    bins = np.full(rates.shape, -1, dtype=np.int64)
    alive = rates > 0
    if alive.any():
        edges = np.quantile(rates[alive], np.linspace(0, 1, n_bins + 1)[1:-1])
        bins[alive] = np.searchsorted(edges, rates[alive], side="right")
    return bins


def random_controls(tested: FeatureSet, rates: np.ndarray, *, n_bins: int, n_samples: int, exclude: set[int],
                    seed: int, layer: int, set_index: int) -> list[FeatureSet]:
    """`n_samples` random sets matched to `tested` feature by feature on the firing-rate bin.

    Each feature of the set is replaced by a feature of the same bin (drawn without replacement,
    never one of `exclude`); where its bin is used up, by the unused feature of the closest firing rate.
    """
    bins = firing_rate_bins(rates, n_bins)
    features = tested.clamped or _uniq([*tested.buggy_up, *tested.correct_up])
    out = []
    for sample in range(n_samples):
        rng = np.random.default_rng(derived_seed(seed, _RANDOM_STREAM, layer, set_index, sample))
        used = set(exclude)
        mapping = {}
        for f in features:
            pool = np.array([i for i in np.nonzero(bins == bins[f])[0] if int(i) not in used])
            if pool.size:
                g = int(rng.choice(pool))
            else:
                free = np.array([i for i in range(rates.size) if i not in used])
                g = int(free[np.argmin(np.abs(rates[free] - rates[f]))])
            mapping[f] = g
            used.add(g)
        m = lambda ids: tuple(mapping[i] for i in ids)  # noqa: E731
        out.append(FeatureSet(tested.name, "random_control", sample, m(tested.buggy_up), m(tested.correct_up),
                              m(tested.clamped)))
    return out


def conditions_for(sets: Sequence[FeatureSet], scales: Sequence[float]) -> list[Condition]:
    """The identity, then every set's ablate, clamp and steer (per scale) where the set has features in that role."""
    out = [Condition(None, "none")]
    for fs in sets:
        if fs.buggy_up:
            out.append(Condition(fs, "ablate"))
        if fs.clamped:
            out.append(Condition(fs, "clamp"))
        if fs.correct_up:
            out += [Condition(fs, "steer", float(s)) for s in scales]
    return out


# --- the engine -----------------------------------------------------------------------------------



@dataclass
class Captured:
    """Site activations at the intervened positions: per prompt a [n_positions, d_model] tensor per layer."""

    values: dict[int, list[torch.Tensor]]
    baseline: dict[int, float]  # prompt_id -> unpatched logit difference


class FeatureIntervener:
    """Runs feature interventions on prompt pairs with `bugscope.model.forward.LayerRunner`."""

    def __init__(self, model, *, pad_token_id: int, site: str, max_prompts: int = 128,
                 rows_per_forward: int = 1024):
        self.model = model
        self.runner = LayerRunner(model)
        self.site = site
        self.pad_token_id = pad_token_id
        self.max_prompts = max(1, max_prompts)
        self.rows_per_forward = max(1, rows_per_forward)
        self.device, self.dtype = self.runner.device, self.runner.dtype

    @torch.inference_mode()
    def capture(self, rows: Sequence[dict], positions: Sequence[Sequence[int]], layers: Sequence[int]) -> Captured:
        """The site's output at `positions` (one list per row, unpadded) at `layers`, and each row's unpatched logit difference."""
        hooks = {hook_name(layer, self.site): layer for layer in layers}
        values = {layer: [] for layer in layers}
        baseline = {}
        for start in range(0, len(rows), self.max_prompts):
            chunk = list(rows[start:start + self.max_prompts])
            batch = make_batch(chunk, self.pad_token_id, self.device)
            got = {}
            with capture_sites(self.model, list(hooks), lambda h, t: got.__setitem__(hooks[h], t)):
                run = self.runner.record(batch, [])
            baseline.update(zip(batch.prompt_ids.tolist(), run.baseline.double().tolist()))
            for i, pos in enumerate(positions[start:start + self.max_prompts]):
                cols = [int(batch.pad[i]) + p for p in pos]
                for layer in layers:
                    values[layer].append(got[layer][i, cols].detach().float().cpu())
        return Captured(values, baseline)

    @torch.inference_mode()
    def deltas(self, sae, target_x: Sequence[torch.Tensor], source_x: Sequence[torch.Tensor],
               conditions: Sequence[Condition]) -> tuple[list[torch.Tensor], np.ndarray]:
        """Per condition, [n_targets, n_positions, d_model] decode(f') - decode(f) (float32, CPU, zero-padded
        to the longest position list), and the firing rate of every feature over targets and sources."""
        sdev = next(sae.parameters()).device
        sdtype = sae.W_dec.dtype
        n = [x.shape[0] for x in target_x]
        xt = torch.cat(list(target_x)).to(sdev, sdtype)
        xs = torch.cat(list(source_x)).to(sdev, sdtype)
        fs = sae.encode(xs)
        ft = sae.encode(xt)
        rates = torch.cat([ft, fs]).gt(0).float().mean(0).cpu().numpy()
        means = fs.float().mean(0).to(sdtype)
        # An SAE whose decoder is affine (no output normalisation) needs only the changed columns:
        # decode(f') - decode(f) = (f' - f)[:, ids] @ W_dec[ids]; otherwise both are decoded whole.
        affine = getattr(sae.cfg, "normalize_activations", "none") == "none" and not getattr(
            sae.cfg.metadata, "hook_head_index", None) and "_z" not in str(getattr(sae.cfg.metadata, "hook_name", ""))
        # SAE-Lens's normalising SAEs keep the statistics of the last encode for one decode (and
        # then drop them): the targets are encoded again before each decode.
        base = None if affine else sae.decode(sae.encode(xt))
        width, d = max(n), xt.shape[-1]
        starts = np.concatenate([[0], np.cumsum(n)])
        out = []
        for c in conditions:
            delta = torch.zeros(len(n), width, d)
            ids = torch.tensor(c.features, dtype=torch.long, device=sdev)
            if c.intervention != "none" and len(ids):
                old = ft[:, ids]
                if c.intervention == "ablate":
                    new = torch.zeros_like(old)
                elif c.intervention == "clamp":
                    new = fs[:, ids]
                else:
                    new = old + float(c.scale) * means[ids]
                if affine:
                    w = sae.W_dec[ids]
                    change = new - old
                    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):  # as SAE-Lens's act_times_W_dec
                        change = change / w.norm(dim=-1)
                    flat = (change @ w).float().cpu()
                else:
                    f = sae.encode(xt)
                    f[:, ids] = new
                    flat = (sae.decode(f) - base).float().cpu()
                for i in range(len(n)):
                    delta[i, :n[i]] = flat[starts[i]:starts[i + 1]]
            out.append(delta)
        return out, rates

    @torch.inference_mode()
    def run(self, pairs: Sequence[PatchPair], layer_deltas: Mapping[int, Sequence[torch.Tensor]]
            ) -> dict[int, np.ndarray]:
        """layer -> [n_conditions, n_targets] decision logit differences, every condition of a layer
        batched as replicas of a target batch in forwards that start at the layer and the first intervened column."""
        out = {layer: np.zeros((len(d), len(pairs))) for layer, d in layer_deltas.items()}
        for start in range(0, len(pairs), self.max_prompts):
            part = pairs[start:start + self.max_prompts]
            b = len(part)
            batch = make_batch([p.target for p in part], self.pad_token_id, self.device)
            run = self.runner.record(batch, sorted(layer_deltas))
            n_ctx = batch.input_ids.shape[1]
            mask = torch.zeros(b, n_ctx, dtype=torch.bool)
            cols = []
            for i, p in enumerate(part):
                c = [int(batch.pad[i]) + t for t in p.target_positions]
                mask[i, c] = True
                cols.append(c)
            first = int(mask.any(0).nonzero().min())
            per_forward = max(1, self.rows_per_forward // b)
            for layer, deltas in layer_deltas.items():
                for c0 in range(0, len(deltas), per_forward):
                    block = deltas[c0:c0 + per_forward]
                    r = len(block)
                    placed = torch.zeros(r, b, n_ctx - first, deltas[0].shape[-1])
                    for j, delta in enumerate(block):
                        for i in range(b):
                            placed[j, i, [c - first for c in cols[i]]] = delta[start + i, :len(cols[i])]
                    placed = placed.reshape(r * b, n_ctx - first, -1).to(self.device, self.dtype)
                    where = mask[:, first:].repeat(r, 1).to(self.device)[..., None]

                    def write(x, placed=placed, where=where):
                        return torch.where(where, x + placed, x)

                    ld = self.runner.run_site_written(run, layer, self.site, write, start=first, replicas=r)
                    out[layer][c0:c0 + r, start:start + b] = ld.double().numpy().reshape(r, b)
            del run
        return out


# --- the study ------------------------------------------------------------------------------------


def study_pairs(prompts: pl.DataFrame, config: dict) -> list[PatchPair]:
    """Buggy-format targets (every pair kind) with their same-question correct-format sources."""
    pc = config["prompts"]
    return make_pairs(prompts, pc["buggy_format"], pc["correct_format"], config["interventions"]["positions"])


def run_interventions(intervener: FeatureIntervener, prompts: pl.DataFrame, config: dict, *, sae_set: str,
                      saes: Mapping[int, object], discriminative: pl.DataFrame | None, named_cfg: Mapping,
                      log=None) -> tuple[pl.DataFrame, dict]:
    """The per-prompt table of every condition at every layer of `saes` (layer -> SAE), and metadata."""
    icfg = config["interventions"]
    pairs = study_pairs(prompts, config)
    layers = sorted(saes)
    tgt = intervener.capture([p.target for p in pairs], [p.target_positions for p in pairs], layers)
    src = intervener.capture([p.source for p in pairs], [p.source_positions for p in pairs], layers)
    layer_deltas, layer_conditions, meta = {}, {}, {"sets": {}}
    for layer in layers:
        sets = [s for s in (top_set(discriminative, layer, icfg["top_n"]) if discriminative is not None else None,
                            named_set(named_cfg, layer)) if s is not None]
        sets += config_sets(config, sae_set, layer)
        sae = saes[layer]
        d_sae = int(sae.cfg.d_sae)
        for s in sets:
            bad = [i for i in s.clamped if not 0 <= i < d_sae]
            if bad:
                raise InterventionConfigError(f"layer {layer}: feature set {s.name!r} names features {bad}, outside "
                                              f"the SAE's 0..{d_sae - 1}.")
        # firing rates come from the identity's encode; one pass with the tested sets gives them
        _, rates = intervener.deltas(sae, tgt.values[layer], src.values[layer], [Condition(None, "none")])
        exclude = {i for s in sets for i in s.clamped}
        controls = [c for k, s in enumerate(sets) for c in random_controls(
            s, rates, n_bins=icfg["firing_rate_bins"], n_samples=icfg["n_random_controls"], exclude=exclude,
            seed=config["seed"], layer=layer, set_index=k)]
        conds = conditions_for([*sets, *controls], icfg["scales"])
        layer_deltas[layer], _ = intervener.deltas(sae, tgt.values[layer], src.values[layer], conds)
        layer_conditions[layer] = conds
        meta["sets"][str(layer)] = {s.name: {"buggy_up": list(s.buggy_up), "correct_up": list(s.correct_up),
                                             "clamped": list(s.clamped)} for s in sets}
        if log:
            log.info("layer %d: %d feature sets, %d random controls, %d conditions", layer, len(sets), len(controls),
                     len(conds))
    lds = intervener.run(pairs, layer_deltas)
    link = pl.DataFrame({
        "prompt_id": [p.target["prompt_id"] for p in pairs],
        "source_prompt_id": [p.source["prompt_id"] for p in pairs],
        "baseline_logit_diff": [tgt.baseline[p.target["prompt_id"]] for p in pairs],
        "source_logit_diff": [src.baseline[p.source["prompt_id"]] for p in pairs],
    }, schema={"prompt_id": pl.Int32, "source_prompt_id": pl.Int32, "baseline_logit_diff": pl.Float64,
               "source_logit_diff": pl.Float64})
    parts = []
    for layer in layers:
        conds = pl.DataFrame([c.row(sae_set, layer) for c in layer_conditions[layer]],
                             schema={"sae_set": pl.String, "layer": pl.Int32, "feature_set": pl.String,
                                     "family": pl.String, "sample": pl.Int32, "intervention": pl.String,
                                     "scale": pl.Float64, "n_features": pl.Int32, "feature_ids": pl.List(pl.Int32)})
        n_c, n_t = lds[layer].shape
        cells = pl.DataFrame({"_c": np.repeat(np.arange(n_c, dtype=np.uint32), n_t),
                              "prompt_id": np.tile(link["prompt_id"].to_numpy(), n_c),
                              "logit_diff": lds[layer].reshape(-1)})
        parts.append(conds.drop("feature_ids").with_row_index("_c").join(cells, on="_c").drop("_c"))
    meta_cols = prompts.select(pl.col("prompt_id").cast(pl.Int32), "question_id", "pair_id", "pair_kind", "order")
    out = (pl.concat(parts).join(link, on="prompt_id").join(meta_cols, on="prompt_id")
           .with_columns((pl.col("logit_diff") > 0).alias("is_correct"),
                         (pl.col("baseline_logit_diff") > 0).alias("baseline_correct")))
    meta["conditions"] = {str(layer): len(c) for layer, c in layer_conditions.items()}
    meta["feature_ids"] = {str(layer): [c.row(sae_set, layer)["feature_ids"] for c in layer_conditions[layer]]
                           for layer in layers}
    return out.select(PROMPT_COLUMNS).sort("layer", "feature_set", "family", "sample", "intervention", "scale",
                                           "prompt_id", nulls_last=False), meta


def _condition_key() -> pl.Expr:
    return pl.concat_str([pl.col(c).cast(pl.String).fill_null("-") for c in CONDITION_COLUMNS[:-2]], separator="|")


def _splits(targets: pl.DataFrame):
    """(pairs, pair_kind, order, row mask): every kind and order (and pooled), the control kinds pooled,
    on all pairs and on the held-out (odd) pairs."""
    kind = targets["pair_kind"].cast(pl.String).to_numpy()
    order = targets["order"].cast(pl.String).to_numpy()
    odd = ~is_selection_pair(targets["pair_id"].to_numpy())
    for subset, rows in (("all", np.ones(len(kind), dtype=bool)), ("heldout", odd)):
        for k in [ALL, *sorted(set(kind)), CONTROLS]:
            in_kind = (kind == k) | (k == ALL) | ((k == CONTROLS) & (kind != BUG_PAIR_KIND))
            for o in [ALL, *sorted(set(order))]:
                mask = rows & in_kind & ((order == o) | (o == ALL))
                if mask.any():
                    yield subset, k, o, mask


def summarise(per_prompt: pl.DataFrame, *, n_resamples: int, confidence: float, seed: int) -> pl.DataFrame:
    """One row per (condition, pairs, pair_kind, order): the rates of bugscope.patching.summary with
    cluster-bootstrap CIs over number pairs (the same draws for every condition of a split)."""
    df = per_prompt.with_columns(_condition_key().alias("_condition"))
    groups, targets, ld = per_prompt_matrices(df, ["_condition"])
    info = df.select("_condition", *CONDITION_COLUMNS[:-1]).unique("_condition")
    groups = groups.join(info, on="_condition", how="left", maintain_order="left")
    right = (ld > 0).astype(float)
    base, src = targets["baseline_logit_diff"].to_numpy(), targets["source_logit_diff"].to_numpy()
    pairs = targets["pair_id"].to_numpy()
    boot = {"n_resamples": n_resamples, "confidence": confidence, "seed": seed}
    parts = []
    for subset, kind, order, mask in _splits(targets):
        cols = rate_columns(ld[mask], right[mask], base[mask], src[mask], pairs[mask], boot)
        parts.append(groups.with_columns(pl.lit(subset).alias("pairs"), pl.lit(kind).alias("pair_kind"),
                                         pl.lit(order).alias("order"),
                                         **{k: pl.Series(k, v) for k, v in cols.items()},
                                         confidence=pl.lit(confidence)))
    out = pl.concat(parts).drop("_condition")
    first = [*CONDITION_COLUMNS[:-1], "pairs", "pair_kind", "order"]
    return out.select(*first, *[c for c in out.columns if c not in first]).sort(
        "layer", "feature_set", "family", "sample", "intervention", "scale", "pairs", "pair_kind", "order",
        nulls_last=False)


def bug_kind_rows(summary: pl.DataFrame, pairs: str = "all") -> pl.DataFrame:
    """The rows the figure reads: the bug's pair kind, both orders pooled, on `pairs`."""
    return summary.filter(pl.col("pair_kind") == BUG_PAIR_KIND, pl.col("order") == ALL, pl.col("pairs") == pairs)
