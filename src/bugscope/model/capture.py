"""Reading tensors out of a forward pass without changing it: a layer's tensors at the decision
position (`capture_decision`, for the direct head attribution) and one module's output
(`recorded_output`, e.g. an SAE-Lens hook point)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from bugscope.model.forward import iter_batches, run_decoder
from bugscope.model.sites import decoder_layers, head_input_module, output_tensor, site_module


@contextlib.contextmanager
def recorded_output(module: torch.nn.Module) -> Iterator[dict]:
    """A dict that gets the module's output under "output" each time the module runs in the block."""
    seen: dict = {}
    handle = module.register_forward_hook(lambda _m, _i, out: seen.__setitem__("output", out))
    try:
        yield seen
    finally:
        handle.remove()


@dataclass
class LayerCapture:
    """Per prompt, at the decision position of one layer ([n, ...])."""

    resid_pre: torch.Tensor  # [n, d_model] input of the decoder layer
    z: torch.Tensor  # [n, n_heads * head_dim] input of the attention output projection (the per-head outputs)
    attn_out: torch.Tensor  # [n, d_model] output of the attention block (after the output projection)
    mlp_out: torch.Tensor  # [n, d_model]
    resid_post: torch.Tensor  # [n, d_model] output of the decoder layer


class _StopForward(Exception):
    pass


@torch.inference_mode()
def capture_decision(model, rows: Sequence[dict], *, layers: Sequence[int], batch_size: int,
                     pad_token_id: int) -> tuple[np.ndarray, dict[int, LayerCapture]]:
    """One forward pass per batch; returns prompt ids and, per layer, the decision-position tensors."""
    device = next(model.parameters()).device
    store = {layer: {k: [] for k in ("resid_pre", "z", "attn_out", "mlp_out", "resid_post")} for layer in layers}
    last = max(layers)
    handles = []

    def keep(layer, key, t):
        # float32 holds a float32 or bfloat16 model's values exactly; the attribution works in float64
        store[layer][key].append(t[:, -1, :].detach().to("cpu", torch.float32))

    for layer in layers:
        block = decoder_layers(model)[layer]

        def pre_hook(_m, args, kwargs, layer=layer):
            keep(layer, "resid_pre", args[0] if args else kwargs["hidden_states"])

        def post_hook(_m, _i, out, layer=layer):
            keep(layer, "resid_post", output_tensor(out))
            if layer == last:
                raise _StopForward

        handles += [
            block.register_forward_pre_hook(pre_hook, with_kwargs=True),
            head_input_module(model, layer).register_forward_pre_hook(
                lambda _m, args, layer=layer: keep(layer, "z", args[0])),
            site_module(model, layer, "attn_out").register_forward_hook(
                lambda _m, _i, out, layer=layer: keep(layer, "attn_out", output_tensor(out))),
            site_module(model, layer, "mlp_out").register_forward_hook(
                lambda _m, _i, out, layer=layer: keep(layer, "mlp_out", output_tensor(out))),
            block.register_forward_hook(post_hook),
        ]
    ids = []
    try:
        for batch in iter_batches(rows, batch_size, pad_token_id, device):
            ids.append(batch.prompt_ids.numpy())
            try:
                run_decoder(model, batch)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    caps = {layer: LayerCapture(**{k: torch.cat(v) for k, v in parts.items()}) for layer, parts in store.items()}
    return np.concatenate(ids), caps
