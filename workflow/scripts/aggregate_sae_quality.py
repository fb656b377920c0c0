import polars as pl
import pyarrow as pa

from bugscope import tables
from bugscope.script import log, run


def main(smk):
    layers = [tables.read(tables.SAE_QUALITY_LAYER, smk.config, path) for path in smk.input.quality]
    table = pa.concat_tables([t for t, _ in layers]).sort_by("layer")
    meta = {k: v for k, v in layers[0][1].items() if k not in ("kind", "layer", "hook_name", "sae")}
    meta["saes"] = {str(m["layer"]): m.get("sae") for _, m in layers}
    tables.write(tables.SAE_QUALITY, table, smk.output.quality, meta)
    with pl.Config(tbl_rows=-1):
        log.info("SAE quality:\n%s", pl.from_arrow(table).select(
            "layer", "ev_prompts", "ev_corpus", "l0_corpus", "dead_fraction", "delta_logit_diff"))


run(snakemake, main)  # noqa: F821
