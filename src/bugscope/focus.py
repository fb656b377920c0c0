"""The focus layers: the one place that decides where patching, attribution and the interventions
measure."""

from __future__ import annotations

import polars as pl

from bugscope.config import ConfigError


def resolve_focus_layers(config: dict, overlap: pl.DataFrame | None) -> tuple[list[int], str]:
    """(focus layers, where they came from): the one place that decides them.

    The config's list; or, for "auto", the overlap table's max-overlap middle layer; or, for "auto"
    without an overlap stage, the model's middle layer.
    """
    n = config["model"]["num_layers"]
    if config["focus_layers"] != "auto":
        layers, source = sorted(config["focus_layers"]), "config"
    elif overlap is not None:
        # The all-pairs mark: the focus is where patching and attribution measure, separate
        # measurements; the ledger's claims on the marked layer's overlap read per_pair_heldout.
        layers = overlap.filter(pl.col("variant") == "per_pair", pl.col("is_max_overlap_middle"))["layer"].to_list()
        if not layers:
            raise ValueError(
                "focus_layers is 'auto' but no analysed layer lies among the middle layers "
                "(features.overlap.middle_fraction): list focus_layers explicitly or analyse more layers.")
        source = "overlap"
    else:
        layers, source = [n // 2], "fallback_middle_layer"
    for layer in layers:
        if not 0 <= layer < n:
            raise ConfigError(f"Focus layer {layer} is outside the model, which has layers 0..{n - 1}. "
                              "Fix 'focus_layers' in the config (or model.num_layers if the model changed).")
    return layers, source


def focus_layers(config: dict, overlap: pl.DataFrame | None = None) -> list[int]:
    """The focus layers of `resolve_focus_layers`."""
    return resolve_focus_layers(config, overlap)[0]


def focus_frequencies(overlap: pl.DataFrame | None) -> dict[int, float]:
    """How often each middle layer is the max-overlap layer across the overlap stage's bootstrap over
    number pairs (`argmax_middle_frequency` of the all-pairs rows): the uncertainty of the "auto" choice."""
    if overlap is None or "argmax_middle_frequency" not in overlap.columns:
        return {}
    rows = overlap.filter(pl.col("variant") == "per_pair", pl.col("argmax_middle_frequency").is_finite(),
                          pl.col("argmax_middle_frequency") > 0)
    return {int(layer): float(f) for layer, f in rows.select("layer", "argmax_middle_frequency").iter_rows()}


# The stages that run at the focus layer only (the exhaustive subsets, the SAE-feature interventions
# and the features each head set turns on) run at this many of the layers the choice picks.
CHOICE_STAGE_LAYERS = 2


def choice_layers(config: dict, overlap: pl.DataFrame | None) -> tuple[list[int], str]:
    """(layers, where they came from) of the focus-only stages: with focus_layers auto, the focus
    layer and the layer the overlap bootstrap chooses most often after it, if it chooses it in at
    least `focus_min_frequency` of the resamples (research notes section 9: the layer choice inside
    the uncertainty); otherwise the focus layers."""
    layers, source = resolve_focus_layers(config, overlap)
    if config["focus_layers"] != "auto":
        return layers, source
    floor = float(config["focus_min_frequency"])
    others = sorted(((f, layer) for layer, f in focus_frequencies(overlap).items()
                     if layer not in layers and f >= floor), key=lambda t: (-t[0], t[1]))
    extra = [layer for _, layer in others][: max(0, CHOICE_STAGE_LAYERS - len(layers))]
    return sorted(layers + extra), source + ("+bootstrap_choice" if extra else "")
