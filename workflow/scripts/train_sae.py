import torch

from bugscope import tables
from bugscope.config import with_sae_set
from bugscope.corpus import split_ids
from bugscope.model import ModelManifest, pick_device
from bugscope.sae import (
    ActivationSource,
    ActivationStream,
    check_sae_fits,
    save_sae,
    train_topk_sae,
)
from bugscope.script import log, run
from bugscope.sites import hook_name
from bugscope.stats import layer_seed


def main(smk):
    cfg = with_sae_set(smk.config, smk.params.sae_set)
    sae_cfg = cfg["sae"]
    manifest = ModelManifest.load(smk.input.manifest)
    corpus, corpus_meta = tables.read(tables.CORPUS, cfg, smk.input.corpus, columns=["prompt_id", "split"])
    train_ids = split_ids(corpus, "train")
    device = str(pick_device(cfg["device"]))
    trained = []
    for acts_path in smk.input.activations:
        tables.check(tables.CORPUS_ACTIVATIONS, cfg, acts_path)
    for layer, acts_path in zip(smk.params.layers, smk.input.activations):
        hook = hook_name(layer, cfg["sae_set"]["site"])
        seed = layer_seed(cfg["seed"], layer)
        stream = ActivationStream([ActivationSource(acts_path, prompt_ids=train_ids)],
                                  batch_size=sae_cfg["batch_size"], seed=seed, device=device)
        result = train_topk_sae(stream, d_in=manifest.d_model, layer=layer, hook=hook, sae_cfg=sae_cfg,
                                seed=seed, device=device, model_name=manifest.name)
        check_sae_fits(result.sae, expected_hook=hook, d_model=manifest.d_model, where=f"trained SAE for layer {layer}")
        log.info("layer %d: %d steps, %d token-steps, training L0 %.1f, dead fraction %.3f", layer, result.n_steps,
                 result.n_tokens, result.train_l0 or float("nan"), result.train_dead_fraction or 0.0)
        trained.append((layer, hook, result))
    # Every SAE of the group is trained before any is written: a failure leaves no partial outputs.
    for (layer, hook, result), out_dir in zip(trained, smk.output.saes):
        sae = result.sae.to(dtype=getattr(torch, sae_cfg["dtype"]))
        sae.cfg.dtype = sae_cfg["dtype"]
        save_sae(sae, out_dir, {
            "sae_set": cfg["sae_set"]["name"], "source": "train", "release": None, "sae_id": None, "hook_name": hook, "layer": layer,
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
