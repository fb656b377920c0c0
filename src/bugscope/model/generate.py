"""Greedy generation: plain, with an attention site rewritten on every step, and the original
study's hooked generation of one prompt pair written as its code is."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

from bugscope.model.sites import attention_writer_hook, site_module


@torch.inference_mode()
def greedy_generate(model, inputs: Mapping, *, max_new_tokens: int, pad_token_id: int) -> torch.Tensor:
    """[batch, pos + new] greedy continuation of tokenised `inputs` (input_ids, attention_mask, ...);
    `generate` derives position_ids from a left-padded attention mask itself."""
    return model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id)


@torch.inference_mode()
def generate_with_attention_write(model, layer: int, site: str, write: Callable[[torch.Tensor], torch.Tensor], *,
                                  input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                                  pad_token_id: int) -> torch.Tensor:
    """[batch, pos + new] greedy generation with `write` applied to the attention tensor of `site` at
    `layer` (bugscope.model.sites.attention_writer_hook) on the prefill and on every decoding step."""
    handle = attention_writer_hook(model, layer, site, write)
    try:
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                              do_sample=False, pad_token_id=pad_token_id)
    finally:
        handle.remove()


@torch.inference_mode()
def generate_with_source_heads(model, target_ids: Sequence[int], source_ids: Sequence[int], layer: int,
                               heads: Sequence[int], *, max_new_tokens: int, decode_patch: bool,
                               pad_token_id: int) -> list[int]:
    """The original procedure's generation on one unpadded prompt pair, as the original code is:
    save self_attn's output on the source, copy the heads' slices at [:min(seq_len, saved_len)] in
    a forward hook that stays live during `model.generate` (unless `decode_patch` is off). Returns
    every new token (end-of-generation tokens and what follows them included)."""
    n_heads = model.config.num_attention_heads
    module = site_module(model, layer, "attn_out")  # layers[layer].self_attn
    saved = {}

    def save(_m, _i, output):
        saved["x"] = (output[0] if isinstance(output, tuple) else output).detach().clone()

    h = module.register_forward_hook(save)
    try:
        model(input_ids=torch.tensor([list(source_ids)]))
    finally:
        h.remove()
    calls = {"n": 0}

    def patch(_m, _i, output):
        hidden = output[0] if isinstance(output, tuple) else output
        calls["n"] += 1
        if calls["n"] > 1 and not decode_patch:
            return output
        b, seq_len, size = hidden.shape
        view = hidden.view(b, seq_len, n_heads, size // n_heads)
        src = saved["x"].view(b, -1, n_heads, size // n_heads)
        new = view.clone()
        m = min(seq_len, src.shape[1])
        for head in heads:
            new[:, :m, head, :] = src[:, :m, head, :]
        new = new.view(b, seq_len, size)
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

    h = module.register_forward_hook(patch)
    try:
        ids = torch.tensor([list(target_ids)])
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad_token_id)
    finally:
        h.remove()
    return gen[0, ids.shape[1]:].tolist()
