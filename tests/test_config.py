"""Config validation: defaults, schema errors and the checks a schema cannot express."""

import copy

import pytest
import yaml

from bugscope.config import ConfigError, analysed_layers, config_hash, load_config, validate_config
from tests.conftest import REPO


@pytest.mark.parametrize("name", ["config.yaml", "ci.yaml", "llama31_8b.yaml", "llama31_8b_shaped.yaml",
                                  "gemma2_2b.yaml"])
def test_shipped_configs_validate(name):
    cfg = load_config(REPO / "config" / name)
    assert cfg["model"]["num_layers"] >= max(analysed_layers(cfg)) + 1


def test_defaults_are_filled():
    cfg = validate_config({"model": {"name": "m", "checkpoint": "embedded", "num_layers": 4, "num_heads": 2}})
    assert cfg["layers"] == "all" and analysed_layers(cfg) == [0, 1, 2, 3]
    assert set(cfg["prompts"]["formats"]) == {"qa", "simple", "chat"}
    assert cfg["prompts"]["formats"]["qa"]["chat_template"] is False
    assert cfg["cache"]["dtype"] == "float32"


def raw_ci():
    return yaml.safe_load((REPO / "config" / "ci.yaml").read_text())


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(unknown_key=1), "Additional properties are not allowed"),
    (lambda c: c["cache"].update(batch_size="big"), "cache.batch_size"),
    (lambda c: c.update(layers=[0, 30]), r"layers \[30\] are out of range"),
    (lambda c: c["prompts"].update(buggy_format="nope"), "prompts.buggy_format"),
    (lambda c: c["prompts"].update(question="Which is bigger: {a}?"), r"\{b\}"),
    (lambda c: c["sae"]["sets"].append({"name": "main"}), r"names \['main', 'mlp', 'main'\] repeat"),
    (lambda c: c["sae"]["sets"][1].update(layers=[10, 11]), r"sae.sets\[1\] \(mlp\) covers layers \[11\], which are not analysed"),
    (lambda c: c["sae"]["sets"][1].update(named={"0": {"x": [1]}}), r"names features at layers \[0\], which the set does not cover"),
    (lambda c: c["sae"]["sets"][1].update(source="pretrained"), r"source pretrained but no release and sae_id"),
    (lambda c: c["sae"]["sets"][1].update(name="mlp out"), r"sae.sets.1.name"),
])
def test_bad_configs_fail_with_the_key(edit, message):
    cfg = raw_ci()
    edit(cfg)
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)


def test_config_hash_depends_only_on_named_sections():
    a = validate_config(raw_ci())
    b = copy.deepcopy(a)
    b["baseline"]["max_new_tokens"] += 1
    assert config_hash(a, "model", "prompts") == config_hash(b, "model", "prompts")
    assert config_hash(a) != config_hash(b)


def test_renamed_key_is_refused_with_its_new_name(ci_config):
    from bugscope.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match=r"'patching.seed_method' was renamed to 'patching.original_method'"):
        validate_config({"model": ci_config["model"], "patching": {"seed_method": False}})
    assert validate_config({"model": ci_config["model"], "patching": {"original_method": False}})["patching"][
        "original_method"] is False


@pytest.mark.parametrize("section,key,where", [
    ("cache", "site", r"'cache.site' moved to 'sae.sets\[\].site'"),
    ("sae", "source", r"'sae.source' moved to 'sae.sets\[\].source'"),
    ("sae", "release", r"'sae.release' moved to 'sae.sets\[\].release'"),
    ("features", "named", r"'features.named' moved to 'sae.sets\[\].named'"),
])
def test_moved_keys_are_refused_with_where_they_went(ci_config, section, key, where):
    with pytest.raises(ConfigError, match=where):
        validate_config({"model": ci_config["model"], section: {key: "resid_post"}})


def test_removed_key_is_refused_with_why(ci_config):
    with pytest.raises(ConfigError, match=r"'sae.corpus.heldout_pair_fraction' was removed: .* Delete the key"):
        validate_config({"model": ci_config["model"], "sae": {"corpus": {"heldout_pair_fraction": 0.2}}})
    assert "heldout_pair_fraction" not in validate_config({"model": ci_config["model"]})["sae"]["corpus"]


def test_sae_sets_resolve_layers_and_the_primary_set():
    from bugscope.config import primary_sae_set, sae_sets, with_sae_set

    cfg = validate_config(raw_ci())
    assert [(s["name"], s["site"], s["layers"]) for s in sae_sets(cfg)] == [
        ("main", "resid_post", [0, 10, 29]), ("mlp", "mlp_out", [10])]
    assert primary_sae_set(cfg) == "main" and with_sae_set(cfg, "mlp")["sae_set"]["site"] == "mlp_out"
    with pytest.raises(ConfigError, match=r"no SAE set 'nope'"):
        with_sae_set(cfg, "nope")
    default = validate_config({"model": cfg["model"]})
    assert [(s["name"], s["source"], s["site"]) for s in sae_sets(default)] == [("main", "train", "resid_post")]
