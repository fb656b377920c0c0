import polars as pl

from bugscope import claims
from bugscope.config import stage_hash
from bugscope.features import focus_layers
from bugscope.io import atomic_path, read_table, write_table
from bugscope.script import log, run


def main(smk):
    ledger = claims.load_ledger(smk.input.ledger)
    names = [k for k in smk.input.keys() if k in claims.TABLES]
    raw = {name: pl.from_arrow(read_table(smk.input[name], kind=claims.TABLES[name].kind,
                                                     config_hash=stage_hash(smk.config, claims.TABLES[name].stage))[0]) for name in names}
    prompts = pl.from_arrow(read_table(smk.input.prompts, kind="prompts", config_hash=stage_hash(smk.config, "prompts"), columns=["prompt_id", "correct", "wrong"])[0])
    tables = claims.prepare_tables(raw, prompts)
    overlap = tables.get("feature_overlap")
    focus = focus_layers(smk.config, overlap) if (overlap is not None or smk.config["focus_layers"] != "auto") else None
    ctx = claims.Context.from_config(smk.config, focus)
    result = claims.evaluate(ledger, tables, ctx)
    meta = {"kind": claims.CLAIMS_KIND, "model": smk.config["model"]["name"], "focus_layers": focus,
            "tables": names, "ledger": str(smk.input.ledger)}
    write_table(result.to_arrow(), smk.output.claims, meta)
    title = f"Claims ledger: the seed's claims on {smk.config['model']['name']}"
    with atomic_path(smk.output.markdown) as tmp:
        tmp.write_text(claims.to_markdown(result, title))
    with atomic_path(smk.output.html) as tmp:
        tmp.write_text(claims.to_html(result, title))
    log.info("claims ledger (tables: %s, focus layers: %s):\n%s", names, focus,
             result.select("claim_id", "verdict", "form", "measured"))


run(snakemake, main)  # noqa: F821
