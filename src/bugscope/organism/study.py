"""The organism's config: which layer and heads carry the planted bug, and the study run on it.

Light to import (no torch, no Polars): the workflow derives the organism's config while it parses.
"""

from __future__ import annotations

import copy

from bugscope.config import ConfigError, primary_sae_set, validate_config

# The seed study's layer (Llama-3.1-8B's layer 10 of 32): "auto" plants at the same relative depth.
STUDY_LAYER, STUDY_LAYERS = 10, 32
# What the organism's own study leaves out: stages that test the seed's procedure rather than a
# location (the original method and its decomposition, generation-based), the SAE-feature
# interventions and the replacement curve. Each can be turned back on under organism.study.
_OFF = {
    "patching": {"original_method": False, "bidirectional": False, "replacement": {"enabled": False},
                 "original_generation": {"enabled": False}},
    "interventions": {"enabled": False},
}


def planted_layer(config: dict) -> int:
    """The layer the bug is planted at: organism.layer, or (auto) Llama's layer 10 at this depth."""
    layer = config["organism"]["layer"]
    n = config["model"]["num_layers"]
    if layer == "auto":
        layer = round(STUDY_LAYER * n / STUDY_LAYERS)
    if not 0 <= layer < n:
        raise ConfigError(f"organism.layer={layer} is outside the model, which has layers 0..{n - 1}.")
    return int(layer)


def planted_heads(config: dict) -> list[int]:
    """The planted query heads: organism.heads ("even", "odd" or a list of head indices)."""
    heads = config["organism"]["heads"]
    n = config["model"]["num_heads"]
    if heads in ("even", "odd"):
        return list(range(0 if heads == "even" else 1, n, 2))
    bad = [h for h in heads if not 0 <= h < n]
    if bad:
        raise ConfigError(f"organism.heads lists {bad}, but the model has heads 0..{n - 1}.")
    return sorted(heads)


def study_layers(config: dict) -> list[int]:
    """The planted layer and its neighbours: the layers the organism's study analyses."""
    layer, n = planted_layer(config), config["model"]["num_layers"]
    return [x for x in (layer - 1, layer, layer + 1) if 0 <= x < n]


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def study_config(config: dict) -> dict:
    """The organism's study: the base config on the planted checkpoint (the model section stays the
    base's: the organism's tables are made from the same prompt table, and its manifest names the
    planted checkpoint), at the planted layer and its neighbours, with every location claim read at
    the planted layer and the decision position, where planting writes the bug
    (bugscope.organism.plant). The primary SAE set covers the planted layer only: below it the
    residual stream is the base model's, bit for bit, so its SAEs and features would be the base
    run's, and above it the budget of README command 1 does not reach. Greedy generation checks 4
    prompts per format. organism.study is merged on top."""
    layer, layers = planted_layer(config), study_layers(config)
    primary = next(s for s in config["sae"]["sets"] if s["name"] == primary_sae_set(config))
    derived = {
        "layers": layers,
        "focus_layers": [layer],
        "organism": {"enabled": False},
        "sae": {"sets": [{**copy.deepcopy(primary), "layers": [layer]}]},
        "baseline": {"generation_sample": min(4, config["baseline"]["generation_sample"])},
        # the exhaustive sets up to 4 heads (every odd-only set, the half and quarter of the even
        # heads): the claims read no more. The random subsets stay at the base's samples: they are
        # the ceiling's random-head control, and with 2 a draw that holds the strongest planted head
        # decides it.
        "patching": {**_OFF["patching"], "positions": "decision", "residual_map": {"layers": layers},
                     "exhaustive": {"sizes": [1, 2, 3, 4]}},
        "interventions": _OFF["interventions"],
        "claims": {"expectations": "organism"},
    }
    study = _merge(_merge(copy.deepcopy(config), derived), config["organism"]["study"])
    return validate_config(study, source="the organism's study config (organism.study)")
