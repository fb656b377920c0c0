"""Batched forward passes over the prompt table: left padding, explicit position_ids, decision logits.

Each prompt's input ends at its decision position (see `bugscope.prompts`), so with left padding
the decision position of every row is the last column and `logits_to_keep=1` scores it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from bugscope.sites import output_tensor, site_module


@dataclass
class Batch:
    prompt_ids: torch.Tensor  # [batch]
    input_ids: torch.Tensor  # [batch, pos]
    attention_mask: torch.Tensor  # [batch, pos]
    position_ids: torch.Tensor  # [batch, pos]
    pad: torch.Tensor  # [batch] left padding of each row
    correct_token: torch.Tensor  # [batch]
    wrong_token: torch.Tensor  # [batch]

    def model_inputs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}


def make_batch(rows: Sequence[dict], pad_token_id: int, device) -> Batch:
    """rows: dicts with prompt_id, input_ids and (optionally) correct_token / wrong_token."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, width - n:] = torch.tensor(r["input_ids"], dtype=torch.long)
        mask[i, width - n:] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(
        prompt_ids=torch.tensor([r["prompt_id"] for r in rows], dtype=torch.long),
        input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=position_ids.to(device),
        pad=width - mask.sum(-1),
        correct_token=torch.tensor([r.get("correct_token", -1) for r in rows], dtype=torch.long),
        wrong_token=torch.tensor([r.get("wrong_token", -1) for r in rows], dtype=torch.long),
    )


def iter_batches(rows: Sequence[dict], batch_size: int, pad_token_id: int, device) -> Iterator[Batch]:
    for start in range(0, len(rows), batch_size):
        yield make_batch(rows[start:start + batch_size], pad_token_id, device)


def logit_diff(decision_logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """[batch] correct-minus-wrong logit at the decision position; > 0 means the model is right."""
    rows = torch.arange(decision_logits.shape[0])
    logits = decision_logits.float().cpu()
    return logits[rows, batch.correct_token] - logits[rows, batch.wrong_token]


@torch.inference_mode()
def decision_logits(model, batch: Batch) -> torch.Tensor:
    """[batch, vocab] logits at the decision (last) position."""
    out = model(**batch.model_inputs(), logits_to_keep=1, use_cache=False)
    return out.logits[:, -1, :]


@contextlib.contextmanager
def capture_sites(model, layers: Sequence[int], site: str, on_output):
    """Call `on_output(layer, tensor [batch, pos, d_model])` for each layer's site output in a forward."""
    handles = []
    for layer in layers:
        def hook(_module, _inputs, output, layer=layer):
            on_output(layer, output_tensor(output))
        handles.append(site_module(model, layer, site).register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
