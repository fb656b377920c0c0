from bugscope import tables
from bugscope.config import with_sae_set
from bugscope.features.stages import run_overlap
from bugscope.run.script import log, run


def main(smk):
    cfg = with_sae_set(smk.config, smk.params.sae_set)
    summary, per_pair, meta = run_overlap(cfg, smk.input.prompts, dict(zip(smk.params.layers, smk.input.features)))
    meta = {"config_hash": smk.params.config_hash, "seed": cfg["seed"], "model": cfg["model"]["name"],
            "sae_set": smk.params.sae_set, **meta}
    with tables.written_together() as put:
        put(tables.FEATURE_OVERLAP_PAIRS, per_pair, smk.output.pairs, meta)
        put(tables.FEATURE_OVERLAP, summary, smk.output.overlap, meta)
    log.info("overlap per layer:\n%s", summary.select("layer", "variant", "overlap_pct", "overlap_pct_low",
                                                       "overlap_pct_high", "is_min_overlap", "is_max_overlap_middle"))


run(snakemake, main)  # noqa: F821
