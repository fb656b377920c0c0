"""The weights a planted bug may change: chosen query heads of one attention layer (research notes 10).

A query head h owns rows h*d:(h+1)*d of q_proj.weight (and of its bias, where the family has one)
and columns h*d:(h+1)*d of o_proj.weight. With grouped-query attention its keys and values are
shared with the other heads of its group, so k_proj and v_proj stay frozen. Training edits whole
tensors with masked gradients; `restore_frozen` then copies every entry outside the planted slices
back from the base weights, so the rest of each tensor is bit-identical by construction, not by the
optimiser's arithmetic.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from bugscope.model.sites import (
    HEAD_SITE,
    attention_writer_hook,
    final_norm,
    logit_softcap,
    query_and_output_projections,
    unembedding,
)


@dataclass
class PlantedSlices:
    """The planted heads' parameters: each tensor with a boolean mask of its trainable entries."""

    layer: int
    heads: tuple[int, ...]
    params: dict[str, torch.nn.Parameter]  # state-dict name -> parameter
    masks: dict[str, torch.Tensor]  # state-dict name -> bool mask, True where the planted heads live
    base: dict[str, torch.Tensor]  # state-dict name -> the base model's values
    d_head: int

    def trainable(self) -> list[torch.nn.Parameter]:
        return list(self.params.values())

    def mask_gradients(self) -> None:
        for name, param in self.params.items():
            if param.grad is not None:
                param.grad.mul_(self.masks[name])

    @torch.no_grad()
    def restore_frozen(self) -> None:
        """Every entry outside the planted heads gets the base model's value back."""
        for name, param in self.params.items():
            param.copy_(torch.where(self.masks[name], param, self.base[name]))

    @torch.no_grad()
    def restore_base(self) -> None:
        """The whole tensors back to the base model (the planted slices too)."""
        for name, param in self.params.items():
            param.copy_(self.base[name])


def planted_slices(model, layer: int, heads) -> PlantedSlices:
    """Freeze every parameter of `model` but the planted heads' q_proj rows (and bias) and o_proj
    columns at `layer`; returns those tensors with their masks."""
    n_layers = model.config.num_hidden_layers
    n_heads = model.config.num_attention_heads
    if not 0 <= layer < n_layers:
        raise ValueError(f"organism.layer={layer} is not a layer of this {n_layers}-layer model (0..{n_layers - 1}).")
    bad = [h for h in heads if not 0 <= h < n_heads]
    if bad or not heads:
        raise ValueError(f"organism.heads={list(heads)} must name heads 0..{n_heads - 1} of this model.")
    q_proj, o_proj, d_head = query_and_output_projections(model, layer)
    own = torch.zeros(n_heads * d_head, dtype=torch.bool)
    for h in heads:
        own[h * d_head:(h + 1) * d_head] = True
    names = {id(p): n for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    params, masks = {}, {}
    targets = [(q_proj.weight, own[:, None]), (o_proj.weight, own[None, :])]
    if q_proj.bias is not None:
        targets.append((q_proj.bias, own))
    for param, mask in targets:
        name = names[id(param)]
        param.requires_grad_(True)
        params[name] = param
        masks[name] = mask.expand_as(param).to(param.device)
    base = {name: p.detach().clone() for name, p in params.items()}
    return PlantedSlices(layer, tuple(heads), params, masks, base, d_head)


def decision_logits(model, hidden_last: torch.Tensor) -> torch.Tensor:
    """[b, vocab] float32 logits from the last column's residual [b, d_model]: the final norm and
    the unembedding, soft-capped where the family caps (as its lm_head output is)."""
    logits = unembedding(model)(final_norm(model)(hidden_last)).float()
    cap = logit_softcap(model)
    return logits if cap is None else cap * torch.tanh(logits / cap)


@contextlib.contextmanager
def planted_outputs_from(model, slices: PlantedSlices, sources: torch.Tensor):
    """Within the block, the planted heads' outputs (z, the input of o_proj) at the last column of
    each row whose `sources` entry is >= 0 are those of that row of the same batch: an interchange
    intervention, a row patched from its question's other format in the forward pass itself."""
    cols = torch.cat([torch.arange(h * slices.d_head, (h + 1) * slices.d_head) for h in slices.heads])
    targets = (sources >= 0).nonzero().flatten()

    def write(z):
        z = z.clone()
        z[targets[:, None], -1, cols[None, :]] = z[sources[targets][:, None], -1, cols[None, :]]
        return z
    handle = attention_writer_hook(model, slices.layer, HEAD_SITE, write)
    try:
        yield
    finally:
        handle.remove()
