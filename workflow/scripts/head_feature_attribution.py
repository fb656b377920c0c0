from bugscope import tables
from bugscope.config import with_sae_set
from bugscope.features.stages import run_attribution
from bugscope.model.load import ModelManifest, load_model
from bugscope.run.script import log, run


def main(smk):
    cfg = with_sae_set(smk.config, smk.params.sae_set)
    manifest = ModelManifest.load(smk.input.manifest)
    model, tokenizer = load_model(manifest, cfg["device"])
    table, parity, meta = run_attribution(cfg, model, tokenizer, smk.input.prompts, smk.input.discriminative,
                                          dict(zip(smk.params.layers, smk.input.saes)))
    meta = {"config_hash": smk.params.config_hash, "seed": cfg["seed"], "sae_set": smk.params.sae_set,
            **manifest.provenance(), **meta}
    with tables.written_together() as put:
        put(tables.HEAD_FEATURE_ATTRIBUTION, table, smk.output.attribution, meta)
        put(tables.HEAD_PARITY, parity, smk.output.parity, meta)
    log.info("parity (eta^2 over all attributed features):\n%s",
             parity.filter(parity["statistic"] == "eta_squared"))


run(snakemake, main)  # noqa: F821
