"""Reading tensors out of a forward pass without changing it: a layer's tensors at the decision
position (`capture_decision`, for the direct head attribution), the decision logit difference read
at every layer (`decision_lens`) and one module's output (`recorded_output`, e.g. an SAE-Lens hook
point)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from typing import Iterator, Sequence

import numpy as np
import torch

from bugscope.model.forward import Batch, LayerRunner, decision_logits, iter_batches, logit_diff, run_decoder
from bugscope.model.sites import (
    decoder_layers,
    final_norm,
    final_norm_epsilon,
    head_input_module,
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


# The tensors a LayerCapture holds, by name.
_CAPTURED = tuple(f.name for f in fields(LayerCapture))


class _StopForward(Exception):
    pass


def _decision_batches(model, rows: Sequence[dict], *, layers: Sequence[int], batch_size: int, pad_token_id: int,
                      logits: bool) -> Iterator[tuple[Batch, dict[int, LayerCapture], torch.Tensor | None]]:
    """Per batch (iter_batches: by length), the decision-position tensors of `layers` and, with
    `logits`, the model's own decision logits of the same forward (else the forward stops after the
    last captured layer)."""
    device = next(model.parameters()).device
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
            yield batch, {layer: LayerCapture(**{k: store[layer][k] for k in _CAPTURED}) for layer in layers}, out
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
    return np.concatenate(ids), {layer: LayerCapture(**{k: torch.cat([getattr(c, k) for c in caps]) for k in _CAPTURED})
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

    The lens reads each layer's residual as the model's head reads the last one
    (`LayerRunner.decision_logit_diff`: the final norm with its own scale, the two unembedding rows,
    the family's soft-cap), so its last layer is the model's own logit difference. The direct
    attributions hold the final residual's norm scale fixed (the norm is RMS: linear once its scale
    is fixed) and sum to the last layer's lens before any soft-cap, to rounding: the embedding plus
    every block's write is the final residual. One forward per batch, the batches of
    `score_prompts`: its `logit_diff` is the model's own, bit for bit. Memory does not grow with the
    prompts times the layers."""
    n_layers = model.config.num_hidden_layers
    runner = LayerRunner(model)  # its decision_logit_diff reads a residual as the model's head does
    norm, head, eps = final_norm(model), unembedding(model).weight, final_norm_epsilon(model)

    def rms(x):  # float64 [..., d] -> [..., 1]
        return (x.square().mean(-1, keepdim=True) + eps).sqrt()

    ids, scores, lens, embedding, attn, mlp = [], [], [], [], [], []
    for batch, caps, logits in _decision_batches(model, rows, layers=range(n_layers), batch_size=batch_size,
                                                 pad_token_id=pad_token_id, logits=True):
        # every layer's residual as one replica of the batch (layer-major), read in one call
        residuals = torch.cat([caps[layer].resid_post for layer in range(n_layers)])
        read = runner.decision_logit_diff(residuals.to(head.device, head.dtype), batch, replicas=n_layers)
        # the embedding and every block's write: x times the norm's weight (the norm of x in the model's
        # dtype, times x's own RMS) over the final residual's RMS, on the correct - wrong unembedding
        writes = torch.stack([caps[0].resid_pre, *(caps[layer].attn_out for layer in range(n_layers)),
                              *(caps[layer].mlp_out for layer in range(n_layers))]).double()  # [1 + 2L, b, d]
        weighted = norm(writes.to(head.device, head.dtype)).cpu().double() * rms(writes)
        direction = head[batch.correct_token].cpu().double() - head[batch.wrong_token].cpu().double()
        attribution = (weighted / rms(caps[n_layers - 1].resid_post.double()) * direction).sum(-1)  # [1 + 2L, b]
        ids.append(batch.prompt_ids.numpy())
        scores.append(logit_diff(logits, batch))
        lens.append(read.double().reshape(n_layers, -1).T)
        embedding.append(attribution[0])
        attn.append(attribution[1:1 + n_layers].T)
        mlp.append(attribution[1 + n_layers:].T)
    return DecisionLens(np.concatenate(ids), *(torch.cat(x).numpy() for x in (scores, lens, embedding, attn, mlp)))
