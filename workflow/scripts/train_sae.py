import torch

from bugscope import tables
from bugscope.config import with_sae_set
from bugscope.data.corpus import split_ids
from bugscope.model.load import ModelManifest, pick_device
from bugscope.model.sites import hook_name
from bugscope.run.script import log, run
from bugscope.sae.activations import ActivationSource
from bugscope.sae.store import check_sae_fits, save_sae
from bugscope.sae.train import LayerTraining, train_layers
from bugscope.stats import layer_seed


def main(smk):
    cfg = with_sae_set(smk.config, smk.params.sae_set)
    sae_cfg = cfg["sae"]
    manifest = ModelManifest.load(smk.input.manifest)
    corpus, corpus_meta = tables.read(tables.CORPUS, cfg, smk.input.corpus, columns=["prompt_id", "split"])
    train_ids = split_ids(corpus, "train")
    device = str(pick_device(cfg["device"]))
    for acts_path in smk.input.activations:
        tables.check(tables.CORPUS_ACTIVATIONS, cfg, acts_path)
    jobs = [LayerTraining(layer, hook_name(layer, cfg["sae_set"]["site"]),
                          ActivationSource(acts_path, prompt_ids=train_ids), layer_seed(cfg["seed"], layer))
            for layer, acts_path in zip(smk.params.layers, smk.input.activations)]

    def done(job, result):
        check_sae_fits(result.sae, expected_hook=job.hook, d_model=manifest.d_model,
                       where=f"trained SAE for layer {job.layer}")
        log.info("layer %d: %d steps, %d token-steps, training L0 %.1f, dead fraction %.3f", job.layer,
                 result.n_steps, result.n_tokens, result.train_l0 or float("nan"), result.train_dead_fraction or 0.0)

    results = train_layers(jobs, d_in=manifest.d_model, sae_cfg=sae_cfg, device=device, model_name=manifest.name,
                           workers=smk.threads, on_done=done)
    # Every SAE of the group is trained before any is written: a failure leaves no partial outputs.
    for job, result, out_dir in zip(jobs, results, smk.output.saes):
        sae = result.sae.to(dtype=getattr(torch, sae_cfg["dtype"]))
        sae.cfg.dtype = sae_cfg["dtype"]
        save_sae(sae, out_dir, {
            "sae_set": cfg["sae_set"]["name"], "source": "train", "release": None, "sae_id": None, "hook_name": job.hook, "layer": job.layer,
            "d_in": manifest.d_model, "d_sae": result.sae.cfg.d_sae, "architecture": "topk", "seed": result.seed,
            "config_hash": smk.params.config_hash, "corpus": corpus_meta["corpus"],
            "heldout_pair_ids": corpus_meta["heldout_pair_ids"],
            "training": {"k": sae_cfg["k"], "expansion": sae_cfg["expansion"], "lr": sae_cfg["lr"],
                         "batch_size": sae_cfg["batch_size"], "n_steps": result.n_steps,
                         "training_tokens": result.n_tokens, "train_l0": result.train_l0,
                         "train_dead_fraction": result.train_dead_fraction, **result.extra,
                         "excluded_positions": [0], "trainer": "sae_lens.SAETrainer"},
            **manifest.provenance(),
        })


run(snakemake, main)  # noqa: F821
