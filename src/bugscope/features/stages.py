"""Stage drivers of the feature analyses (called by workflow/scripts/*.py; testable without Snakemake)."""

from __future__ import annotations

import logging

import numpy as np
import polars as pl

from bugscope import tables
from bugscope.data.prompts import BUG_PAIR_KIND, STUDY_ORDER, STUDY_PAIR, is_selection_pair
from bugscope.features.chance import baseline_couples, baseline_overlap
from bugscope.features.discriminative import discriminative_features
from bugscope.features.named import NAMED_SCHEMA, named_feature_ids, named_features
from bugscope.features.overlap import pair_overlap, pooled_overlap, summarise_overlap
from bugscope.features.values import position_weights, prompt_pairs, prompt_values
from bugscope.stats import derived_seed

log = logging.getLogger("bugscope.features")


def load_prompt_frame(path, config: dict, columns: list[str] | None = None) -> pl.DataFrame:
    """The prompts the feature analyses contrast: the bug's pair kind only (the control kinds test
    the patching and baseline, not the features)."""
    columns = columns or ["prompt_id", "question_id", "pair_id", "order", "format", "decision_pos",
                          "aligned_positions", "prompt_last_pos"]
    frame = tables.frame(tables.PROMPTS, config, path, columns=[*columns, "pair_kind"])
    return frame.filter(pl.col("pair_kind") == BUG_PAIR_KIND).drop("pair_kind")


def original_single_pair(prompts_path, config: dict, pairs: pl.DataFrame) -> pl.DataFrame:
    """The row of `pairs` of the original study's question (empty when the prompt set lacks it)."""
    (correct, wrong), order = STUDY_PAIR, STUDY_ORDER
    ids = load_prompt_frame(prompts_path, config, ["question_id", "correct", "wrong", "order"]).filter(
        pl.col("correct") == correct, pl.col("wrong") == wrong, pl.col("order") == order)["question_id"].unique()
    return pairs.filter(pl.col("question_id").is_in(ids.to_list()))


def load_layer_values(path, weights: pl.DataFrame, config: dict) -> tuple[pl.DataFrame, dict]:
    """(prompt_id, feature_id, value) of one layer's feature table, and the table's metadata."""
    table, meta = tables.read(tables.FEATURES, config, path, columns=["prompt_id", "position", "feature_id", "activation"])
    return prompt_values(pl.from_arrow(table), weights), meta


def source_provenance(metas: dict[int, dict]) -> dict:
    """Provenance of the input feature tables (SAE, model, config hash) keyed by layer."""
    return {str(layer): {k: v for k, v in meta.items() if k != "kind"} for layer, meta in metas.items()}


def run_overlap(config: dict, prompts_path, feature_paths: dict[int, str]) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """(per-layer summary, per-pair table, metadata) of the overlap stage."""
    fcfg, pcfg, boot = config["features"], config["prompts"], config["bootstrap"]
    k = fcfg["overlap"]["k"]
    prompts = load_prompt_frame(prompts_path, config)
    pairs = prompt_pairs(prompts, pcfg["buggy_format"], pcfg["correct_format"])
    pairs = pairs.join(prompts.select("question_id", "order").unique(), on="question_id", how="left")
    pairing_seed = derived_seed(config["seed"], 3)
    couples = baseline_couples(pairs, pcfg["buggy_format"], pcfg["correct_format"], pairing_seed)
    # The held-out rows' own baselines: couples among the held-out pairs only, so that no statistic
    # of a per_pair_heldout row reads a selection pair (features.overlap.HELDOUT_VARIANT).
    heldout_couples = baseline_couples(pairs.filter(~is_selection_pair(pl.col("pair_id"))), pcfg["buggy_format"],
                                       pcfg["correct_format"], pairing_seed)
    weights = position_weights(prompts, fcfg["position"])
    single = original_single_pair(prompts_path, config, pairs)
    at_prompt_last = position_weights(prompts, "prompt_last")
    per_pair, pooled, baselines, heldout_baselines, originals, metas = [], [], [], [], [], {}
    for layer, path in sorted(feature_paths.items()):
        values, metas[layer] = load_layer_values(path, weights, config)
        if single.height:
            originals.append({"layer": layer, **pooled_overlap(load_layer_values(path, at_prompt_last, config)[0],
                                                               single, k)})
        layer_pairs = pair_overlap(values, pairs, k)
        short = layer_pairs.select((pl.min_horizontal("n_top_buggy", "n_top_correct") < k).mean()).item() or 0.0
        if short > 0.5:
            log.warning("layer %d: %.0f%% of the pairs have a top-k set with fewer than k=%d active features (SAE L0 "
                        "below k?); overlap_pct = shared / k is then capped below 100 (jaccard is not).", layer,
                        100 * short, k)
        per_pair.append(layer_pairs.with_columns(pl.lit(layer, pl.Int32).alias("layer")))
        pooled.append({"layer": layer, **pooled_overlap(values, pairs, k)})
        baselines.append(baseline_overlap(values, couples, k).with_columns(pl.lit(layer, pl.Int32).alias("layer")))
        heldout_baselines.append(baseline_overlap(values, heldout_couples, k).with_columns(
            pl.lit(layer, pl.Int32).alias("layer")))
    per_pair = pl.concat(per_pair).select("layer", pl.exclude("layer"))
    summary = summarise_overlap(
        per_pair, pl.DataFrame(pooled), k=k, num_layers=config["model"]["num_layers"],
        middle_fraction=fcfg["overlap"]["middle_fraction"], n_resamples=boot["n_resamples"],
        confidence=boot["confidence"], seed=derived_seed(config["seed"], 1), baselines=pl.concat(baselines),
        original_single_pair=pl.DataFrame(originals) if originals else None,
        heldout_baselines=pl.concat(heldout_baselines))
    meta = {"position": fcfg["position"], "k": k, "confidence": boot["confidence"],
            "n_resamples": boot["n_resamples"], "buggy_format": pcfg["buggy_format"],
            "correct_format": pcfg["correct_format"], "bootstrap_unit": "pair_id",
            "baseline_pairing_seed": pairing_seed, "sources": source_provenance(metas),
            "heldout_split": "per_pair_heldout: marks chosen on the even pair ids, statistics on the odd ones"}
    return summary, per_pair, meta


def run_discriminative(config: dict, prompts_path, scores_path, feature_paths: dict[int, str]) -> tuple[pl.DataFrame, dict]:
    fcfg, pcfg = config["features"], config["prompts"]
    prompts = load_prompt_frame(prompts_path, config)
    pairs = prompt_pairs(prompts, pcfg["buggy_format"], pcfg["correct_format"])
    weights = position_weights(prompts, fcfg["position"])
    scores = tables.frame(tables.BASELINE_SCORES, config, scores_path, columns=["prompt_id", "is_correct"])
    out, metas = [], {}
    for layer, path in sorted(feature_paths.items()):
        values, metas[layer] = load_layer_values(path, weights, config)
        out.append(discriminative_features(values, pairs, scores, layer=layer, cfg=fcfg["discriminative"],
                                           boot={**config["bootstrap"], "seed": derived_seed(config["seed"], layer)}))
    meta = {"position": fcfg["position"], **{k: v for k, v in fcfg["discriminative"].items()},
            "a_b": {"buggy_vs_correct": [pcfg["buggy_format"], pcfg["correct_format"]],
                    "buggy_vs_correct_heldout": "ranked on the pairs with an even pair_id; heldout_mean_* and heldout_firing_rate_* on the others",
                    "wrong_vs_right": [f"{pcfg['buggy_format']} answered wrong", f"{pcfg['buggy_format']} answered right"]},
            "sources": source_provenance(metas)}
    return pl.concat(out, how="vertical_relaxed"), meta


# Named features of a set whose config names none: this many top features per direction and layer.
RUN_NAMED_TOP_N = 5


def run_named_ids(discriminative: pl.DataFrame, top_n: int = RUN_NAMED_TOP_N) -> dict[int, dict[str, list[int]]]:
    """{layer: {buggy_format_up: ids, correct_format_up: ids}}: the top-ranked features of this run's
    buggy-vs-correct comparison (all pairs), so no config line names a latent of another host's SAEs."""
    rows = discriminative.filter(pl.col("comparison") == "buggy_vs_correct", pl.col("rank") < top_n).sort(
        "layer", "direction", "rank")
    out: dict[int, dict[str, list[int]]] = {}
    for (layer, direction), part in rows.group_by("layer", "direction", maintain_order=True):
        category = "buggy_format_up" if direction == "up" else "correct_format_up"
        out.setdefault(int(layer), {})[category] = [int(f) for f in part["feature_id"].to_list()]
    return out


def run_named(config: dict, prompts_path, feature_paths: dict[int, str],
              discriminative_path=None) -> tuple[pl.DataFrame, dict]:
    """The named-feature table: the set's configured ids, or (none configured) this run's top
    buggy-vs-correct features of each layer (`run_named_ids`)."""
    fcfg, pcfg, boot = config["features"], config["prompts"], config["bootstrap"]
    named = named_feature_ids(config["sae_set"]["named"])
    source = "config"
    if not named and discriminative_path is not None:
        named = run_named_ids(tables.frame(tables.DISCRIMINATIVE_FEATURES, config, discriminative_path))
        source = f"this run's discriminative table (top {RUN_NAMED_TOP_N} per direction, all pairs)"
    prompts = load_prompt_frame(prompts_path, config)
    pairs = prompt_pairs(prompts, pcfg["buggy_format"], pcfg["correct_format"])
    weights = position_weights(prompts, fcfg["position"])
    out, metas = [pl.DataFrame(schema=NAMED_SCHEMA)], {}
    for layer, path in sorted(feature_paths.items()):
        if layer not in named:
            continue
        values, metas[layer] = load_layer_values(path, weights, config)
        d_sae = metas[layer].get("d_sae")
        too_big = [f for ids in named[layer].values() for f in ids if d_sae is not None and f >= d_sae]
        if too_big:
            raise ValueError(f"SAE set {config['sae_set']['name']!r} names features {too_big} at layer {layer}, out "
                             f"of range for its SAE (d_sae={d_sae}). These ids belong to another SAE: fix the set's "
                             "named features (sae.sets[].named).")
        out.append(named_features(values, pairs, layer=layer, named=named[layer], n_resamples=boot["n_resamples"],
                                  confidence=boot["confidence"], seed=derived_seed(config["seed"], 2, layer)))
    meta = {"position": fcfg["position"], "confidence": boot["confidence"], "n_resamples": boot["n_resamples"],
            "named": {str(k): v for k, v in named.items()}, "named_source": source,
            "sources": source_provenance(metas)}
    return pl.concat(out, how="vertical_relaxed").cast(NAMED_SCHEMA), meta


def run_attribution(config: dict, model, tokenizer, prompts_path, discriminative_path,
                    sae_dirs: dict[int, str]) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """(attribution table, parity table, metadata) for the layers of `sae_dirs`."""
    # Imported here: the other stages, light jobs, never load torch or SAE-Lens.
    from sae_lens import SAE

    from bugscope.features.attribution import (
        attribute_layer,
        attribution_features,
        parity_rows,
        summarise_attribution,
    )
    from bugscope.model.capture import capture_decision
    from bugscope.model.load import pick_device
    from bugscope.model.sites import hook_name

    fcfg, pcfg = config["features"], config["prompts"]
    buggy, correct = pcfg["buggy_format"], pcfg["correct_format"]
    prompts = tables.frame(tables.PROMPTS, config, prompts_path)
    prompts = prompts.filter(pl.col("format").is_in([buggy, correct]), pl.col("pair_kind") == BUG_PAIR_KIND)
    discriminative = tables.frame(tables.DISCRIMINATIVE_FEATURES, config, discriminative_path)
    named = named_feature_ids(config["sae_set"]["named"])
    layers = sorted(sae_dirs)
    site = config["sae_set"]["site"]
    n_heads = model.config.num_attention_heads
    ids, caps = capture_decision(model, prompts.to_dicts(), layers=layers, batch_size=config["cache"]["batch_size"],
                                 pad_token_id=tokenizer.pad_token_id)
    formats = pl.DataFrame({"prompt_id": ids.astype(np.int32)}).join(
        prompts.select("prompt_id", "format"), on="prompt_id", how="left", maintain_order="left")["format"].to_numpy()
    device = pick_device(config["device"])
    per_layer, parity, errors, sae_meta = [], [], {}, {}
    for layer in layers:
        feats, sources = attribution_features(discriminative, named, layer, fcfg["attribution"]["n_features"])
        if not feats:
            log.warning("layer %d: no discriminative or named features to attribute", layer)
            continue
        sae = SAE.load_from_disk(sae_dirs[layer], device=str(device)).eval()
        hook = hook_name(layer, site)
        sae_hook = getattr(sae.cfg.metadata, "hook_name", None)
        if (sae_hook and sae_hook != hook) or sae.cfg.d_in != model.config.hidden_size:
            raise ValueError(f"{sae_dirs[layer]} holds an SAE for {sae_hook} with d_in={sae.cfg.d_in}, but layer {layer} "
                             f"needs one for {hook} with d_in={model.config.hidden_size}: rerun the SAE stage.")
        sae_meta[str(layer)] = {"path": str(sae_dirs[layer]), "architecture": sae.cfg.architecture(),
                                "d_sae": sae.cfg.d_sae, "normalize_activations": sae.cfg.normalize_activations}
        res = attribute_layer(model, layer, sae, caps.pop(layer), feats, n_heads=n_heads, site=site)
        scale = float(res["pre"].abs().max()) if res["pre"].numel() else 0.0
        errors[str(layer)] = {"identity_error": res["identity_error"], "attn_identity_error": res["attn_identity_error"],
                              "pre_activation_scale": scale}
        log.info("layer %d: %d features; identity error %.2e (attention part %.2e) at pre-activation scale %.2f",
                 layer, len(feats), res["identity_error"], res["attn_identity_error"], scale)
        table = summarise_attribution(res, layer=layer, feature_ids=feats, sources=sources, formats=formats)
        per_layer.append(table)
        parity.append(parity_rows(table, layer=layer, buggy_format=buggy, correct_format=correct,
                                  n_permutations=fcfg["attribution"]["n_permutations"], seed=config["seed"]))
        del sae
    if not per_layer:
        raise ValueError("No layer had features to attribute: check the discriminative table and the set's named features.")
    meta = {"position": "decision", "site": site, "buggy_format": buggy, "correct_format": correct, "n_heads": n_heads,
            "identity": errors, "saes": sae_meta, "n_permutations": fcfg["attribution"]["n_permutations"]}
    return pl.concat(per_layer), pl.concat(parity), meta
