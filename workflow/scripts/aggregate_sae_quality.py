import polars as pl
import pyarrow as pa

from bugscope.io import read_table, write_table
from bugscope.sae_quality import QUALITY_KIND
from bugscope.script import log, run


def main(smk):
    tables = [read_table(path, kind=QUALITY_KIND, config_hash=smk.params.config_hash) for path in smk.input.quality]
    table = pa.concat_tables([t for t, _ in tables]).sort_by("layer")
    meta = {k: v for k, v in tables[0][1].items() if k not in ("kind", "layer", "hook_name", "sae")}
    meta["saes"] = {str(m["layer"]): m.get("sae") for _, m in tables}
    write_table(table, smk.output.quality, {**meta, "kind": QUALITY_KIND})
    with pl.Config(tbl_rows=-1):
        log.info("SAE quality:\n%s", pl.from_arrow(table).select(
            "layer", "ev_prompts", "ev_corpus", "l0_corpus", "dead_fraction", "delta_logit_diff"))


run(snakemake, main)  # noqa: F821
