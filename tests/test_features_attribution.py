"""Head -> feature attribution: the calibration of the parity permutation test and the attribution
identity on the real model."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch
from scipy import stats as sps

from bugscope.features.attribution import attribute_layer, parity_test, summarise_attribution
from bugscope.model.capture import capture_decision
from tests.numerics import max_abs, rounding_tolerance


def test_parity_detects_planted_parity():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(9, 12))
    m[1::2] += 3.0
    res = parity_test(m, n_permutations=10_000, seed=0)
    assert res.exact and res.n_permutations == math.comb(9, 4)
    assert res.p_value == pytest.approx(1 / math.comb(9, 4)) and res.eta_squared > 0.5
    assert (res.r > 0.5).all()


@pytest.mark.parametrize("n_heads,n_permutations", [(9, 10_000), (32, 199)])
def test_parity_p_uniform_under_shuffled_labels(n_heads, n_permutations):
    """Head labels shuffled at random: the p-value must be uniform (here: KS test and P(p <= a) <= a)."""
    rng = np.random.default_rng(123)
    ps, rps = [], []
    for seed in range(400):
        m = rng.normal(size=(n_heads, 8)) + rng.normal(size=(1, 8)) * 3  # feature effects, no head effect
        m[1::2] += 2.0  # a real parity effect ...
        m = m[rng.permutation(n_heads)]  # ... destroyed by shuffling the head labels
        res = parity_test(m, n_permutations=n_permutations, seed=seed)
        ps.append(res.p_value)
        rps.append(res.r_p_value[0])
    ps, rps = np.array(ps), np.array(rps)
    assert sps.kstest(ps, "uniform").pvalue > 0.01
    assert sps.kstest(rps, "uniform").pvalue > 0.01
    for a in (0.05, 0.1, 0.25, 0.5):
        assert np.mean(ps <= a) <= a + 3 * math.sqrt(a * (1 - a) / len(ps))


def test_parity_familywise_p_corrects_the_choice_of_the_most_correlated_feature():
    """No head effect, 40 features: the most correlated feature's own p is <= 0.05 in most draws
    (it was chosen for it), its familywise (max-statistic) p in about 5 % of them at most."""
    rng = np.random.default_rng(7)
    own, familywise = [], []
    for seed in range(200):
        res = parity_test(rng.normal(size=(32, 40)), n_permutations=199, seed=seed)
        best = int(np.argmax(np.abs(res.r)))
        own.append(res.r_p_value[best])
        familywise.append(res.r_familywise_p_value[best])
        assert (res.r_familywise_p_value >= res.r_p_value).all()
    own, familywise = np.array(own), np.array(familywise)
    assert np.mean(own <= 0.05) > 0.5
    assert np.mean(familywise <= 0.05) <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / len(familywise))
    # a planted parity effect on one feature survives the correction
    m = rng.normal(size=(32, 40))
    m[1::2, 3] += 3.0
    res = parity_test(m, n_permutations=199, seed=0)
    assert res.r_familywise_p_value[3] == pytest.approx(1 / 200)


# --- attribution identity on the real model -----------------------------------------------------


def _make_sae(kind: str, normalisation: str, d_in: int, seed: int = 0):
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, TopKSAE, TopKSAEConfig

    torch.manual_seed(seed)
    if kind == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=384, k=24, normalize_activations=normalisation,
                                    rescale_acts_by_decoder_norm=True))
    else:
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=384, normalize_activations=normalisation))
        with torch.no_grad():
            sae.threshold.fill_(0.05)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.5)
        sae.b_enc.normal_(0, 0.1)
        sae.W_dec.mul_(torch.rand(sae.cfg.d_sae, 1) + 0.5)
        if normalisation == "none":
            sae.W_enc.div_(100.0)
    return sae.eval()


@pytest.fixture(scope="module")
def decision_capture(embedded, ci_config):
    from bugscope.data.prompts import build_prompt_table

    model, tokenizer = embedded
    prompts = pl.from_arrow(build_prompt_table(ci_config, tokenizer)).head(12)
    ids, caps = capture_decision(model, prompts.to_dicts(), layers=[3, 10], batch_size=6,
                                   pad_token_id=tokenizer.pad_token_id)
    return prompts, ids, caps


@pytest.mark.parametrize("kind,normalisation,site", [("topk", "none", "resid_post"),
                                                     ("topk", "constant_norm_rescale", "resid_post"),
                                                     ("jumprelu", "layer_norm", "resid_post"),
                                                     ("topk", "constant_norm_rescale", "attn_out")])
@pytest.mark.numerical
def test_head_attributions_reconstruct_sae_pre_activation(embedded, decision_capture, kind, normalisation, site):
    model, _ = embedded
    prompts, ids, caps = decision_capture
    n_heads = model.config.num_attention_heads
    sae = _make_sae(kind, normalisation, model.config.hidden_size)
    feats = list(range(0, 384, 7))
    for layer in (3, 10):
        cap = caps[layer]
        # the captured pieces are the layer's residual stream: pre + attention + MLP = post
        add_tol = rounding_tolerance(torch.float32, scale=max_abs(cap.resid_post), reduction=3)
        assert (cap.resid_pre + cap.attn_out + cap.mlp_out - cap.resid_post).abs().max() <= add_tol
        res = attribute_layer(model, layer, sae, cap, feats, n_heads=n_heads, site=site)
        assert res["pre"].abs().max().item() > 1e-2
        # The float64 decomposition against the SAE's own float32 encoding of the float32 capture:
        # float32 rounding of the largest term, through o_proj and the encoder.
        terms = max(max_abs(res[k]) for k in ("heads", "resid_pre", "mlp_out", "attn_bias", "sae_bias", "pre"))
        tol = rounding_tolerance(torch.float32, scale=terms, reduction=model.config.hidden_size, depth=2)
        assert res["attn_identity_error"] <= tol, (res["attn_identity_error"], tol)
        assert res["identity_error"] <= tol, (res["identity_error"], tol)
        # every head contributes something distinct
        assert res["heads"].abs().amax(dim=(1, 2)).min() > 0
        # ablation check: zero-ablating head h moves the pre-activation by about minus its direct
        # attribution (exactly so, up to layer L's MLP and the input scale, which it also moves)
        direct = res["heads"].reshape(n_heads, -1)
        delta = res["zero_pre"].reshape(n_heads, -1)
        corr = np.corrcoef(direct.flatten().numpy(), -delta.flatten().numpy())[0, 1]
        assert corr > 0.5, corr
    formats = pl.DataFrame({"prompt_id": ids.astype(np.int32)}).join(
        prompts.select("prompt_id", "format"), on="prompt_id", how="left", maintain_order="left")["format"].to_numpy()
    rows = summarise_attribution(res, layer=10, feature_ids=feats, sources=["x"] * len(feats), formats=formats)
    sums = rows.group_by("format", "feature_id").agg(pl.col("direct_attribution").sum(), pl.col("pre_activation").first())
    assert (sums["direct_attribution"] - sums["pre_activation"]).abs().max() <= tol
