"""The feature-analysis rules inside the real ci.yaml workflow (needs the SAE stage's rules)."""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch

from bugscope import layout
from bugscope.config import analysed_layers, primary_sae_set, sae_sets
from bugscope.io import read_metadata, read_table
from bugscope.model.sites import hook_name
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


def test_feature_pages_of_every_set(workdir, ci_config):
    """feature_pages: per set, a page per page layer (focus layers it covers, named layers), the
    per-token table over the prompts' cached tokens, and corpus contexts that the SAE reproduces."""
    from bugscope import tables
    from bugscope.config import with_sae_set
    from bugscope.features.page_html import ROLES
    from bugscope.focus import focus_layers
    from bugscope.sae.activations import ActivationSource, iter_activations
    from bugscope.sae.encode import encode_sparse
    from bugscope.sae.store import load_sae

    overlap = tables.frame(tables.FEATURE_OVERLAP, ci_config,
                           workdir / layout.per_set(layout.FEATURE_OVERLAP, primary_sae_set(ci_config)))
    focus = focus_layers(ci_config, overlap)
    for s in sae_sets(ci_config):
        cfg = with_sae_set(ci_config, s["name"])
        meta = read_metadata(workdir / layout.per_set(layout.FEATURE_TOKENS, s["name"]))
        expected = sorted((set(focus) & set(s["layers"])) | {int(k) for k in s["named"]})
        assert meta["page_layers"] == expected and meta["sae_set"] == s["name"], (s["name"], meta["page_layers"])
        pages = workdir / layout.per_set(layout.FEATURE_PAGES, s["name"])
        # (Snakemake adds .snakemake_timestamp to a directory output)
        names = sorted(p.name for p in pages.iterdir() if not p.name.startswith("."))
        assert names == sorted(["index.html", *[f"layer_{k}.html" for k in expected]])
        index = (pages / "index.html").read_text()
        assert all(f"layer_{k}.html" in index for k in expected)
        tokens = tables.frame(tables.FEATURE_TOKENS, cfg, workdir / layout.per_set(layout.FEATURE_TOKENS, s["name"]))
        contexts = tables.frame(tables.FEATURE_CONTEXTS, cfg,
                                workdir / layout.per_set(layout.FEATURE_CONTEXTS, s["name"]))
        if not expected:
            assert tokens.height == 0 and contexts.height == 0
            continue
        for layer in expected:
            page = (pages / f"layer_{layer}.html").read_text()
            assert "<script" not in page and "<link" not in page and "Neuronpedia" in page
            assert "trained here" in page  # ci.yaml's SAEs are trained: no Neuronpedia page
            rows = tokens.filter(pl.col("layer") == layer)
            for f in rows["feature_id"].unique().to_list():
                assert f"id='f{f}'" in page
        role = tokens.filter(pl.col("level") == "role")
        assert set(role["role"]) <= set(ROLES) and {"number", "decimal_point", "comparison", "format"} <= set(role["role"])
        assert set(role["format"]) == set(ci_config["prompts"]["formats"]) and set(role["pairs"]) == {"all", "heldout"}
        assert (role["mean_activation_low"] <= role["mean_activation"] + 1e-9).all()
        assert (role["mean_activation"] <= role["mean_activation_high"] + 1e-9).all()
        shares = role.filter(pl.col("activation_share").is_not_null()).group_by(
            "layer", "feature_id", "selection", "pairs", "format").agg(pl.col("activation_share").sum())
        assert ((shares["activation_share"] - 1).abs() < 1e-6).all()
        # the focus layer's top buggy-vs-correct features are on its page
        disc = tables.frame(tables.DISCRIMINATIVE_FEATURES, cfg,
                            workdir / layout.per_set(layout.DISCRIMINATIVE_FEATURES, s["name"]))
        for layer in set(focus) & set(s["layers"]):
            top = disc.filter(pl.col("layer") == layer, pl.col("comparison") == "buggy_vs_correct", pl.col("rank") == 0)
            assert set(top["feature_id"]) <= set(tokens.filter(pl.col("layer") == layer)["feature_id"])
        # contexts: from the text (no analysis prompt), ranked, and what the SAE gives at that token
        assert set(contexts["source"]) <= {"lee_background", "lee_test"} and contexts.height > 0
        assert contexts.group_by("layer", "feature_id").agg(pl.col("corpus_id").n_unique() == pl.len())["corpus_id"].all()
        first = contexts.sort("activation", descending=True).row(0, named=True)
        hook = hook_name(first["layer"], s["site"])
        sae, _ = load_sae(workdir / layout.per_set(layout.SAE_DIR, s["name"], hook=hook))
        source = ActivationSource(str(workdir / layout.activations("corpus", hook)),
                                  prompt_ids=frozenset({first["corpus_id"]}))
        for _ids, pos, x in iter_activations([source]):
            keep = pos == first["position"]
            if keep.any():
                _, f, v = encode_sparse(sae, x[keep.nonzero()[0]])
                assert float(v[f == first["feature_id"]][0]) == pytest.approx(first["activation"], rel=1e-4)
                break
        else:
            raise AssertionError(f"context {first} is not in the corpus activations")
