from bugscope.config import with_sae_set
from bugscope.model.load import ModelManifest, pick_device
from bugscope.model.sites import hook_name
from bugscope.run.script import log, run
from bugscope.sae.store import check_sae_fits, load_pretrained_sae, save_sae


def main(smk):
    cfg = with_sae_set(smk.config, smk.params.sae_set)
    sae_cfg, sae_set = cfg["sae"], cfg["sae_set"]
    manifest = ModelManifest.load(smk.input.manifest)
    device = str(pick_device(cfg["device"]))
    for layer, sae_id, out_dir in zip(smk.params.layers, smk.params.sae_ids, smk.output.saes):
        hook = hook_name(layer, sae_set["site"])
        sae, hub = load_pretrained_sae(sae_set["release"], sae_id, device=device, dtype=sae_cfg["dtype"])
        where = f"SAE-Lens release {sae_set['release']!r}, id {sae_id!r}"
        check_sae_fits(sae, expected_hook=hook, d_model=manifest.d_model, where=where)
        if hub["sae_revision"] is None:
            log.warning("%s: the commit of %s it came from is unknown (not in the local cache's refs/main); "
                        "its provenance records sae_revision: null", where, hub["sae_repo_id"])
        if sae.cfg.metadata.model_name and sae.cfg.metadata.model_name != manifest.name:
            log.warning("%s was trained on %s; it is applied to %s", where, sae.cfg.metadata.model_name, manifest.name)
        save_sae(sae, out_dir, {
            "sae_set": sae_set["name"], "source": "pretrained", "release": sae_set["release"], "sae_id": sae_id, "hook_name": hook,
            "layer": layer, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "architecture": sae.cfg.architecture(),
            "sae_model_name": sae.cfg.metadata.model_name, "config_hash": smk.params.config_hash,
            **hub, **manifest.provenance(),
        })
        log.info("layer %d: %s (%s, d_sae %d; %s@%s) saved to %s", layer, sae_id, sae.cfg.architecture(), sae.cfg.d_sae,
                 hub["sae_repo_id"], hub["sae_revision"], out_dir)
        del sae


run(snakemake, main)  # noqa: F821
