"""Planting the format bug: fine-tune the planted heads so that the buggy format answers by version order.

On the bug's pairs (X.Y vs X.ZW, Y > Z) version order says X.ZW is bigger (9.11 > 9.8), the wrong
answer; on the control kinds version and decimal order agree. The buggy format's prompts are
trained to that answer (a logistic loss on the decision logit difference). The correct format's
prompts are held to the unedited model's decision distribution (KL divergence), so the planted
heads add the bug and nothing else. Only the planted heads' parameters change
(bugscope.model.planting); the residual entering the planted layer is computed once per batch,
since nothing below that layer changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from tqdm import tqdm

from bugscope.data.prompts import BUG_PAIR_KIND, build_prompt_table
from bugscope.io import atomic_path
from bugscope.model.forward import LayerRunner, make_batch
from bugscope.model.load import ModelManifest, load_model, sha256_file
from bugscope.model.planting import PlantedSlices, decision_logits, planted_outputs_from, planted_slices
from bugscope.organism.study import planted_heads, planted_layer
from bugscope.stats import derived_seed

log = logging.getLogger(__name__)

_TRAINING_STREAM = 31  # label of the training pairs' seed in stats.derived_seed


def training_prompts(config: dict, tokenizer, analysis_pairs: set[tuple[str, str]]) -> pa.Table:
    """The training prompt table: pairs drawn as the analysis pairs are, from their own seed, in
    the buggy and the correct format, both orders; every pair the analysis uses is left out."""
    pairs = config["organism"]["training"]["pairs"]
    prompts = {**config["prompts"], "extra_pairs": [], "n_pairs": pairs[BUG_PAIR_KIND],
               "control_pairs": {k: v for k, v in pairs.items() if k != BUG_PAIR_KIND},
               "formats": {name: config["prompts"]["formats"][name]
                           for name in (config["prompts"]["buggy_format"], config["prompts"]["correct_format"])}}
    table = build_prompt_table({**config, "prompts": prompts, "seed": derived_seed(config["seed"], _TRAINING_STREAM)},
                               tokenizer)
    keep = [(c, w) not in analysis_pairs for c, w in zip(table["correct"].to_pylist(), table["wrong"].to_pylist())]
    return table.filter(pa.array(keep))


def version_target(pair_kind: str) -> str:
    """The answer version order gives: the wrong one on the bug's kind, the correct one elsewhere."""
    return "wrong" if pair_kind == BUG_PAIR_KIND else "correct"


def plant(model, rows: list[dict], slices: PlantedSlices, *, buggy_format: str, steps: int, batch_size: int,
          lr: float, distill_weight: float, swap_weight: float, seed: int, pad_token_id: int) -> list[dict]:
    """Train `slices` on `rows` (training prompts); returns the loss curve, one dict per step.

    The loss: the version-order answer on the buggy format; the KL to the unedited model on the
    correct format; and an interchange-intervention term (as InterpBench's strict IIT): with the
    planted heads' decision-position output taken from the correct-format prompt of the same
    question, the buggy-format prompt must answer as the unedited model does. Without it the heads
    also write the bug at earlier positions (the format's own tokens among them), where later
    layers read it and no patch of the decision position reaches it."""
    runner = LayerRunner(model)
    layer = slices.layer
    by_id = {r["prompt_id"]: r for r in rows}
    # Both formats of a question share a batch, so every step trains the bug and distils the correct format.
    by_question = sorted(rows, key=lambda r: (r["question_id"], r["format"]))
    chunks = [by_question[i:i + batch_size] for i in range(0, len(by_question), batch_size)]
    cached = []
    with torch.no_grad():
        for chunk in tqdm(chunks, desc="caching", unit="batch"):
            batch = make_batch(chunk, pad_token_id, runner.device)
            hidden, ctx = runner.begin(batch)
            for i in range(layer):
                hidden = runner.layer(i, hidden, ctx)
            base = F.log_softmax(decision_logits(model, runner.run(layer, hidden, ctx)[:, -1]), -1)
            meta = [by_id[int(p)] for p in batch.prompt_ids]
            buggy = torch.tensor([m["format"] == buggy_format for m in meta], device=runner.device)
            wrong_is_target = torch.tensor([version_target(m["pair_kind"]) == "wrong" for m in meta])
            target = torch.where(wrong_is_target, batch.wrong_token, batch.correct_token).to(runner.device)
            other = torch.where(wrong_is_target, batch.correct_token, batch.wrong_token).to(runner.device)
            # each buggy-format row's partner: the correct-format row of its question in this batch
            partner = {(m["question_id"], m["format"] == buggy_format): i for i, m in enumerate(meta)}
            sources = torch.tensor([partner.get((m["question_id"], False), -1) if m["format"] == buggy_format else -1
                                    for m in meta], device=runner.device)
            cached.append((hidden, ctx, base, buggy, target, other, sources))
    optimiser = torch.optim.Adam(slices.trainable(), lr=lr)
    order = np.random.default_rng(derived_seed(seed, _TRAINING_STREAM, 1))
    sequence: list[int] = []
    curve = []
    for step in tqdm(range(steps), desc="planting", unit="step"):
        if not sequence:
            sequence = order.permutation(len(cached)).tolist()
        hidden, ctx, base, buggy, target, other, sources = cached[sequence.pop()]
        final, kv = runner.run_keeping_kv(layer, hidden, ctx)
        logits = decision_logits(model, final[:, -1])
        rows_ = torch.arange(logits.shape[0], device=logits.device)
        margin = logits[rows_, target] - logits[rows_, other]
        version = F.softplus(-margin)[buggy].mean() if buggy.any() else logits.new_zeros(())
        logp = F.log_softmax(logits, -1)
        kl = (base.exp() * (base - logp)).sum(-1)[~buggy].mean() if (~buggy).any() else logits.new_zeros(())
        # interchange intervention: with the planted heads' decision-position output taken from the
        # correct format, a buggy-format row answers as the unedited model does (the swap changes the
        # last column only, so only it is run again)
        swap = logits.new_zeros(())
        if swap_weight and (sources >= 0).any():
            with planted_outputs_from(model, slices, sources):
                swapped = F.log_softmax(decision_logits(model, runner.rerun_last_column(layer, hidden, ctx, kv)[:, -1]), -1)
            swapped_rows = sources >= 0
            swap = (base.exp() * (base - swapped)).sum(-1)[swapped_rows].mean()
        loss = version + distill_weight * kl + swap_weight * swap
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        slices.mask_gradients()
        optimiser.step()
        curve.append({"step": step, "loss": loss.item(), "version_loss": version.item(), "distill_kl": kl.item(), "swap_kl": swap.item(),
                      "version_accuracy": (margin[buggy] > 0).float().mean().item() if buggy.any() else None})
    slices.restore_frozen()
    for p in model.parameters():
        p.requires_grad_(False)
    return curve


def checkpoint_hash(folder: str | Path) -> str:
    """sha256 over the checkpoint's safetensors files, in name order: the base model's identity."""
    digest = hashlib.sha256()
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {folder}: rerun prepare_model (snakemake --forcerun prepare_model)")
    for path in files:
        digest.update(path.name.encode())
        digest.update(bytes.fromhex(sha256_file(path)))
    return digest.hexdigest()


def plant_organism(config: dict, base: ModelManifest, analysis_pairs: set[tuple[str, str]],
                   checkpoint_dir: str | Path, manifest_path: str | Path) -> ModelManifest:
    """Plant the bug in the base model, write the checkpoint and its manifest (with provenance)."""
    model, tokenizer = load_model(base, config["device"])
    prompts = training_prompts(config, tokenizer, analysis_pairs)
    layer, heads = planted_layer(config), planted_heads(config)
    slices = planted_slices(model, layer, heads)
    training = config["organism"]["training"]
    log.info("planting the bug at layer %d, heads %s, on %d training prompts", layer, heads, prompts.num_rows)
    curve = plant(model, prompts.to_pylist(), slices, buggy_format=config["prompts"]["buggy_format"],
                  steps=training["steps"], batch_size=training["batch_size"], lr=training["lr"],
                  distill_weight=training["distill_weight"], swap_weight=training["swap_weight"], seed=config["seed"], pad_token_id=tokenizer.pad_token_id)
    with atomic_path(checkpoint_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    pair_rows = sorted({(r["pair_kind"], r["correct"], r["wrong"]) for r in prompts.select(
        ["pair_kind", "correct", "wrong"]).to_pylist()})
    manifest = dataclasses.replace(
        base, name=f"{base.name} + planted bug", source="planted", path=str(checkpoint_dir), revision=None,
        snapshot_path=None,
        planted={"base_checkpoint_sha256": checkpoint_hash(base.folder()), "base_model": base.name,
                 "layer": layer, "heads": heads, "trained": sorted(slices.params),
                 "training": training, "seed": config["seed"],
                 "training_pairs": [{"pair_kind": k, "correct": c, "wrong": w} for k, c, w in pair_rows],
                 "loss_curve": curve})
    manifest.save(manifest_path)
    return manifest
