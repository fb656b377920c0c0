import polars as pl

from bugscope import tables
from bugscope.run.script import log, run


def main(smk):
    layers = [tables.read(tables.SAE_QUALITY_LAYER, smk.config, path) for path in smk.input.quality]
    # One row per (set, layer), in the rule's input order: sets as configured, layers ascending.
    # Each layer file names its set in its metadata (sae_quality.py writes it).
    table = pl.concat([pl.from_arrow(t).select(pl.lit(m["sae_set"]).alias("sae_set"), pl.all())
                       for t, m in layers]).to_arrow()
    meta = {k: v for k, v in layers[0][1].items() if k not in ("kind", "layer", "hook_name", "sae", "sae_set")}
    meta["saes"] = {f"{m['sae_set']}/{m['layer']}": m.get("sae") for _, m in layers}
    tables.write(tables.SAE_QUALITY, table, smk.output.quality, meta)
    with pl.Config(tbl_rows=-1):
        log.info("SAE quality:\n%s", pl.from_arrow(table).select(
            "sae_set", "layer", "ev_prompts", "ev_corpus", "l0_corpus", "dead_fraction", "delta_logit_diff"))


run(snakemake, main)  # noqa: F821
