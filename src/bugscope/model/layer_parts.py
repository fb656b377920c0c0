"""A decoder layer taken apart for the direct head attribution: each head's write into the residual
stream (W_O[h] z_h), the attention output projection's bias, and the MLP half of the layer run
on a changed resid_mid."""

from __future__ import annotations

import torch

from bugscope.model.sites import UnsupportedModelError, head_input_module, heads_write_linearly, mlp_tail


def head_outputs(model, layer: int, z: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[heads, n, d_model]: W_O[h] z_h, the residual-stream write of each head."""
    if not heads_write_linearly(model):
        raise UnsupportedModelError(
            "The direct head attribution splits the attention output into W_O[h] z_h per head, but this model "
            "normalises the attention output before the residual stream (Gemma 2's post_attention_layernorm), "
            "so heads have no additive write into it: the attribution is not defined for this model.")
    w_o = head_input_module(model, layer).weight.detach().to(z.dtype).cpu()  # [d_model, heads*head_dim]
    d_model = w_o.shape[0]
    head_dim = w_o.shape[1] // n_heads
    return torch.einsum("nhk,dhk->hnd", z.view(z.shape[0], n_heads, head_dim), w_o.view(d_model, n_heads, head_dim))


def head_write_bias(model, layer: int, d_model: int) -> torch.Tensor:
    """[d_model] float64 on the CPU: o_proj's bias b_O (zeros when it has none)."""
    b = head_input_module(model, layer).bias
    return torch.zeros(d_model, dtype=torch.float64) if b is None else b.detach().to("cpu", torch.float64)


@torch.inference_mode()
def resid_post_from_mid(model, layer: int, resid_mid: torch.Tensor) -> torch.Tensor:
    """resid_post of positions given their resid_mid (bugscope.model.sites.mlp_tail), float64 on the CPU."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    x = resid_mid.to(device, dtype)
    return mlp_tail(model, layer, x).to("cpu", torch.float64)
