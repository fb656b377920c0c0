"""Hook-site names and where each site lives in a Hugging Face Llama model.

Names follow SAE-Lens / TransformerLens (`blocks.{L}.hook_resid_post`) so that a cached file can be
matched to an SAE's `hook_name` by string equality. This module is the only place that maps a
site to a module of the model.
"""

from __future__ import annotations

import re

import torch

SITES = ("resid_post", "mlp_out", "attn_out")
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_(resid_post|mlp_out|attn_out)$")


def hook_name(layer: int, site: str = "resid_post") -> str:
    if site not in SITES:
        raise ValueError(f"unknown hook site {site!r}; expected one of {', '.join(SITES)}")
    return f"blocks.{layer}.hook_{site}"


def parse_hook_name(name: str) -> tuple[int, str]:
    m = _HOOK_RE.match(name)
    if not m:
        raise ValueError(f"{name!r} is not a hook name of the form blocks.<layer>.hook_<site>")
    return int(m.group(1)), m.group(2)


def decoder_layers(model) -> torch.nn.ModuleList:
    return model.model.layers


def site_module(model, layer: int, site: str) -> torch.nn.Module:
    """The module whose *output* is the site's activation.

    resid_post: the decoder layer itself (not `output_hidden_states`, whose last entry has the
    final norm applied). mlp_out: the MLP. attn_out: the attention block (after o_proj).
    """
    block = decoder_layers(model)[layer]
    return {"resid_post": block, "mlp_out": block.mlp, "attn_out": block.self_attn}[site]


def output_tensor(output) -> torch.Tensor:
    """Decoder layers and attention return tuples in some transformers versions."""
    return output[0] if isinstance(output, tuple) else output


def head_input_module(model, layer: int) -> torch.nn.Module:
    """`o_proj`: its *input* is the concatenation of the per-head outputs, [batch, pos, head*d_head]."""
    return decoder_layers(model)[layer].self_attn.o_proj


# --- accessors used by bugscope.attribution ---


def decoder_stack(model) -> torch.nn.Module:
    """The decoder without the LM head (embeddings, decoder layers, final norm)."""
    return model.model


def mlp_tail(model, layer: int, resid_mid: torch.Tensor) -> torch.Tensor:
    """The second half of a decoder layer: resid_mid + mlp(post_attention_layernorm(resid_mid)).

    `resid_mid` (the residual stream after the attention block) is on the model's device and dtype.
    """
    block = decoder_layers(model)[layer]
    return resid_mid + block.mlp(block.post_attention_layernorm(resid_mid))
