"""Config validation: the JSON schema (`config.schema.yaml`) plus the checks a schema cannot say.

`validate_config` fills in every default, so the rest of the code reads keys without fallbacks.
"""

from __future__ import annotations

import copy
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Callable

import jsonschema
import yaml


class ConfigError(ValueError):
    """A config value is wrong. The message says which key, what was found and how to fix it."""


def load_schema() -> dict:
    return yaml.safe_load(resources.files("bugscope").joinpath("config.schema.yaml").read_text())


def _with_defaults(validator_class):
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    def fill_additional(validator, additional, instance, schema):
        # Defaults inside additionalProperties (e.g. each prompt format) are filled too.
        if isinstance(instance, dict) and isinstance(additional, dict):
            known = schema.get("properties", {})
            for name, value in instance.items():
                if name not in known and isinstance(value, dict):
                    for key, sub in additional.get("properties", {}).items():
                        if "default" in sub and key not in value:
                            value[key] = copy.deepcopy(sub["default"])
        yield from jsonschema.Draft202012Validator.VALIDATORS["additionalProperties"](
            validator, additional, instance, schema
        )

    return jsonschema.validators.extend(
        validator_class, {"properties": set_defaults, "additionalProperties": fill_additional}
    )


_Validator = _with_defaults(jsonschema.Draft202012Validator)


def _where(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<top level>"


# Keys that were renamed or moved: an old config gets told where the key went instead of a generic
# schema error. "seed" means random seeds only; the published study's procedure is the "original" method.
MOVED_KEYS = {
    "patching.seed_method": "was renamed to 'patching.original_method' (its meaning and values are unchanged)",
    "cache.site": "moved to 'sae.sets[].site': each SAE set names the hook site it reads",
    "sae.source": "moved to 'sae.sets[].source'",
    "sae.release": "moved to 'sae.sets[].release'",
    "sae.sae_id": "moved to 'sae.sets[].sae_id'",
    "features.named": "moved to 'sae.sets[].named': feature ids belong to the SAE set they were read from",
}

# Keys that were removed: an old config is told why, and to delete the key.
REMOVED_KEYS = {
    "sae.corpus.heldout_pair_fraction": "was removed: the pairs held out of SAE training are now the held-out "
    "pairs of every selection-aware claim (the odd pair ids), so that one split keeps those claims off both the "
    "pairs that chose their features and the prompts the SAEs were trained on",
}


def _refuse_moved_keys(config: dict, source: str) -> None:
    for keys, advice in ((MOVED_KEYS, "Move the key"), (REMOVED_KEYS, "Delete the key")):
        for old, why in keys.items():
            node = config
            *sections, key = old.split(".")
            for section in sections:
                node = node.get(section) if isinstance(node, dict) else None
            if isinstance(node, dict) and key in node:
                raise ConfigError(f"Invalid config ({source}): '{old}' {why}. {advice}; config/README.md "
                                  "shows the current layout.")


def validate_config(config: dict, source: str = "config") -> dict:
    """Return a validated copy of `config` with every default filled in; raise ConfigError."""
    config = copy.deepcopy(dict(config))
    _refuse_moved_keys(config, source)
    derived = [key for key in DERIVED_DEFAULTS if _lookup(config, key) is None]
    errors = sorted(_Validator(load_schema()).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        raise ConfigError(
            f"Invalid config ({source}): at key '{_where(e)}': {e.message}. "
            "See config/README.md for every key, its type and its default, and fix that entry "
            f"({len(errors)} problem(s) in all)."
        )
    for key in derived:
        section, name = key.split(".")
        config[section][name] = DERIVED_DEFAULTS[key](config)
    _check_semantics(config, source)
    return config


# Defaults that must agree with another key derive from it (filled after the schema's defaults), so
# that setting one key never makes another's default invalid: features.discriminative.top_n: 4 gives
# interventions.top_n 4 (the top set is drawn from the discriminative features) and feature_pages.top_n 4.
DERIVED_DEFAULTS: dict[str, Callable[[dict], object]] = {
    "interventions.top_n": lambda c: min(5, c["features"]["discriminative"]["top_n"]),
    "feature_pages.top_n": lambda c: min(5, c["features"]["discriminative"]["top_n"]),
}


def _check_semantics(config: dict, source: str) -> None:
    n = config["model"]["num_layers"]
    for key in ("layers", "focus_layers"):
        layers = config[key]
        if not isinstance(layers, list):
            continue
        bad = [layer for layer in layers if layer >= n]
        if bad:
            raise ConfigError(
                f"Invalid config ({source}): {key} {bad} are out of range for "
                f"{config['model']['name']}, which has layers 0..{n - 1} (model.num_layers={n}). "
                f"Remove them from '{key}' or fix model.num_layers."
            )
    prompts = config["prompts"]
    for key in ("buggy_format", "correct_format"):
        if prompts[key] not in prompts["formats"]:
            raise ConfigError(
                f"Invalid config ({source}): prompts.{key} is {prompts[key]!r}, which is not one "
                f"of the formats defined in prompts.formats ({', '.join(prompts['formats'])})."
            )
    if prompts["buggy_format"] == prompts["correct_format"]:
        raise ConfigError(
            f"Invalid config ({source}): prompts.buggy_format and prompts.correct_format are both "
            f"{prompts['buggy_format']!r}; the study contrasts two different formats."
        )
    for name, fmt in prompts["formats"].items():
        if fmt.get("chat_template") == ("template" in fmt):
            raise ConfigError(
                f"Invalid config ({source}): prompts.formats.{name} must have either a 'template' "
                "containing {question} or 'chat_template: true', not both or neither."
            )
    if "{a}" not in prompts["question"] or "{b}" not in prompts["question"]:
        raise ConfigError(
            f"Invalid config ({source}): prompts.question must contain both {{a}} and {{b}}."
        )
    lo, hi = prompts["integer_range"]
    if lo > hi:
        raise ConfigError(f"Invalid config ({source}): prompts.integer_range {lo}..{hi} is empty.")
    _check_sae_sets(config, source)
    _check_interventions(config, source)
    _check_reading(config, source)


def _check_reading(config: dict, source: str) -> None:
    families = config["reading"]["families"]
    decimal = [name for name, f in families.items() if f["numbers"] == "decimal"]
    if len(decimal) != 1:
        raise ConfigError(f"Invalid config ({source}): reading.families needs exactly one family with numbers: decimal "
                          f"(the reference the reading families are told from); it has {decimal or 'none'}.")
    if decimal != ["decimal"]:
        raise ConfigError(f"Invalid config ({source}): the decimal-style family must be named 'decimal', not {decimal[0]!r}.")
    for name, f in families.items():
        for wording in ("train", "test"):
            if "{a}" not in f[wording] or "{b}" not in f[wording]:
                raise ConfigError(f"Invalid config ({source}): reading.families.{name}.{wording} must contain both {{a}} and {{b}}.")
        if f["train"] == f["test"]:
            raise ConfigError(f"Invalid config ({source}): reading.families.{name} has one wording for train and test; "
                              "the probe is tested on another wording so that the template cannot carry it.")
    steer = config["reading"]["steer"]["layers"]
    if steer != "all":
        outside = sorted(set(steer) - set(analysed_layers(config)))
        if outside:
            raise ConfigError(f"Invalid config ({source}): reading.steer.layers {outside} are not analysed layers "
                              f"({analysed_layers(config)}): the reading direction is read there. Add them to 'layers'.")


def steer_layers(config: dict) -> list[int]:
    """The layers the causal test of the reading steers (reading.steer.layers)."""
    layers = config["reading"]["steer"]["layers"]
    return analysed_layers(config) if layers == "all" else sorted(layers)


def reading_feature_layers(config: dict) -> list[int]:
    """The steered layers whose reading features are tested: those the primary SAE set covers, when it
    reads the residual stream the steering writes (none with reading.features.top_n 0)."""
    if not config["reading"]["features"]["top_n"]:
        return []
    primary = next(s for s in sae_sets(config) if s["name"] == primary_sae_set(config))
    return sorted(set(steer_layers(config)) & set(primary["layers"])) if primary["site"] == "resid_post" else []


def _check_sae_sets(config: dict, source: str) -> None:
    analysed = set(analysed_layers(config))
    names = [s["name"] for s in config["sae"]["sets"]]
    if len(set(names)) != len(names):
        raise ConfigError(f"Invalid config ({source}): sae.sets names {names} repeat; each set needs its own name.")
    for i, sae_set in enumerate(config["sae"]["sets"]):
        where = f"sae.sets[{i}] ({sae_set['name']})"
        if sae_set["layers"] != "all":
            bad = sorted(set(sae_set["layers"]) - analysed)
            if bad:
                raise ConfigError(f"Invalid config ({source}): {where} covers layers {bad}, which are not analysed "
                                  f"(layers: {sorted(analysed)}). Add them to 'layers' or remove them from the set.")
        if sae_set["source"] == "pretrained" and not (sae_set["release"] and sae_set["sae_id"]):
            raise ConfigError(f"Invalid config ({source}): {where} has source pretrained but no release and "
                              "sae_id: name the SAE-Lens release and the id template (e.g. l{layer}r_8x).")
        covered = set(set_layers(config, sae_set))
        bad_named = sorted(int(layer) for layer in sae_set["named"] if int(layer) not in covered)
        if bad_named:
            raise ConfigError(f"Invalid config ({source}): {where} names features at layers {bad_named}, which the "
                              f"set does not cover (its layers: {sorted(covered)}). Add them to the set's layers "
                              "or remove them from its named features.")


def _check_interventions(config: dict, source: str) -> None:
    icfg = config["interventions"]
    top = config["features"]["discriminative"]["top_n"]
    if icfg["top_n"] > top:
        raise ConfigError(f"Invalid config ({source}): interventions.top_n is {icfg['top_n']}, above "
                          f"features.discriminative.top_n ({top}), which the top set is drawn from: lower it or "
                          "raise features.discriminative.top_n.")
    names = [s["name"] for s in config["sae"]["sets"]]
    seen = set()
    for i, fs in enumerate(icfg["feature_sets"]):
        if fs["name"] in ("top", "named", "none") or fs["name"] in seen:
            raise ConfigError(f"Invalid config ({source}): interventions.feature_sets[{i}] is named {fs['name']!r}, "
                              "which is taken (top, named, none, or an earlier set): give it its own name.")
        seen.add(fs["name"])
        if fs["sae_set"] is not None and fs["sae_set"] not in names:
            raise ConfigError(f"Invalid config ({source}): interventions.feature_sets[{i}] ({fs['name']}) names the "
                              f"SAE set {fs['sae_set']!r}; the sets are {names}.")


def intervention_sae_sets(config: dict) -> list[str]:
    """The SAE sets the interventions stage runs on: the primary, and every set a feature set names."""
    primary = primary_sae_set(config)
    named = [fs["sae_set"] for fs in config["interventions"]["feature_sets"] if fs["sae_set"]]
    return list(dict.fromkeys([primary, *named]))


def head_set_feature_sets(config: dict) -> list[str]:
    """The SAE sets of the head-set feature counts (bugscope.interventions.head_set_features): every set, when
    patching.exhaustive (whose head sets it patches) is on."""
    if not config["patching"]["exhaustive"]["enabled"]:
        return []
    return [s["name"] for s in config["sae"]["sets"]]


# The model's shape the config declares (model.num_layers, model.num_heads): the one source every stage
# reads (layer ranges, head sets, job sizes, the ledger). The checkpoint is checked against it where the
# model is prepared (bugscope.model.load.prepare_model) and where a job reads the manifest
# (bugscope.run.script.run); bugscope.model.load.load_model checks the loaded model against the manifest.
DECLARED_GEOMETRY = ("num_layers", "num_heads")


def check_model_geometry(model_cfg: dict, found: dict, where: str, error: type[Exception] = ConfigError) -> None:
    """Raise `error` when the checkpoint's shape (`found`: num_layers, num_heads) is not the one the
    config declares; the message names the key to fix."""
    for key in DECLARED_GEOMETRY:
        if found[key] != model_cfg[key]:
            raise error(
                f"The config says model.{key}={model_cfg[key]}, but {where} has {found[key]}. "
                f"Fix model.{key} in the config (or model.checkpoint, if it names the wrong model)."
            )


def verdict_defaults() -> dict:
    """The defaults of `claims.verdicts`, from the schema."""
    props = load_schema()["properties"]["claims"]["properties"]["verdicts"]["properties"]
    return {k: v["default"] for k, v in props.items()}


def load_config(path: str | Path) -> dict:
    with open(path) as fh:
        raw = yaml.safe_load(fh) or {}
    return validate_config(raw, source=str(path))


def n_prompts(config: dict, n_formats: int | None = None) -> int:
    """Prompts in the prompt table: every number pair (extra, random and control) in both question
    orders, in each of `n_formats` formats (default: all of prompts.formats)."""
    p = config["prompts"]
    formats = len(p["formats"]) if n_formats is None else n_formats
    return formats * 2 * (p["n_pairs"] + len(p["extra_pairs"]) + sum(p["control_pairs"].values()))


def analysed_layers(config: dict) -> list[int]:
    layers = config["layers"]
    return list(range(config["model"]["num_layers"])) if layers == "all" else sorted(layers)


def set_layers(config: dict, sae_set: dict) -> list[int]:
    """The analysed layers an SAE set covers."""
    return analysed_layers(config) if sae_set["layers"] == "all" else sorted(sae_set["layers"])


def sae_sets(config: dict) -> list[dict]:
    """The SAE sets, primary first, each with its `layers` resolved to a list."""
    return [{**s, "layers": set_layers(config, s)} for s in config["sae"]["sets"]]


def with_sae_set(config: dict, name: str) -> dict:
    """`config` with the SAE set `name` (resolved) under the key `sae_set`: what a per-set job reads.

    Only the key is added; every stage hash still covers the whole `sae` section (all sets): a set's
    jobs read the activations of one cache job that serves every set, so a new set reruns them anyway.
    """
    for sae_set in sae_sets(config):
        if sae_set["name"] == name:
            return {**config, "sae_set": sae_set}
    raise ConfigError(f"There is no SAE set {name!r}; the config has {[s['name'] for s in config['sae']['sets']]}.")


def primary_sae_set(config: dict) -> str:
    return config["sae"]["sets"][0]["name"]


def check_features_config(config: dict) -> None:
    """Checks on the features section that the schema cannot express (workflow/rules/features.smk)."""
    fcfg = config["features"]
    layers = set(analysed_layers(config))
    attr = fcfg["attribution"]["layers"]
    if attr != "all":
        bad = sorted(set(attr) - layers)
        if bad:
            raise ConfigError(
                f"features.attribution.layers lists {bad}, which are not analysed (layers: {sorted(layers)}). "
                "Add them to 'layers' or remove them from features.attribution.layers.")
    lo, hi = fcfg["overlap"]["middle_fraction"]
    if lo > hi:
        raise ConfigError(f"features.overlap.middle_fraction [{lo}, {hi}] is empty: write it as [low, high].")


def attribution_layers(config: dict, covered: list[int]) -> list[int]:
    """The layers of the head attribution for an SAE set covering the layers `covered`."""
    layers = config["features"]["attribution"]["layers"]
    return sorted(covered) if layers == "all" else sorted(set(layers) & set(covered))


def layer_groups(layers: list[int], layers_per_job: int) -> dict[str, list[int]]:
    """The model jobs of a per-layer stage: consecutive analysed layers in groups of
    `resources.layers_per_job`, named `L<first>_<last>` (valid in rule and file names).

    Each job writes one output per layer; grouping only saves the start-up (imports, model load,
    the unpatched forward passes) that per-layer jobs would repeat.
    """
    layers = sorted(layers)
    groups = [layers[i:i + layers_per_job] for i in range(0, len(layers), layers_per_job)]
    return {f"L{g[0]:02d}_{g[-1]:02d}": g for g in groups}


def config_hash(config: dict, *sections: str) -> str:
    """Hash of the config sections a table depends on (all of them when none are named).

    Stored in every table so that readers can refuse a stale one. Naming the sections keeps an
    edit to, say, the figure settings from invalidating the activation cache.
    """
    part = {k: _lookup(config, k) for k in sections} if sections else config
    blob = json.dumps(part, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _lookup(config: dict, key: str):
    """config[key], or for a dotted key ("patching.positions") the nested value (None if absent)."""
    value = config
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


# The config sections each stage's tables depend on: the one place that decides them. A rule stores
# `stage_hash(config, stage)` in its tables and a reader recomputes it from the current config, so a
# table made under other settings is refused with the rule to rerun (bugscope.tables.read).
_BASE = ("model", "prompts", "seed")
# What every head-patching table depends on (batch sizes and memory settings change no number).
_PATCH = ("patching.positions", "patching.operation", "patching.direction")
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "prompts": _BASE,
    "baseline": (*_BASE, "baseline", "bootstrap"),
    "activations": (*_BASE, "cache"),
    "sae": (*_BASE, "cache", "sae"),  # corpus, its activations, SAEs, feature tables, SAE quality
    "features": (*_BASE, "cache", "sae", "features", "bootstrap"),
    # The feature pages also depend on the focus layers they are drawn for.
    "feature_pages": (*_BASE, "cache", "sae", "features", "feature_pages", "bootstrap", "focus_layers"),
    "patching_sweep": (*_BASE, *_PATCH),
    "patching_focus": (*_BASE, *_PATCH, "patching.subsets", "patching.original_method", "focus_layers",
                       "bootstrap"),
    "patching_summary": (*_BASE, *_PATCH, "patching.subsets", "layers", "focus_layers", "bootstrap"),
    # The focus-layer experiments of patching.{replacement,exhaustive,residual_map,bidirectional}:
    # each its own stage, so that editing one reruns only it.
    "patching_replacement": (*_BASE, *_PATCH, "patching.replacement", "focus_layers", "bootstrap"),
    "patching_exhaustive": (*_BASE, *_PATCH, "patching.exhaustive", "focus_layers", "focus_min_frequency", "bootstrap"),
    "patching_residual_map": (*_BASE, "patching.direction", "patching.residual_map", "layers", "bootstrap"),
    "patching_bidirectional": (*_BASE, *_PATCH, "patching.bidirectional", "focus_layers", "bootstrap"),
    # the top features come from the features stage, the focus layers from its overlap table
    "interventions": (*_BASE, "cache", "sae", "features", "bootstrap", "focus_layers", "focus_min_frequency", "interventions"),
    # the critical features each even-head set turns on: the exhaustive sets, the features stage's SAEs
    "head_set_features": (*_BASE, *_PATCH, "cache", "sae", "features", "patching.exhaustive", "focus_layers", "focus_min_frequency",
                          "bootstrap"),
    # the original procedure with generation and the decomposition of the gap (its table has CIs)
    "patching_original": (*_BASE, *_PATCH, "patching.original_generation", "focus_layers", "bootstrap"),
    "organism": (*_BASE, "organism"),
    # the localisation scores and the paired change of the answers (both models' baseline scores)
    "organism_localisation": (*_BASE, "organism", "baseline", "bootstrap"),
    "probes": (*_BASE, "cache", "baseline", "probes", "bootstrap"),
    # the reading families' prompts; the model job's scores and the closeness and steering summaries
    "reading_prompts": (*_BASE, "reading.families", "reading.n_pairs"),
    "reading_model": (*_BASE, "cache", "sae", "layers", "reading.families", "reading.n_pairs", "reading.steer",
                      "reading.features"),
    "reading": (*_BASE, "cache", "baseline", "layers", "reading", "probes.alphas", "features.discriminative.test",
                "claims.verdicts.reading_probe_min_accuracy", "bootstrap"),
}


def stage_hash(config: dict, stage: str) -> str:
    """The config hash of `stage`'s tables (STAGE_SECTIONS)."""
    return config_hash(config, *STAGE_SECTIONS[stage])
