"""Batched forward passes over the prompt table: left padding, explicit position_ids, decision logits.

Each prompt's input ends at its decision position (see `bugscope.prompts`), so with left padding
the decision position of every row is the last column and `logits_to_keep=1` scores it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from bugscope.sites import decoder_layers, output_tensor, site_module


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
    """Batches of rows of similar length: padding is compute spent on nothing (the chat format is
    twice as long as the others). The order is a stable sort by length, so it is deterministic;
    consumers key results by `Batch.prompt_ids`."""
    by_length = sorted(rows, key=lambda r: len(r["input_ids"]))
    for start in range(0, len(by_length), batch_size):
        yield make_batch(by_length[start:start + batch_size], pad_token_id, device)


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


@dataclass
class LayerContext:
    """What every decoder layer of one padded batch needs: rotary embeddings, mask and positions."""

    cos_sin: tuple[torch.Tensor, torch.Tensor]
    mask: torch.Tensor  # [b, 1, q, k] additive attention mask
    position_ids: torch.Tensor  # [b, q]

    def tail(self, start: int, replicas: int = 1) -> "LayerContext":
        """The context of query columns `start:` repeated `replicas` times (keys are not cut)."""
        cos, sin = self.cos_sin
        return LayerContext(
            (cos[:, start:].repeat(replicas, 1, 1), sin[:, start:].repeat(replicas, 1, 1)),
            self.mask[:, :, start:].repeat(replicas, 1, 1, 1), self.position_ids[:, start:].repeat(replicas, 1))


class LayerRunner:
    """Runs a Hugging Face Llama-style decoder stack one layer at a time.

    A run can start at any layer from that layer's input, so stages that change one layer (head
    patching, an SAE spliced in) compute the layers before it once and reuse them.
    """

    def __init__(self, model):
        self.model = model
        self.inner = model.model
        self.n_layers = model.config.num_hidden_layers
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device

    def begin(self, batch: Batch) -> tuple[torch.Tensor, LayerContext]:
        """(embeddings [b, pos, d_model], context) of a batch."""
        hidden = self.inner.embed_tokens(batch.input_ids)
        cos_sin = self.inner.rotary_emb(hidden, batch.position_ids)
        return hidden, LayerContext(cos_sin, self.attention_mask(batch), batch.position_ids)

    def attention_mask(self, batch: Batch) -> torch.Tensor:
        """[b, 1, pos, pos] additive mask: causal, no padded keys; a padded query sees itself only."""
        valid = batch.attention_mask.bool()  # [b, pos]
        n = valid.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=valid.device).tril()
        allowed = causal[None] & valid[:, None, :]
        allowed |= torch.eye(n, dtype=torch.bool, device=valid.device)[None]
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=valid.device)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        return mask[:, None]

    def layer(self, i: int, hidden: torch.Tensor, ctx: LayerContext, kv=None) -> torch.Tensor:
        out = decoder_layers(self.model)[i](hidden, attention_mask=ctx.mask, position_ids=ctx.position_ids,
                                   past_key_values=kv, use_cache=False, position_embeddings=ctx.cos_sin)
        return output_tensor(out)

    def run(self, start: int, hidden: torch.Tensor, ctx: LayerContext, kv=None) -> torch.Tensor:
        """The residual stream after the last layer, from the input of layer `start`."""
        for i in range(start, self.n_layers):
            hidden = self.layer(i, hidden, ctx, kv)
        return hidden

    def decision_logit_diff(self, hidden_last: torch.Tensor, batch: Batch, replicas: int = 1) -> torch.Tensor:
        """[replicas * b] correct-minus-wrong logit from the last column's residual [replicas * b, d_model]:
        only the two scored rows of the unembedding are used."""
        h = self.inner.norm(hidden_last).float()
        w = self.model.lm_head.weight
        c = batch.correct_token.to(self.device).repeat(replicas)
        wr = batch.wrong_token.to(self.device).repeat(replicas)
        lc = (h * w[c].float()).sum(-1)
        lw = (h * w[wr].float()).sum(-1)
        bias = getattr(self.model.lm_head, "bias", None)
        if bias is not None:
            lc, lw = lc + bias[c].float(), lw + bias[wr].float()
        return (lc - lw).cpu()
