"""The feature-analysis rules inside the real ci.yaml workflow (needs the SAE stage's rules)."""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch

from bugscope import layout
from bugscope.config import analysed_layers, primary_sae_set, sae_sets
from bugscope.io import read_metadata, read_table
from bugscope.sites import hook_name
from tests.conftest import REPO
from tests.numerics import rounding_tolerance

# The tables of every set; the head attribution only where heads write directly (not mlp_out).
TABLES = {
    layout.FEATURE_OVERLAP: "feature_overlap",
    layout.FEATURE_OVERLAP_PAIRS: "feature_overlap_pairs",
    layout.DISCRIMINATIVE_FEATURES: "discriminative_features",
    layout.NAMED_FEATURES: "named_features",
}
ATTRIBUTION_TABLES = {
    layout.HEAD_FEATURE_ATTRIBUTION: "head_feature_attribution",
    layout.HEAD_PARITY: "head_parity",
}


@pytest.fixture(scope="module")
def workdir(request):
    if not (REPO / "workflow" / "rules" / "sae.smk").exists():
        pytest.skip("the SAE stage (workflow/rules/sae.smk) is not in the workflow yet")
    return request.getfixturevalue("ci_workflow")


def test_every_sae_set_has_its_feature_tables(workdir, ci_config):
    """ci.yaml has two sets: main (resid_post, every analysed layer) and mlp (mlp_out, layer 10)."""
    for s in sae_sets(ci_config):
        tables = {**TABLES, **(ATTRIBUTION_TABLES if s["site"] != "mlp_out" else {})}
        for template, kind in tables.items():
            meta = read_metadata(workdir / layout.per_set(template, s["name"]))
            assert meta["kind"] == kind and meta["sae_set"] == s["name"] and meta["config_hash"], (s, template)
        for template in ATTRIBUTION_TABLES if s["site"] == "mlp_out" else {}:
            assert not (workdir / layout.per_set(template, s["name"])).exists()
        overlap = pl.from_arrow(read_table(workdir / layout.per_set(layout.FEATURE_OVERLAP, s["name"]),
                                           kind="feature_overlap")[0])
        assert overlap.filter(pl.col("variant") == "per_pair")["layer"].sort().to_list() == s["layers"]
        for layer in s["layers"]:
            hook = hook_name(layer, s["site"])
            meta = read_metadata(workdir / layout.per_set(layout.FEATURES, s["name"], hook=hook))
            assert meta["hook_name"] == hook and meta["sae"]["hook_name"] == hook


def test_feature_tables_exist_with_provenance(workdir, ci_config):
    layers = analysed_layers(ci_config)
    main = primary_sae_set(ci_config)
    for path, kind in {**TABLES, **ATTRIBUTION_TABLES}.items():
        meta = read_metadata(workdir / layout.per_set(path, main))
        assert meta["kind"] == kind and meta["config_hash"] and meta["model"], path
    overlap, _ = read_table(workdir / layout.per_set(layout.FEATURE_OVERLAP, main), kind="feature_overlap")
    overlap = pl.from_arrow(overlap)
    for variant in ("per_pair", "pooled"):
        assert overlap.filter(pl.col("variant") == variant)["layer"].sort().to_list() == layers
    per_pair = overlap.filter(pl.col("variant") == "per_pair")
    assert per_pair["is_min_overlap"].sum() == 1 and per_pair["is_max_overlap_middle"].sum() == 1
    assert (per_pair["overlap_pct_low"] <= per_pair["overlap_pct_high"]).all()
    disc = pl.from_arrow(read_table(workdir / layout.per_set(layout.DISCRIMINATIVE_FEATURES, main),
                                    kind="discriminative_features")[0])
    assert sorted(disc["layer"].unique().to_list()) == layers
    meta = read_metadata(workdir / layout.per_set(layout.HEAD_FEATURE_ATTRIBUTION, main))
    d_model = json.loads((workdir / layout.MODEL_MANIFEST).read_text())["d_model"]
    for layer, err in meta["identity"].items():
        tol = rounding_tolerance(torch.float32, scale=err["pre_activation_scale"], reduction=d_model, depth=2)
        assert err["identity_error"] <= tol, (layer, err, tol)
    parity = pl.from_arrow(read_table(workdir / layout.per_set(layout.HEAD_PARITY, main), kind="head_parity")[0])
    eta = parity.filter(pl.col("statistic") == "eta_squared")
    assert eta.height == 3 * len(layers) and eta["p_value"].is_between(0, 1).all()
