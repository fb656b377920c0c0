"""How good an SAE is on the study's data: reconstruction (EV, MSE, L0, dead features) on held-out
prompts and text, and the decision logit difference with the SAE spliced into the forward pass."""

from __future__ import annotations

import math
import sys
from typing import Sequence

import pyarrow as pa
import torch
from tqdm import tqdm

from bugscope.data.prompts import SINK_POSITION
from bugscope.sae.activations import ActivationSource, iter_activations


class ReconstructionStats:
    """Streaming reconstruction metrics over batches of activations.

    EV = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (SAE-Lens's `explained_variance`),
    MSE = mean over tokens and dimensions of (x - x_hat)^2, L0 = mean number of non-zero features
    per token; `fired` marks every feature that was non-zero on at least one token.
    """

    def __init__(self, d_in: int, d_sae: int):
        self.n = 0
        self.d_in = d_in
        self.sse = 0.0
        self.sum_x = torch.zeros(d_in, dtype=torch.float64)
        self.sum_x2 = torch.zeros(d_in, dtype=torch.float64)
        self.l0_sum = 0.0
        self.fired = torch.zeros(d_sae, dtype=torch.bool)

    @torch.inference_mode()
    def update(self, sae, x: torch.Tensor) -> None:
        device = next(sae.parameters()).device
        feats = sae.encode(x.to(device))
        recon = sae.decode(feats).float().cpu()
        x = x.float().cpu()
        x64 = x.double()
        self.n += x.shape[0]
        self.sse += (x - recon).double().pow(2).sum().item()
        self.sum_x += x64.sum(0)
        self.sum_x2 += x64.pow(2).sum(0)
        nz = (feats != 0).cpu()
        self.l0_sum += nz.sum().item()
        self.fired |= nz.any(0)

    def result(self) -> dict:
        if self.n == 0:
            return {"ev": None, "mse": None, "l0": None, "n_tokens": 0}
        total_var = (self.sum_x2 - self.sum_x.pow(2) / self.n).sum().item()
        return {"ev": 1 - self.sse / total_var if total_var > 0 else None,
                "mse": self.sse / (self.n * self.d_in), "l0": self.l0_sum / self.n, "n_tokens": self.n}


@torch.inference_mode()
def reconstruction_stats(sae, source: ActivationSource, batch_size: int) -> ReconstructionStats:
    """`ReconstructionStats` of `sae` over every row of `source`, encoded `batch_size` rows at a time."""
    acc = ReconstructionStats(sae.cfg.d_in, sae.cfg.d_sae)
    for _, _, x in iter_activations([source]):
        for start in range(0, x.shape[0], batch_size):
            acc.update(sae, x[start:start + batch_size])
    return acc


@torch.inference_mode()
def spliced_logit_diffs(model, saes: dict, rows: Sequence[dict], *, site: str, batch_size: int,
                        pad_token_id: int) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """(clean, {layer: spliced}): decision logit differences [n_prompts] (> 0 = correct) of the
    unspliced model and with each layer's SAE spliced in, the prompts in the same order.

    The site's output at the layer is replaced by the SAE reconstruction at every real position but
    the first (the attention sink keeps its own activation; padding is untouched). One unspliced
    pass per batch gives the clean differences and the residual entering and leaving each spliced
    layer; each spliced pass starts there (after the layer, for a resid_post splice), so no layer
    before the splice is recomputed.
    """
    from bugscope.model.forward import LayerRunner, iter_batches
    from bugscope.model.splice import site_replaced_logit_diffs

    runner = LayerRunner(model)
    clean: list[torch.Tensor] = []
    spliced: dict[int, list[torch.Tensor]] = {layer: [] for layer in saes}
    rows = list(rows)
    batches = iter_batches(rows, batch_size, pad_token_id, runner.device)
    for batch in tqdm(batches, total=math.ceil(len(rows) / batch_size), desc="spliced passes", unit="batch",
                      file=sys.stderr):
        mask = (batch.attention_mask == 1) & (batch.position_ids > SINK_POSITION)  # [batch, pos]

        def splicer(sae, mask=mask):
            def splice(out):
                new = out.clone()
                new[mask] = sae.decode(sae.encode(out[mask].to(sae.dtype))).to(out.dtype)
                return new
            return splice

        clean_diffs, spliced_diffs = site_replaced_logit_diffs(
            runner, batch, site, {layer: splicer(sae) for layer, sae in saes.items()})
        clean.append(clean_diffs)
        for layer, diffs in spliced_diffs.items():
            spliced[layer].append(diffs)
    return torch.cat(clean), {layer: torch.cat(parts) for layer, parts in spliced.items()}


def checkpoint_id(name: str | None) -> str | None:
    """A checkpoint's identity for comparison: its last path component, lower case
    ("meta-llama/Llama-3.1-8B" -> "llama-3.1-8b"), so a hub id and a local copy of it agree."""
    return name.rstrip("/").rsplit("/", 1)[-1].lower() if name else None


def sae_training_model(provenance: dict, model_checkpoint: str) -> tuple[str | None, bool | None]:
    """(the checkpoint an SAE was trained on, whether that is the model under study).

    An SAE trained here was trained on the model under study. A pretrained one says in its SAE-Lens
    metadata (Llama Scope: "meta-llama/Llama-3.1-8B", the *base* model); the checkpoints are compared,
    not the labels, so the base model's SAEs on the Instruct model are reported as another model's.
    """
    if provenance.get("source") == "train":
        return model_checkpoint, True
    sae_model = provenance.get("sae_model_name")
    return sae_model, (checkpoint_id(sae_model) == checkpoint_id(model_checkpoint)) if sae_model else None


def quality_row(*, layer: int, hook: str, sae, provenance: dict, prompt_stats: dict, corpus_stats: dict,
                fired: torch.Tensor, clean: torch.Tensor, spliced: torch.Tensor, model_checkpoint: str) -> dict:
    """One row of the SAE quality table."""
    n = clean.numel()
    sae_model, same_model = sae_training_model(provenance, model_checkpoint)
    return {
        "layer": layer, "hook_name": hook, "source": provenance.get("source"), "d_sae": sae.cfg.d_sae,
        "model": model_checkpoint, "sae_model": sae_model, "sae_trained_on_model": same_model,
        "ev_prompts": prompt_stats["ev"], "mse_prompts": prompt_stats["mse"], "l0_prompts": prompt_stats["l0"],
        "n_tokens_prompts": prompt_stats["n_tokens"],
        "ev_corpus": corpus_stats["ev"], "mse_corpus": corpus_stats["mse"], "l0_corpus": corpus_stats["l0"],
        "n_tokens_corpus": corpus_stats["n_tokens"],
        "dead_fraction": 1.0 - fired.float().mean().item(),
        "train_l0": (provenance.get("training") or {}).get("train_l0"),
        "train_dead_fraction": (provenance.get("training") or {}).get("train_dead_fraction"),
        "n_prompts": n,
        "logit_diff_clean": clean.mean().item() if n else None,
        "logit_diff_sae": spliced.mean().item() if n else None,
        "delta_logit_diff": (spliced - clean).mean().item() if n else None,
        "accuracy_clean": (clean > 0).float().mean().item() if n else None,
        "accuracy_sae": (spliced > 0).float().mean().item() if n else None,
    }


QUALITY_SCHEMA = pa.schema([
    ("layer", pa.int32()), ("hook_name", pa.string()), ("source", pa.string()), ("d_sae", pa.int32()),
    ("model", pa.string()), ("sae_model", pa.string()), ("sae_trained_on_model", pa.bool_()),
    ("ev_prompts", pa.float64()), ("mse_prompts", pa.float64()), ("l0_prompts", pa.float64()),
    ("n_tokens_prompts", pa.int64()),
    ("ev_corpus", pa.float64()), ("mse_corpus", pa.float64()), ("l0_corpus", pa.float64()),
    ("n_tokens_corpus", pa.int64()),
    ("dead_fraction", pa.float64()), ("train_l0", pa.float64()), ("train_dead_fraction", pa.float64()),
    ("n_prompts", pa.int32()), ("logit_diff_clean", pa.float64()), ("logit_diff_sae", pa.float64()),
    ("delta_logit_diff", pa.float64()), ("accuracy_clean", pa.float64()), ("accuracy_sae", pa.float64()),
])
