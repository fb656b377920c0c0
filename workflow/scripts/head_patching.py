"""Rules head_sweep_<group>, head_subsets and head_original_method: patched logit differences per prompt.

mode (params.mode):
- sweep: all / even / odd / single heads and the ceiling (the whole residual stream) at the layers
  of one layer group;
- subsets: random k-subsets of the even, odd and all heads at the focus layers, always including
  the random-head control (all-head subsets as large as the even and the odd pool);
- original_method: the seed's procedure (post-o_proj slices, positions [:min_len]) and true per-head
  patching (configured positions, and aligned positions if those differ) of the all / even / odd
  head sets at the focus layers, on the same prompts; also writes their summary.
"""

import polars as pl

from bugscope import tables
from bugscope.focus import resolve_focus_layers
from bugscope.model.load import ModelManifest, load_model
from bugscope.model.sites import HEAD_SITE
from bugscope.patching.head_sets import CEILING, named_head_sets, random_control_sets, subset_head_sets
from bugscope.patching.pairs import ORIGINAL_METHOD, PatchSpec
from bugscope.patching.study import patcher_from_config, run_study_sweep, spec_from_config
from bugscope.patching.summary import summary_table
from bugscope.run.script import log, run


def main(smk):
    cfg = smk.config
    pc = cfg["patching"]
    mode = smk.params.mode
    manifest = ModelManifest.load(smk.input.manifest)
    prompts = tables.frame(tables.PROMPTS, smk.config, smk.input.prompts)
    spec, target, source = spec_from_config(cfg)
    meta = {"config_hash": smk.params.config_hash, "seed": cfg["seed"], "mode": mode,
            "positions": pc["positions"], "operation": pc["operation"], "direction": pc["direction"],
            **manifest.provenance()}

    if mode == "sweep":
        layers = list(smk.params.layers)
        meta["layers"] = layers
    else:
        overlap = None
        if "overlap" in smk.input.keys():
            overlap = tables.frame(tables.FEATURE_OVERLAP, smk.config, smk.input.overlap)
        layers, focus_source = resolve_focus_layers(cfg, overlap)
        meta.update(focus_layers=layers, focus_layer_source=focus_source)
        log.info("focus layers %s (from %s)", layers, focus_source)

    model, tokenizer = load_model(manifest, cfg["device"])
    patcher = patcher_from_config(model, cfg, tokenizer.pad_token_id)
    n_heads = manifest.num_heads
    common = {"target_format": target, "source_format": source, "direction": pc["direction"]}

    if mode == "sweep":
        # The ceiling (the whole residual stream) needs a source to copy from.
        ceiling = [CEILING] if spec.operation == "patch" else []
        sets = {layer: named_head_sets(n_heads) + ceiling for layer in layers}
        table = run_study_sweep(patcher, prompts, sets, spec, desc=f"head sweep {smk.params.group}", **common)
    elif mode == "subsets":
        sub = pc["subsets"]
        sets = {}
        for layer in layers:
            drawn = subset_head_sets(n_heads, pools=sub["pools"], sizes=sub["sizes"],
                                              samples=sub["samples"], seed=cfg["seed"], layer=layer)
            control = random_control_sets(n_heads, samples=sub["samples"], seed=cfg["seed"], layer=layer)
            names = {s.name for s in drawn}
            sets[layer] = drawn + [s for s in control if s.name not in names]
        meta["subset_seed"] = cfg["seed"]
        meta["n_head_sets"] = {str(k): len(v) for k, v in sets.items()}
        table = run_study_sweep(patcher, prompts, sets, spec, desc="head subsets", **common)
    else:
        if pc["operation"] != "patch":
            log.info("the original method only patches; it runs with operation 'patch' beside per-head '%s'", pc["operation"])
        # all / even / odd: the seed's head sets (single heads are in the sweep); two of the three
        # methods here run every position, so this keeps the comparison cheap.
        sets = {layer: [s for s in named_head_sets(n_heads) if s.family != "single"] for layer in layers}
        specs = [spec]
        if spec.positions != "aligned":
            specs.append(PatchSpec(site=HEAD_SITE, positions="aligned", operation=spec.operation))
        specs.append(ORIGINAL_METHOD)
        with patcher.reusing_records():  # the three methods patch the same targets
            table = pl.concat([
                run_study_sweep(patcher, prompts, sets, s, desc=f"{s.method} ({s.positions})", **common)
                for s in specs])
        boot = cfg["bootstrap"]
        summary = summary_table(table, n_resamples=boot["n_resamples"], confidence=boot["confidence"],
                                         seed=cfg["seed"])
        shown = summary.filter(pl.col("family") != "single").select(
            "method", "positions", "layer", "head_set", "success_rate", "success_low", "success_high",
            "broken_rate", "mean_logit_diff")
        log.info("original method vs per-head:\n%s", shown)

    declared = {"sweep": tables.PATCHING_SWEEP_GROUP, "subsets": tables.PATCHING_SUBSETS_PROMPTS,
                "original_method": tables.PATCHING_ORIGINAL_METHOD_PROMPTS}[mode]
    with tables.written_together() as put:
        if mode == "original_method":
            put(tables.PATCHING_ORIGINAL_METHOD, summary, smk.output.summary, meta)
        put(declared, table, smk.output.prompts, meta)
    log.info("wrote %d rows (%d head sets x %d prompts)", table.height,
             table.select("method", "positions", "layer", "head_set").n_unique(), table["prompt_id"].n_unique())


run(snakemake, main)  # noqa: F821
