"""The stage registry (bugscope.run.stages), the derived config defaults and the declared model shape."""

from __future__ import annotations

import re

import pytest
import yaml

from bugscope.config import ConfigError, check_model_geometry, load_config, validate_config
from bugscope.run import resources, stages
from tests.conftest import REPO


def raw_ci():
    return yaml.safe_load((REPO / "config" / "ci.yaml").read_text())


def test_a_smaller_discriminative_top_n_lowers_the_derived_defaults():
    cfg = raw_ci()
    cfg["features"]["discriminative"]["top_n"] = 4
    del cfg["interventions"]["top_n"]
    filled = validate_config(cfg)
    assert filled["interventions"]["top_n"] == 4 and filled["feature_pages"]["top_n"] == 4
    cfg["interventions"]["top_n"] = 2  # a value the config sets is kept
    assert validate_config(cfg)["interventions"]["top_n"] == 2


def test_derived_defaults_keep_the_shipped_values():
    for name in ("config.yaml", "llama31_8b.yaml", "gemma2_2b.yaml"):
        cfg = load_config(REPO / "config" / name)
        assert cfg["interventions"]["top_n"] == 5 and cfg["feature_pages"]["top_n"] == 5, name


def test_a_checkpoint_of_another_shape_names_the_key_to_fix():
    model = load_config(REPO / "config" / "ci.yaml")["model"]
    check_model_geometry(model, {"num_layers": 30, "num_heads": 9}, "the checkpoint")
    with pytest.raises(ConfigError, match=r"model.num_heads=9, but the checkpoint has 8\. Fix model.num_heads"):
        check_model_geometry(model, {"num_layers": 30, "num_heads": 8}, "the checkpoint")


def test_every_rule_of_the_workflow_is_a_stage():
    """Each rule of workflow/rules/*.smk (a per-group rule by its stem) is declared in the registry."""
    text = "".join(p.read_text() for p in sorted((REPO / "workflow" / "rules").glob("*.smk")))
    named = set(re.findall(r"^rule (\w+):", text, flags=re.M))
    stems = set(re.findall(r'^\s+f"(\w+?)_\{(?:group|job)\}"', text, flags=re.M))
    assert named | stems == set(stages.STAGE), (named | stems) ^ set(stages.STAGE)


def test_the_resource_table_is_the_registrys_model_stages():
    assert resources.MODEL_RULES == stages.MODEL_STAGES
    cfg = raw_ci()
    cfg["patching"]["original_method"] = False
    cfg["interventions"]["enabled"] = False
    cfg = validate_config(cfg)
    rows = [rule for rule, _ in resources.rule_table(cfg)]
    assert "head_original_method" not in rows and "feature_interventions" not in rows
    assert not any(p in stages.targets(cfg) for p in ("results/patching/original_method.parquet",
                                                      "results/interventions/features.parquet"))
    assert "original_method" not in stages.figures(cfg) and "interventions" not in stages.figures(cfg)


def test_the_ledger_waits_only_for_tables_that_are_made():
    cfg = validate_config({**raw_ci(), "interventions": {**raw_ci()["interventions"], "enabled": False}})
    sets = stages.claims_table_sets(cfg, {"interventions": "results/interventions/features.parquet",
                                          "head_parity": "results/features/{sae_set}/head_parity.parquet",
                                          "overlap": "results/features/{sae_set}/overlap.parquet"})
    # no head attribution on the mlp_out set
    assert sets == {"interventions": [], "head_parity": ["main"], "overlap": ["main", "mlp"]}
