"""Direct attribution of attention heads to SAE features, and the head-parity permutation test.

At the decision position of a layer, the SAE pre-activation of a feature is split into the direct
contribution of every head (W_O[h] z_h through the SAE's frozen input map) and the non-head terms;
zero and mean ablations of each head check it. The decision-position tensors come from
bugscope.model.capture, each head's write and the MLP re-run from bugscope.model.layer_parts.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import polars as pl
import torch

from bugscope.model.capture import LayerCapture, recorded_output
from bugscope.model.layer_parts import head_outputs, head_write_bias, resid_post_from_mid
from bugscope.model.sites import HEAD_WRITTEN_SITES
from bugscope.stats import derived_seed

# --- parity permutation test --------------------------------------------------------------------


@dataclass
class ParityResult:
    eta_squared: float  # share of the feature-centred variance of the [head, feature] matrix explained by parity
    p_value: float
    r: np.ndarray  # [features] point-biserial correlation of (head is odd) with the attribution
    r_p_value: np.ndarray  # [features] two-sided permutation p of |r|
    # [features] the same p against the largest |r| over all features of each labeling (max-statistic,
    # single-step Westfall-Young): valid for the most extreme of many features, which a claim selects.
    r_familywise_p_value: np.ndarray
    n_permutations: int
    exact: bool


def _labelings(n_heads: int, n_odd: int, n_permutations: int, seed: int) -> tuple[np.ndarray, bool]:
    """[P, n_heads] 0/1 labelings with n_odd ones: all of them when there are at most
    n_permutations (exact test), else the observed one plus n_permutations random ones."""
    observed = (np.arange(n_heads) % 2).astype(np.float64)
    if math.comb(n_heads, n_odd) <= n_permutations:
        combos = np.array(list(itertools.combinations(range(n_heads), n_odd)), dtype=np.int64)
        lab = np.zeros((len(combos), n_heads))
        np.put_along_axis(lab, combos, 1.0, axis=1)
        return lab, True
    rng = np.random.default_rng(seed)
    perms = rng.permuted(np.tile(observed, (n_permutations, 1)), axis=1)
    return np.vstack([observed[None], perms]), False


def parity_test(matrix: np.ndarray, *, n_permutations: int, seed: int) -> ParityResult:
    """Does head-index parity explain the [head, feature] attribution matrix? Permutation test.

    Statistic: eta^2 = between-parity sum of squares / total sum of squares, after centring every
    feature (column) over heads. Relabelling the heads (keeping 5 odd of 9, 16 of 32, ...) gives
    its null distribution; with at most `n_permutations` distinct labelings all are enumerated
    (exact p), otherwise p = (1 + #{T_perm >= T_obs}) / (1 + n_permutations).

    Per feature, the point-biserial r gets the same permutation p of |r|, and a familywise one: the
    share of labelings whose largest |r| over all features reaches the feature's |r| (so the p of a
    feature chosen as the most correlated of F is corrected for that choice).
    """
    m = np.asarray(matrix, dtype=np.float64)
    n_heads = m.shape[0]
    observed = (np.arange(n_heads) % 2).astype(np.float64)
    n_odd = int(observed.sum())
    centred = m - m.mean(axis=0, keepdims=True)
    total = float((centred ** 2).sum())
    labels, exact = _labelings(n_heads, n_odd, n_permutations, seed)
    sums = labels @ centred  # [P, F]: sum over the "odd" heads of each labeling
    scale = 1.0 / n_odd + 1.0 / (n_heads - n_odd)
    ss_between = (sums ** 2).sum(axis=1) * scale  # [P]
    obs_sums = observed @ centred
    obs_ss = float((obs_sums ** 2).sum() * scale)
    tol = 1e-12 * max(total, 1e-300)
    if exact:
        p = float(np.mean(ss_between >= obs_ss - tol))
    else:
        p = float((1 + np.sum(ss_between[1:] >= obs_ss - tol)) / (1 + n_permutations))
    col_ss = np.sqrt((centred ** 2).sum(axis=0))  # [F]
    lab_c = labels - labels.mean(axis=1, keepdims=True)
    lab_norm = np.sqrt((lab_c ** 2).sum(axis=1, keepdims=True))
    with np.errstate(all="ignore"):
        r_all = (lab_c @ centred) / (lab_norm * col_ss[None])  # [P, F]
        obs_c = observed - observed.mean()
        r_obs = (obs_c @ centred) / (np.sqrt((obs_c ** 2).sum()) * col_ss)
    abs_all, abs_obs = np.abs(np.nan_to_num(r_all)), np.abs(np.nan_to_num(r_obs))
    hits = abs_all >= abs_obs[None] - 1e-12
    max_hits = abs_all.max(axis=1, initial=0.0)[:, None] >= abs_obs[None] - 1e-12  # [P, F]
    if exact:
        r_p, r_fw = hits.mean(axis=0), max_hits.mean(axis=0)
    else:
        r_p = (1 + hits[1:].sum(axis=0)) / (1 + n_permutations)
        r_fw = (1 + max_hits[1:].sum(axis=0)) / (1 + n_permutations)
    r_p = np.where(col_ss > 0, r_p, np.nan)
    r_fw = np.where(col_ss > 0, r_fw, np.nan)
    return ParityResult(eta_squared=obs_ss / total if total > 0 else float("nan"), p_value=p if total > 0 else float("nan"),
                        r=r_obs, r_p_value=r_p, r_familywise_p_value=r_fw,
                        n_permutations=len(labels) if exact else n_permutations, exact=exact)


# --- head -> feature attribution ----------------------------------------------------------------


NORMALISATIONS = ("none", "expected_average_only_in", "covariance_whitening", "constant_norm_rescale", "layer_norm")


@dataclass
class EncoderView:
    """The SAE's pre-activation of selected features as an affine map of its input x ([n, d_in]):

        pre_f(x) = r_f * (s(x) * (P x) . W_enc[:, f] + b_enc[f] - a * b_dec . W_enc[:, f])

    with P = centring over d_in for a layer_norm SAE (else identity), s(x) the SAE's run-time
    input scale evaluated on the full x (sqrt(d_in)/|x| for constant_norm_rescale,
    1/(std(P x) + eps) for layer_norm, 1 otherwise: a dataset-level factor is already folded into
    W_enc by SAE-Lens), a = apply_b_dec_to_input and r_f = |W_dec[f]| when the SAE rescales by
    the decoder norm (else 1). With s(x) frozen, pre_f is linear in the summands of x.
    """

    w: torch.Tensor  # [d_in, F]: W_enc[:, f] * r_f
    const: torch.Tensor  # [F]
    normalisation: str
    eps: float = 1e-5

    def centre(self, c: torch.Tensor) -> torch.Tensor:
        return c - c.mean(dim=-1, keepdim=True) if self.normalisation == "layer_norm" else c

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """[n] the frozen input scale s(x)."""
        if self.normalisation == "constant_norm_rescale":
            return x.shape[-1] ** 0.5 / x.norm(dim=-1)
        if self.normalisation == "layer_norm":
            return 1.0 / (self.centre(x).std(dim=-1) + self.eps)
        return torch.ones(x.shape[:-1], dtype=x.dtype, device=x.device)

    def contribution(self, component: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """[..., n, F] the part of pre_f carried by `component` ([..., n, d_in]) at frozen scale s ([n])."""
        return s[:, None] * (self.centre(component) @ self.w)


def encoder_view(sae, feature_ids: Sequence[int], dtype=torch.float64) -> EncoderView:
    """EncoderView of an SAE-Lens SAE for `feature_ids`; raises for architectures it cannot express."""
    cfg = sae.cfg
    norm = getattr(cfg, "normalize_activations", "none")
    if norm not in NORMALISATIONS:
        raise ValueError(f"SAE normalisation {norm!r} is not supported by the head attribution (expected one of {NORMALISATIONS}).")
    if getattr(cfg, "reshape_activations", "none") != "none":
        raise ValueError("The head attribution needs an SAE over the residual stream (reshape_activations 'none').")
    if not hasattr(sae, "b_enc") or not hasattr(sae, "W_enc"):
        raise ValueError(f"SAE architecture {cfg.architecture()!r} has no single encoder bias; the head attribution "
                         "supports standard, topk and jumprelu SAEs.")
    ids = torch.as_tensor(list(feature_ids), dtype=torch.long, device=sae.W_enc.device)
    if len(ids) and int(ids.max()) >= cfg.d_sae:
        raise ValueError(f"feature id {int(ids.max())} is out of range for an SAE with d_sae={cfg.d_sae}: fix the SAE set's named features (sae.sets[].named).")
    w_enc = sae.W_enc.detach()[:, ids].to(dtype)
    r = (sae.W_dec.detach()[ids].to(dtype).norm(dim=-1) if getattr(cfg, "rescale_acts_by_decoder_norm", False)
         else torch.ones(len(ids), dtype=dtype, device=w_enc.device))
    a = 1.0 if cfg.apply_b_dec_to_input else 0.0
    const = r * (sae.b_enc.detach()[ids].to(dtype) - a * (sae.b_dec.detach().to(dtype) @ w_enc))
    return EncoderView(w=w_enc * r, const=const, normalisation=norm)


@torch.inference_mode()
def sae_pre_and_acts(sae, x: torch.Tensor, feature_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([n, F] pre-activation as SAE-Lens computes it (hook_sae_acts_pre), [n, F] activation)."""
    with recorded_output(sae.hook_sae_acts_pre) as seen:
        acts = sae.encode(x.to(sae.W_enc.dtype))
    pre = seen["output"]
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        pre = pre * sae.W_dec.norm(dim=-1)
    return pre[:, feature_ids], acts[:, feature_ids]


COMPONENTS = ("resid_pre", "mlp_out", "attn_bias", "sae_bias")


def attribute_layer(model, layer: int, sae, cap: LayerCapture, feature_ids: Sequence[int], *,
                    n_heads: int, site: str = "resid_post") -> dict[str, torch.Tensor | float]:
    """Direct attributions of every head to `feature_ids` at one layer, per prompt, and the ablation check.

    Returns float64 CPU tensors: 'pre' and 'act' [n, F] (the SAE's own pre-activation and
    activation at resid_post), 'heads' [H, n, F] (direct attributions W_enc[:, f] . (W_O[h] z_h)
    through the frozen SAE input map), the non-head terms 'resid_pre', 'mlp_out', 'attn_bias',
    'sae_bias' [n, F], the ablation changes 'zero_pre', 'zero_act', 'mean_pre', 'mean_act'
    [H, n, F] (head h's output at the decision position replaced by 0 or by its mean over all
    prompts; layer L's MLP recomputed; SAE re-encoded), and two identity residuals (floats):
    'identity_error' = max |sum of all terms - pre| and 'attn_identity_error' = max |sum over heads
    + attn_bias - contribution of the captured attention output|.
    """
    cap = LayerCapture(**{k: v.to(torch.float64) for k, v in vars(cap).items()})
    view = encoder_view(sae, feature_ids)
    view.w, view.const = view.w.cpu(), view.const.cpu()
    ids = torch.as_tensor(list(feature_ids), dtype=torch.long, device=sae.W_enc.device)
    sae_device = sae.W_enc.device

    def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre, act = sae_pre_and_acts(sae, x.to(sae_device), ids)
        return pre.to("cpu", torch.float64), act.to("cpu", torch.float64)

    if site not in HEAD_WRITTEN_SITES:
        raise ValueError(f"The head attribution needs SAEs on {' or '.join(HEAD_WRITTEN_SITES)}, not {site!r}: heads "
                         "have no direct path into mlp_out.")
    # attn_out SAEs read sum_h W_O[h] z_h + b_O only: the resid_pre and mlp_out terms are then 0.
    on_resid = site == "resid_post"
    x = cap.resid_post if on_resid else cap.attn_out
    n = x.shape[0]
    s = view.scale(x)  # [n]
    heads = head_outputs(model, layer, cap.z, n_heads)  # [H, n, d]
    bias = head_write_bias(model, layer, x.shape[1]).expand(n, -1)
    out = {
        "heads": view.contribution(heads, s),
        "resid_pre": view.contribution(cap.resid_pre if on_resid else torch.zeros_like(x), s),
        "mlp_out": view.contribution(cap.mlp_out if on_resid else torch.zeros_like(x), s),
        "attn_bias": view.contribution(bias, s),
        "sae_bias": view.const.expand(n, -1).clone(),
    }
    out["pre"], out["act"] = encode(x)
    total = out["heads"].sum(0) + out["resid_pre"] + out["mlp_out"] + out["attn_bias"] + out["sae_bias"]
    out["identity_error"] = float((total - out["pre"]).abs().max()) if n else 0.0
    attn = view.contribution(cap.attn_out, s)
    out["attn_identity_error"] = float((out["heads"].sum(0) + out["attn_bias"] - attn).abs().max()) if n else 0.0

    # Ablation: only the decision position of layer L changes, and it is the last position, so
    # resid_post' = resid_mid' + MLP(resid_mid') is exact without another forward pass.
    def read(attn_out: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
        """SAE pre-activation and activation at the decision position for attention outputs [..., n, d]."""
        flat = attn_out.reshape(-1, attn_out.shape[-1])
        pres, acts = [], []
        resid_pre = cap.resid_pre.expand(*attn_out.shape[:-2], -1, -1).reshape(-1, attn_out.shape[-1])
        for start in range(0, flat.shape[0], chunk):
            a = flat[start:start + chunk]
            pre, act = encode(resid_post_from_mid(model, layer, resid_pre[start:start + chunk] + a) if on_resid else a)
            pres.append(pre)
            acts.append(act)
        shape = (*attn_out.shape[:-1], len(feature_ids))
        return torch.cat(pres).reshape(shape), torch.cat(acts).reshape(shape)

    base_pre, base_act = read(cap.attn_out)
    mean_heads = head_outputs(model, layer, cap.z.mean(0, keepdim=True), n_heads)  # [H, 1, d]
    for mode in ("zero", "mean"):
        replaced = torch.zeros_like(heads) if mode == "zero" else mean_heads.expand(-1, n, -1)
        pre, act = read(cap.attn_out[None] - heads + replaced)  # [H, n, F]
        out[f"{mode}_pre"], out[f"{mode}_act"] = pre - base_pre, act - base_act
    return out


ATTRIBUTION_COLUMNS = ["layer", "feature_id", "feature_source", "format", "component", "head", "n_prompts",
                       "direct_attribution", "zero_ablation_delta_pre", "zero_ablation_delta_act",
                       "mean_ablation_delta_pre", "mean_ablation_delta_act", "pre_activation", "activation"]


def summarise_attribution(res: dict, *, layer: int, feature_ids: Sequence[int], sources: Sequence[str],
                          formats: np.ndarray) -> pl.DataFrame:
    """Means per format of one layer's attribution: one row per (format, component/head, feature)."""
    frames = []
    n_feat = len(feature_ids)
    n_heads = res["heads"].shape[0]
    for fmt in sorted(set(formats.tolist())):
        mask = torch.as_tensor(formats == fmt)
        m = {k: v[..., mask, :].mean(dim=-2).numpy() for k, v in res.items() if isinstance(v, torch.Tensor)}
        comp = ["head"] * n_heads + list(COMPONENTS)
        head = list(range(n_heads)) + [None] * len(COMPONENTS)
        direct = np.concatenate([m["heads"], *[m[c][None] for c in COMPONENTS]])  # [H + 4, F]
        nan = np.full((len(COMPONENTS), n_feat), np.nan)
        frames.append(pl.DataFrame({
            "layer": np.full(direct.size, layer, dtype=np.int32),
            "feature_id": np.tile(np.asarray(feature_ids, dtype=np.int32), len(comp)),
            "feature_source": np.tile(np.asarray(sources, dtype=object), len(comp)).tolist(),
            "format": [fmt] * direct.size,
            "component": np.repeat(np.asarray(comp, dtype=object), n_feat).tolist(),
            "head": pl.Series(np.repeat(np.asarray(head, dtype=object), n_feat).tolist(), dtype=pl.Int32),
            "n_prompts": np.full(direct.size, int(mask.sum()), dtype=np.int32),
            "direct_attribution": direct.reshape(-1),
            **{f"{mode}_ablation_delta_{what}": np.concatenate([m[f"{mode}_{what}"], nan]).reshape(-1)
               for mode in ("zero", "mean") for what in ("pre", "act")},
            "pre_activation": np.tile(m["pre"], (len(comp), 1)).reshape(-1),
            "activation": np.tile(m["act"], (len(comp), 1)).reshape(-1),
        }))
    return pl.concat(frames).with_columns(pl.col(c).fill_nan(None) for c in ATTRIBUTION_COLUMNS[8:12]).select(ATTRIBUTION_COLUMNS)


PARITY_COLUMNS = ["layer", "target", "feature_id", "statistic", "value", "p_value", "familywise_p_value",
                  "n_permutations", "exact", "n_heads"]


def parity_rows(attribution: pl.DataFrame, *, layer: int, buggy_format: str, correct_format: str,
                n_permutations: int, seed: int) -> pl.DataFrame:
    """Parity tests of one layer's head x feature matrix of mean direct attributions.

    Targets: the buggy-format means, the correct-format means and their difference (buggy -
    correct). One row per target for eta^2 (all features), one per target and feature for the
    point-biserial r of "head index is odd". `familywise_p_value`: on an r row, the max-statistic
    permutation p over the features of the layer and target (`parity_test`); on an eta^2 row, its
    p_value (one statistic over all features: no family to correct for).
    """
    heads = attribution.filter(pl.col("component") == "head", pl.col("layer") == layer)
    wide = heads.pivot(on="format", index=["head", "feature_id"], values="direct_attribution").sort("feature_id", "head")
    feature_ids = wide["feature_id"].unique(maintain_order=True).to_numpy()
    n_heads = wide["head"].n_unique()
    mats = {"buggy": wide[buggy_format].to_numpy().reshape(len(feature_ids), n_heads).T,
            "correct": wide[correct_format].to_numpy().reshape(len(feature_ids), n_heads).T}
    mats["difference"] = mats["buggy"] - mats["correct"]
    rows = []
    for t, (target, mat) in enumerate(mats.items()):
        res = parity_test(mat, n_permutations=n_permutations, seed=derived_seed(seed, layer, t))
        common = {"layer": layer, "target": target, "n_permutations": res.n_permutations, "exact": res.exact,
                  "n_heads": n_heads}
        rows.append({**common, "feature_id": None, "statistic": "eta_squared", "value": res.eta_squared,
                     "p_value": res.p_value, "familywise_p_value": res.p_value})
        rows += [{**common, "feature_id": int(f), "statistic": "point_biserial_r", "value": float(r), "p_value": float(p),
                  "familywise_p_value": float(fw)}
                 for f, r, p, fw in zip(feature_ids, res.r, res.r_p_value, res.r_familywise_p_value)]
    return pl.DataFrame(rows, schema_overrides={"feature_id": pl.Int32, "layer": pl.Int32, "n_heads": pl.Int32,
                                                "n_permutations": pl.Int64}).with_columns(
        pl.col("value", "p_value", "familywise_p_value").fill_nan(None)).select(PARITY_COLUMNS)


def attribution_features(discriminative: pl.DataFrame, named: dict[int, dict[str, list[int]]], layer: int,
                         n_features: int) -> tuple[list[int], list[str]]:
    """Feature ids of one layer for the attribution: the top buggy-vs-correct features per direction
    (`n_features` each) then the named features; `sources` says where each came from."""
    top = (discriminative.filter(pl.col("layer") == layer, pl.col("comparison") == "buggy_vs_correct",
                                 pl.col("rank") < n_features)
           .sort("direction", "rank", descending=[True, False]))
    ids, sources = [], []
    for fid, direction in zip(top["feature_id"].to_list(), top["direction"].to_list()):
        if fid not in ids:
            ids.append(fid)
            sources.append(f"discriminative_{direction}")
    for cat, cat_ids in named.get(layer, {}).items():
        for fid in cat_ids:
            if fid in ids:
                sources[ids.index(fid)] += f";named:{cat}"
            else:
                ids.append(fid)
                sources.append(f"named:{cat}")
    return ids, sources
