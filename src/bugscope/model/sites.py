"""Hook-site names and where each site lives in a Hugging Face decoder (Llama, Qwen2, Qwen3, Gemma 2).

Names follow SAE-Lens / TransformerLens (`blocks.{L}.hook_resid_post`) so that a cached file can be
matched to an SAE's `hook_name` by string equality. The per-head attention outputs (the input of
`o_proj`) are TransformerLens's `blocks.{L}.attn.hook_z`. This module is the only place that maps a
site to a module of the model; `bugscope.model.forward` is the only one that runs those modules.

The supported families (`FAMILIES`, keyed by `config.model_type`) share the stack's layout
(`model.model.{embed_tokens, rotary_emb, layers, norm}`, `model.lm_head`, `self_attn.o_proj` with
the heads' outputs concatenated at its input) and the head geometry (`num_attention_heads`,
`num_key_value_heads`, `head_dim` when the config sets it, as Qwen3 and Gemma 2 do, else
hidden_size / heads: `bugscope.model.model_geometry`). What differs is in `ModelFamily`: which
module writes each branch into the residual stream, the norms around the MLP, sliding-window
attention layers (`attention_window`) and the final logit soft-capping (`logit_softcap`).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
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


class UnsupportedModelError(ValueError):
    """The model's architecture is not one whose internals bugscope knows."""


@dataclass(frozen=True)
class ModelFamily:
    """Where one decoder family keeps what bugscope reads and writes: names of submodules of a
    decoder layer, each applied to the output of the one before (attention -> attn_out; mlp_in_norm
    -> mlp -> mlp_out), and the config key of the final logit soft-cap."""

    attn_out: str = "self_attn"  # its output is the attention block's write into the residual stream
    mlp_in_norm: str = "post_attention_layernorm"  # the norm of the MLP's input (of resid_mid)
    mlp_out: str = "mlp"  # its output is the MLP block's write into the residual stream
    logit_softcap: str | None = None  # config key: logits = cap * tanh(logits / cap)


# Llama, Qwen2 (qkv biases) and Qwen3 (q_norm / k_norm inside attention) differ only inside
# modules the layer runs itself. Gemma 2 (Gemma2DecoderLayer.forward) normalises each branch's
# output before adding it: resid_mid = resid_pre + post_attention_layernorm(self_attn(input_layernorm(x)))
# and resid_post = resid_mid + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(resid_mid))),
# so its attn_out and mlp_out are the outputs of those post-norms (what the residual stream
# receives, and what resid_post(L) = resid_post(L-1) + attn_out(L) + mlp_out(L) needs). Its
# embedding module multiplies by sqrt(d_model) itself; attention logit soft-capping and the
# query_pre_attn_scalar scaling happen inside its attention module.
FAMILIES = {
    "llama": ModelFamily(),
    "qwen2": ModelFamily(),
    "qwen3": ModelFamily(),
    "gemma2": ModelFamily(attn_out="post_attention_layernorm", mlp_in_norm="pre_feedforward_layernorm",
                          mlp_out="post_feedforward_layernorm", logit_softcap="final_logit_softcapping"),
}
# The per-layer attention kinds (config.layer_types) whose mask `bugscope.model.forward` builds.
LAYER_TYPES = ("full_attention", "sliding_attention")


def model_family(config) -> ModelFamily:
    """The family of a Hugging Face config (or a model's), or a clear error for any other architecture."""
    config = getattr(config, "config", config)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"bugscope does not support model type {model_type!r}; supported model types: "
            f"{', '.join(sorted(FAMILIES))} (Llama, Qwen2, Qwen3 and Gemma 2 checkpoints).")
    if getattr(config, "use_bidirectional_attention", None):
        raise UnsupportedModelError("This checkpoint's attention is bidirectional; bugscope runs causal decoders only.")
    unknown = sorted(set(getattr(config, "layer_types", None) or ()) - set(LAYER_TYPES))
    if unknown:
        raise UnsupportedModelError(
            f"This {model_type} checkpoint has attention layers of type {', '.join(unknown)}; bugscope builds "
            f"the masks of {', '.join(LAYER_TYPES)} only.")
    return FAMILIES[model_type]


def attention_window(model, layer: int) -> int | None:
    """The sliding window of `layer` (a query sees the `window` keys up to itself), None for full
    causal attention: Gemma 2 alternates sliding and full layers; Qwen2/3 slide on layers >=
    max_window_layers when use_sliding_window is set. Both read it from config.layer_types."""
    config = model.config
    layer_types = getattr(config, "layer_types", None)
    if layer_types and layer_types[layer] == "sliding_attention":
        return int(config.sliding_window)
    return None


def logit_softcap(model) -> float | None:
    """Gemma 2's final logit soft-cap (logits = cap * tanh(logits / cap)); None when logits are not capped."""
    key = model_family(model).logit_softcap
    cap = getattr(model.config, key, None) if key else None
    return float(cap) if cap else None


def final_norm(model) -> torch.nn.Module:
    return inner_model(model).norm


def final_norm_epsilon(model) -> float:
    """The epsilon of the final RMS norm (Llama, Qwen: variance_epsilon; Gemma 2: eps)."""
    norm = final_norm(model)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if eps is None:
        raise UnsupportedModelError(f"The final norm {type(norm).__name__} has no epsilon bugscope knows.")
    return float(eps)


def unembedding(model) -> torch.nn.Module:
    """lm_head: its weight rows are the tokens' unembedding vectors."""
    return model.lm_head


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
    final norm applied). mlp_out: the MLP's write into the residual stream (the MLP; Gemma 2: its
    post_feedforward_layernorm). attn_out: the attention block's write (self_attn, after o_proj;
    Gemma 2: its post_attention_layernorm).
    """
    block = decoder_layers(model)[layer]
    if site == "resid_post":
        return block
    family = model_family(model)
    if site not in ("mlp_out", "attn_out"):
        raise ValueError(f"unknown hook site {site!r}; expected one of {', '.join(SITES)}")
    return getattr(block, family.mlp_out if site == "mlp_out" else family.attn_out)


def output_tensor(output) -> torch.Tensor:
    """Decoder layers and attention return tuples in some transformers versions."""
    return output[0] if isinstance(output, tuple) else output


def query_and_output_projections(model, layer: int) -> tuple[torch.nn.Linear, torch.nn.Linear, int]:
    """(q_proj, o_proj, head_dim) of `layer`'s attention: query head h owns rows h*d:(h+1)*d of
    q_proj and columns h*d:(h+1)*d of o_proj."""
    attention = decoder_layers(model)[layer].self_attn
    d_head = getattr(attention, "head_dim", model.config.hidden_size // model.config.num_attention_heads)
    return attention.q_proj, attention.o_proj, d_head


def head_input_module(model, layer: int) -> torch.nn.Module:
    """`o_proj`: its *input* is the concatenation of the per-head outputs, [batch, pos, head*d_head]."""
    return decoder_layers(model)[layer].self_attn.o_proj


def attention_writer_hook(model, layer: int, site: str, write: Callable[[torch.Tensor], torch.Tensor]):
    """Make `write` replace the attention tensor of `site` at `layer`; returns the hook's handle.

    site "z": the per-head outputs, the *input* of o_proj [batch, pos, head * d_head]; site
    "attn_out": the attention block's *output*, after o_proj [batch, pos, d_model] (Gemma 2: after
    its post_attention_layernorm, as `site_module`).
    """
    if site == HEAD_SITE:
        def pre_hook(_module, args):
            return (write(args[0]),) + tuple(args[1:])
        return head_input_module(model, layer).register_forward_pre_hook(pre_hook)
    if site != "attn_out":
        raise ValueError(f"attention writes go to site {HEAD_SITE!r} or 'attn_out', not {site!r}")
    return site_writer_hook(model, layer, "attn_out", write)


def site_writer_hook(model, layer: int, site: str, write: Callable[[torch.Tensor], torch.Tensor]):
    """Make `write` replace the output of `site` (SITES: resid_post, mlp_out, attn_out) at `layer`;
    returns the hook's handle."""
    def post_hook(_module, _inputs, output):
        if isinstance(output, tuple):
            return (write(output[0]),) + tuple(output[1:])
        return write(output)
    return site_module(model, layer, site).register_forward_hook(post_hook)


def mlp_tail(model, layer: int, resid_mid: torch.Tensor) -> torch.Tensor:
    """The second half of a decoder layer: resid_mid + mlp(post_attention_layernorm(resid_mid))
    (Gemma 2: resid_mid + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(resid_mid)))).

    `resid_mid` (the residual stream after the attention block) is on the model's device and dtype.
    """
    block = decoder_layers(model)[layer]
    family = model_family(model)
    out = block.mlp(getattr(block, family.mlp_in_norm)(resid_mid))
    if family.mlp_out != "mlp":
        out = getattr(block, family.mlp_out)(out)
    return resid_mid + out


def heads_write_linearly(model) -> bool:
    """Whether the attention block's residual write is o_proj's output, linear in the heads
    (sum_h W_O[h] z_h + b_O). Not in Gemma 2, whose post_attention_layernorm rescales the sum."""
    return model_family(model).attn_out == "self_attn"
