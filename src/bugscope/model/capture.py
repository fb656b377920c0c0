"""Reading tensors out of a forward pass without changing it: a layer's tensors at the decision
position (`capture_decision`, for the direct head attribution), the decision logit difference read
at every layer (`decision_lens`) and one module's output (`recorded_output`, e.g. an SAE-Lens hook
point)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from bugscope.model.forward import Batch, decision_logits, iter_batches, logit_diff, run_decoder
from bugscope.model.sites import (
    decoder_layers,
    final_norm,
    final_norm_epsilon,
    head_input_module,
    logit_softcap,
    output_tensor,
    site_module,
    unembedding,
)


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


def _decision_batches(model, rows: Sequence[dict], *, layers: Sequence[int], batch_size: int, pad_token_id: int,
                      logits: bool) -> Iterator[tuple[Batch, dict[int, LayerCapture], torch.Tensor | None]]:
    """Per batch (iter_batches: by length), the decision-position tensors of `layers` and, with
    `logits`, the model's own decision logits of the same forward (else the forward stops after the
    last captured layer)."""
    device = next(model.parameters()).device
    keys = ("resid_pre", "z", "attn_out", "mlp_out", "resid_post")
    store: dict[int, dict[str, torch.Tensor]] = {}
    last = max(layers)
    handles = []

    def keep(layer, key, t):
        # float32 holds a float32 or bfloat16 model's values exactly; the attribution works in float64
        store.setdefault(layer, {})[key] = t[:, -1, :].detach().to("cpu", torch.float32)

    for layer in layers:
        block = decoder_layers(model)[layer]

        def pre_hook(_m, args, kwargs, layer=layer):
            keep(layer, "resid_pre", args[0] if args else kwargs["hidden_states"])

        def post_hook(_m, _i, out, layer=layer):
            keep(layer, "resid_post", output_tensor(out))
            if layer == last and not logits:
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
    try:
        for batch in iter_batches(rows, batch_size, pad_token_id, device):
            store.clear()
            out = None
            if logits:
                out = decision_logits(model, batch)
            else:
                try:
                    run_decoder(model, batch)
                except _StopForward:
                    pass
            yield batch, {layer: LayerCapture(**{k: store[layer][k] for k in keys}) for layer in layers}, out
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def capture_decision(model, rows: Sequence[dict], *, layers: Sequence[int], batch_size: int,
                     pad_token_id: int) -> tuple[np.ndarray, dict[int, LayerCapture]]:
    """One forward pass per batch; returns prompt ids and, per layer, the decision-position tensors."""
    ids, parts = [], {layer: [] for layer in layers}
    for batch, caps, _ in _decision_batches(model, rows, layers=layers, batch_size=batch_size,
                                            pad_token_id=pad_token_id, logits=False):
        ids.append(batch.prompt_ids.numpy())
        for layer in layers:
            parts[layer].append(caps[layer])
    return np.concatenate(ids), {layer: LayerCapture(**{k: torch.cat([getattr(c, k) for c in caps])
                                                        for k in LayerCapture.__dataclass_fields__})
                                 for layer, caps in parts.items()}


@dataclass
class DecisionLens:
    """Per prompt ([n] or [n, layers]), the correct-minus-wrong logit difference at the decision position."""

    prompt_ids: np.ndarray  # [n]
    logit_diff: np.ndarray  # [n] the model's own (float32, as bugscope.data.baseline.score_prompts has it)
    lens: np.ndarray  # [n, layers] the logit lens: the final norm and unembedding applied to the residual after each layer
    embedding_attribution: np.ndarray  # [n] direct attribution of the token embedding
    attn_attribution: np.ndarray  # [n, layers] direct attribution of each attention block's write
    mlp_attribution: np.ndarray  # [n, layers] direct attribution of each MLP block's write


@torch.inference_mode()
def decision_lens(model, rows: Sequence[dict], *, batch_size: int, pad_token_id: int) -> DecisionLens:
    """The decision logit difference read at every layer, and its direct attribution to each block.

    The lens applies the final norm (its own scale for each residual) and the unembedding, then the
    family's logit soft-cap, so its last layer is the model's own logit difference. The direct
    attributions hold the final residual's norm scale fixed (the norm is RMS: linear once its scale
    is fixed) and sum to the last layer's lens before any soft-cap, to rounding: the embedding plus
    every block's write is the final residual. One forward per batch, the batches of
    `score_prompts`: its `logit_diff` is the model's own, bit for bit. Memory does not grow with the
    prompts times the layers."""
    n_layers = model.config.num_hidden_layers
    norm, head, eps, cap = final_norm(model), unembedding(model).weight, final_norm_epsilon(model), logit_softcap(model)
    dtype = head.dtype

    def rms(x):  # float64 [n, d] -> [n, 1]
        return (x.square().mean(-1, keepdim=True) + eps).sqrt()

    ids, scores, lens, embedding, attn, mlp = [], [], [], [], [], []
    for batch, caps, logits in _decision_batches(model, rows, layers=range(n_layers), batch_size=batch_size,
                                                 pad_token_id=pad_token_id, logits=True):
        w_correct, w_wrong = head[batch.correct_token].cpu().double(), head[batch.wrong_token].cpu().double()
        direction = w_correct - w_wrong

        def normed(x):  # the final norm in the model's dtype, as the model applies it
            return norm(x.to(head.device, dtype)).cpu().double()

        def read(x):
            h = normed(x)
            c, w = (h * w_correct).sum(-1), (h * w_wrong).sum(-1)
            if cap is not None:
                c, w = cap * torch.tanh(c / cap), cap * torch.tanh(w / cap)
            return c - w

        scale = rms(caps[n_layers - 1].resid_post.double())

        def attribute(x):  # x times the norm's weight over the final residual's RMS, on the direction
            x = x.double()
            return (normed(x) * rms(x) / scale * direction).sum(-1)

        ids.append(batch.prompt_ids.numpy())
        scores.append(logit_diff(logits, batch))
        lens.append(torch.stack([read(caps[layer].resid_post) for layer in range(n_layers)], -1))
        embedding.append(attribute(caps[0].resid_pre))
        attn.append(torch.stack([attribute(caps[layer].attn_out) for layer in range(n_layers)], -1))
        mlp.append(torch.stack([attribute(caps[layer].mlp_out) for layer in range(n_layers)], -1))
    return DecisionLens(np.concatenate(ids), *(torch.cat(x).numpy() for x in (scores, lens, embedding, attn, mlp)))
