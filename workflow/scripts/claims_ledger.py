import hashlib
from pathlib import Path

import polars as pl

from bugscope import tables
from bugscope.claims import report, truth
from bugscope.claims.evaluate import Context, evaluate, prepare_tables
from bugscope.claims.spec import TABLES, load_expected_preconditions, load_ledger
from bugscope.config import primary_sae_set
from bugscope.focus import focus_frequencies, focus_layers
from bugscope.io import atomic_path
from bugscope.run.script import log, run


def read_table(smk, name: str) -> pl.DataFrame:
    """One table as the ledger reads it: a per-set table is every set's file, with the set's name
    in a `sae_set` column (a set whose site the stage does not run on has no file)."""
    paths, sets = smk.input[name], smk.params.table_sets[name]
    paths = [paths] if isinstance(paths, str) else list(paths)
    frames = [tables.frame(TABLES[name], smk.config, path) for path in paths]
    if sets == [None]:
        return frames[0]
    return pl.concat([f.with_columns(pl.lit(s).alias("sae_set")) for f, s in zip(frames, sets)], how="diagonal_relaxed")


def main(smk):
    ledger = load_ledger(smk.input.ledger)
    names = [k for k in smk.input.keys() if k in TABLES and smk.params.table_sets[k]]
    raw = {name: read_table(smk, name) for name in names}
    prompts = tables.frame(tables.PROMPTS, smk.config, smk.input.prompts, columns=["prompt_id", "correct", "wrong"])
    prepared = prepare_tables(raw, prompts)
    overlap = prepared.get("feature_overlap")
    if overlap is not None:
        overlap = overlap.filter(pl.col("sae_set") == primary_sae_set(smk.config))
    focus = focus_layers(smk.config, overlap) if (overlap is not None or smk.config["focus_layers"] != "auto") else None
    ctx = Context.from_config(smk.config, focus, focus_frequencies(overlap))
    result = evaluate(ledger, prepared, ctx)
    # The ledger by name and content, not by where this checkout happens to live: two clones agree.
    ledger_file = Path(smk.input.ledger)
    meta = {"model": smk.config["model"]["name"], "focus_layers": focus, "focus_choice": ctx.focus_choice,
            "tables": names, "ledger": ledger_file.name,
            "ledger_sha256": hashlib.sha256(ledger_file.read_bytes()).hexdigest()}
    role = smk.config["claims"]["expectations"]
    expected = truth.expected_verdicts(ledger, load_expected_preconditions(smk.input.ledger), role)
    ground_truth = truth.ground_truth(result, expected)
    with tables.written_together() as put:
        put(tables.CLAIMS, result, smk.output.claims, meta)
        put(tables.CLAIMS_TRUTH, ground_truth, smk.output.truth, {**meta, "expectations": role})
    model = f"{smk.config['model']['name']}{' + planted bug' if role == 'organism' else ''}"
    title = f"Claims ledger: the seed's claims on {model}"
    with atomic_path(smk.output.markdown) as tmp:
        tmp.write_text(report.to_markdown(result, title) + truth.to_markdown(ground_truth, role))
    with atomic_path(smk.output.html) as tmp:
        tmp.write_text(report.to_html(result, title, truth.to_html(ground_truth, role)))
    log.info("claims ledger (tables: %s, focus layers: %s):\n%s\nground truth (%s): %s", names, focus,
             result.select("claim_id", "verdict", "form", "measured"), role, truth.summary(ground_truth))


run(snakemake, main)  # noqa: F821
