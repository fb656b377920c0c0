"""The feature stage drivers on hand-made tables written as the pipeline writes them, and the
features config check."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from bugscope import tables
from bugscope.config import check_features_config, primary_sae_set, with_sae_set
from bugscope.features.overlap import (
    HELDOUT_VARIANT,
)
from bugscope.features.stages import load_prompt_frame, run_discriminative, run_named, run_overlap
from tests.helpers import pair_prompts, sparse_features


@pytest.fixture
def stage_inputs(tmp_path, ci_config):
    """A prompt table, baseline scores and two layers of sparse features written as the pipeline writes them."""
    from bugscope.config import stage_hash
    from bugscope.io import write_table

    rng = np.random.default_rng(0)
    n_q = 12
    prompts = pair_prompts(n_q)
    write_table(prompts.to_arrow(), tmp_path / "prompts.parquet",
                {"kind": "prompts", "config_hash": stage_hash(ci_config, "prompts")})
    scores = pl.DataFrame({"prompt_id": prompts["prompt_id"], "format": prompts["format"],
                           "pair_id": prompts["pair_id"], "pair_kind": prompts["pair_kind"], "order": prompts["order"],
                           "is_correct": rng.random(prompts.height) < 0.5})
    write_table(scores.to_arrow(), tmp_path / "scores.parquet",
                {"kind": "baseline_scores", "config_hash": stage_hash(ci_config, "baseline")})
    paths = {}
    for layer in (0, 10):
        rows = [(pid, pos, int(f), float(rng.exponential()))
                for pid in prompts["prompt_id"] for pos in (0, 2, 5) for f in rng.choice(50, 8, replace=False)]
        paths[layer] = tmp_path / f"blocks.{layer}.hook_resid_post.parquet"
        write_table(sparse_features(rows).to_arrow(), paths[layer], {"kind": "features", "d_sae": 50, "sae": "hand-made",
                                                          "config_hash": stage_hash(ci_config, "sae")})
    return ci_config, tmp_path, paths


def test_feature_analyses_read_only_the_bug_pair_kind(stage_inputs, tmp_path):
    from bugscope.config import stage_hash
    from bugscope.io import write_table

    config, tmp, _ = stage_inputs
    prompts = pair_prompts(4).with_columns(
        pl.when(pl.col("pair_id") == 1).then(pl.lit("longer_bigger")).otherwise(pl.col("pair_kind")).alias("pair_kind"))
    write_table(prompts.to_arrow(), tmp_path / "mixed.parquet",
                {"kind": "prompts", "config_hash": stage_hash(config, "prompts")})
    kept = load_prompt_frame(tmp_path / "mixed.parquet", config)
    assert sorted(kept["pair_id"].unique().to_list()) == [0] and kept.height == 4


def test_stage_drivers(stage_inputs):
    import copy

    from bugscope.io import read_metadata

    config, tmp, paths = stage_inputs
    summary, per_pair, meta = run_overlap(config, tmp / "prompts.parquet", paths)
    # The original study's one question (9.8 vs 9.11, correct first) at the prompt's last token.
    single = summary.filter(pl.col("variant") == "original_single_pair")
    assert single["layer"].to_list() == [0, 10] and (single["n_pairs"] == 1).all()
    assert single["overlap_pct"].is_not_null().all()
    assert per_pair.height == 2 * 12 and set(per_pair["layer"]) == {0, 10}
    # original single pair, per_pair, per_pair_heldout, pooled, and the two baselines per format and
    # for both, at 2 layers
    assert summary.group_by("variant").len().sort("variant")["len"].to_list() == [2, 2, 2, 2, 6, 6]
    assert summary.filter(pl.col("variant") == "per_pair")["format_effect_pct"].is_not_null().all()
    # the held-out rows: the 3 odd of the 6 number pairs, with their own baselines
    held = summary.filter(pl.col("variant") == HELDOUT_VARIANT)
    assert held["n_number_pairs"].to_list() == [3, 3] and held["format_effect_pct"].is_not_null().all()
    assert held["is_min_overlap"].sum() == 1
    assert meta["sources"]["10"]["sae"] == "hand-made"
    table, _ = run_discriminative(config, tmp / "prompts.parquet", tmp / "scores.parquet", paths)
    assert set(table["layer"]) == {0, 10} and table["q_value"].is_between(0, 1).all()
    cfg = with_sae_set(copy.deepcopy(config), primary_sae_set(config))
    cfg["sae_set"]["named"] = {"10": {"cat": [3, 7]}}
    named, nmeta = run_named(cfg, tmp / "prompts.parquet", paths)
    assert named["feature_id"].to_list() == [3, 7] and named["layer"].to_list() == [10, 10]
    cfg["sae_set"]["named"] = {"10": {"cat": [3, 25523]}}
    with pytest.raises(ValueError, match="out of range"):
        run_named(cfg, tmp / "prompts.parquet", paths)
    # a set that names nothing reports this run's own top features of each layer
    cfg["sae_set"]["named"] = {}
    tables.write(tables.DISCRIMINATIVE_FEATURES, table, tmp / "discriminative.parquet",
                 {"config_hash": tables.DISCRIMINATIVE_FEATURES.config_hash(cfg)})
    own, own_meta = run_named(cfg, tmp / "prompts.parquet", paths, tmp / "discriminative.parquet")
    top = table.filter(pl.col("comparison") == "buggy_vs_correct", pl.col("rank") < 5)
    assert sorted(own["feature_id"].to_list()) == sorted(top["feature_id"].to_list())
    assert set(own["category"]) <= {"buggy_format_up", "correct_format_up"} and "this run" in own_meta["named_source"]
    cfg["features"]["position"] = "aligned_mean"
    summary_aligned, _, _ = run_overlap(cfg, tmp / "prompts.parquet", paths)
    assert not summary_aligned.equals(summary)
    assert run_overlap(cfg, tmp / "prompts.parquet", paths)[0].equals(summary_aligned)  # deterministic
    assert read_metadata(paths[0])["kind"] == "features"


def test_check_config_rejects_unanalysed_layers(ci_config):
    import copy

    from bugscope.config import ConfigError

    cfg = copy.deepcopy(ci_config)
    cfg["features"]["attribution"]["layers"] = [10, 12]
    with pytest.raises(ConfigError, match="not analysed"):
        check_features_config(cfg)
