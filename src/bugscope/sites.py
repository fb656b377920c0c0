"""Hook-site names and where each site lives in a Hugging Face Llama model.

Names follow SAE-Lens / TransformerLens (`blocks.{L}.hook_resid_post`) so that a cached file can be
matched to an SAE's `hook_name` by string equality. The per-head attention outputs (the input of
`o_proj`) are TransformerLens's `blocks.{L}.attn.hook_z`. This module is the only place that maps a
site to a module of the model; `bugscope.forward` is the only one that runs those modules.
"""

from __future__ import annotations

import inspect
import re
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # only in annotations: the workflow imports this module to parse, without torch
    import torch

SITES = ("resid_post", "mlp_out", "attn_out")  # residual-space sites: cached, and read by SAEs
# The sites attention heads write into directly (through o_proj); mlp_out is reached only through the MLP.
HEAD_WRITTEN_SITES = ("resid_post", "attn_out")
HEAD_SITE = "z"  # per-head outputs [batch, pos, head * d_head]: TransformerLens's attn.hook_z
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_(resid_post|mlp_out|attn_out)$")


def hook_name(layer: int, site: str = "resid_post") -> str:
    if site == HEAD_SITE:
        return f"blocks.{layer}.attn.hook_z"
    if site not in SITES:
        raise ValueError(f"unknown hook site {site!r}; expected one of {', '.join(SITES)}")
    return f"blocks.{layer}.hook_{site}"


def parse_hook_name(name: str) -> tuple[int, str]:
    m = _HOOK_RE.match(name)
    if not m:
        raise ValueError(f"{name!r} is not a hook name of the form blocks.<layer>.hook_<site>")
    return int(m.group(1)), m.group(2)


def inner_model(model) -> torch.nn.Module:
    """The decoder stack with embeddings, rotary embeddings and the final norm, without lm_head."""
    return model.model


def decoder_layers(model) -> torch.nn.ModuleList:
    return inner_model(model).layers


def cache_keyword(layer: torch.nn.Module) -> str:
    """The keyword a decoder layer takes its KV cache by: `cache` from transformers 5.x (where
    `past_key_values` is deprecated and then removed), `past_key_values` before."""
    params = inspect.signature(type(layer).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


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


def attention_writer_hook(model, layer: int, site: str, write: Callable[[torch.Tensor], torch.Tensor]):
    """Make `write` replace the attention tensor of `site` at `layer`; returns the hook's handle.

    site "z": the per-head outputs, the *input* of o_proj [batch, pos, head * d_head]; site
    "attn_out": the attention block's *output*, after o_proj [batch, pos, d_model].
    """
    if site == HEAD_SITE:
        def pre_hook(_module, args):
            return (write(args[0]),) + tuple(args[1:])
        return head_input_module(model, layer).register_forward_pre_hook(pre_hook)
    if site != "attn_out":
        raise ValueError(f"attention writes go to site {HEAD_SITE!r} or 'attn_out', not {site!r}")

    def post_hook(_module, _inputs, output):
        if isinstance(output, tuple):
            return (write(output[0]),) + tuple(output[1:])
        return write(output)
    return site_module(model, layer, "attn_out").register_forward_hook(post_hook)


def mlp_tail(model, layer: int, resid_mid: torch.Tensor) -> torch.Tensor:
    """The second half of a decoder layer: resid_mid + mlp(post_attention_layernorm(resid_mid)).

    `resid_mid` (the residual stream after the attention block) is on the model's device and dtype.
    """
    block = decoder_layers(model)[layer]
    return resid_mid + block.mlp(block.post_attention_layernorm(resid_mid))
