import polars as pl
import pyarrow.parquet as pq

from bugscope.claims import report
from bugscope.io import atomic_path, read_metadata
from bugscope.run.script import run


def main(smk):
    meta = read_metadata(smk.input.table)
    table = pl.from_arrow(pq.read_table(smk.input.table))
    caption = f"{smk.input.table} (kind {meta.get('kind')}, model {meta.get('model', '?')}, config hash {meta.get('config_hash', '?')})"
    with atomic_path(smk.output[0]) as tmp:
        tmp.write_text(report.table_html(table, smk.wildcards.name.replace("_", " "), caption))


run(snakemake, main)  # noqa: F821
