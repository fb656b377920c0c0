"""Removing a reading from the residual stream at the decision position: the causal test of
bugscope.data.reading.

`reading_pass` runs each batch once, unsteered, keeping every layer's keys and values and the
residual stream after the captured layers at each row's `positions`; then it reruns the decision
column alone from the first steered layer, one replica per condition (`Steer`). In a replica, every
steered layer's output loses its component along the condition's unit direction, h <- h - (h . u) u,
and the condition's SAE features are ablated: h <- h + decode(f with them zeroed) - decode(f), f =
encode(h), so the SAE's error term stays. The earlier columns are left as they are: the reading is
removed where the answer is made, and the rerun costs one column per condition, not a forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from bugscope.model.forward import KVRecorder, LayerRunner, iter_batches
from bugscope.model.sites import site_writer_hook


@dataclass(frozen=True)
class Steer:
    """One condition: per layer, a unit direction to project out and SAE feature ids to ablate."""

    directions: Mapping[int, torch.Tensor] = field(default_factory=dict)  # layer -> [d_model]
    features: Mapping[int, Sequence[int]] = field(default_factory=dict)  # layer -> feature ids (needs its SAE)

    def steered_layers(self) -> set[int]:
        return set(self.directions) | {layer for layer, ids in self.features.items() if len(ids)}


@dataclass
class ReadingPass:
    prompt_ids: np.ndarray  # [n]
    logit_diff: np.ndarray  # [n, 1 + conditions]: unsteered, then each condition (float64 of float32 values)
    captured_ids: np.ndarray  # [m] prompt id of each captured vector
    captured_positions: np.ndarray  # [m] its (unpadded) position
    vectors: dict[int, torch.Tensor]  # layer -> [m, d_model], in the model's dtype, on the host


def _writer(conditions: Sequence[Steer], layer: int, d_model: int, sae=None):
    """The resid_post write of `layer` over len(conditions) replicas of the decision column."""
    replicas = len(conditions)
    units = torch.stack([torch.as_tensor(c.directions[layer], dtype=torch.float32) if layer in c.directions
                         else torch.zeros(d_model) for c in conditions])  # [R, d]
    ablated = [list(c.features.get(layer, ())) for c in conditions]
    keep = None
    if any(ablated):
        if sae is None:
            raise ValueError(f"features are ablated at layer {layer}, but no SAE was given for it")
        keep = torch.ones(replicas, sae.W_dec.shape[0])
        for r, ids in enumerate(ablated):
            keep[r, ids] = 0.0

    def write(hidden):
        h = hidden.reshape(replicas, -1, *hidden.shape[1:])  # [R, b, 1, d]
        u = units.to(hidden.device, hidden.dtype)[:, None, None, :]
        h = h - (h * u).sum(-1, keepdim=True) * u
        if keep is not None:
            x = h.to(sae.W_dec.dtype)
            # SAE-Lens's normalising SAEs keep the last encode's statistics for one decode: encode before each
            kept = sae.decode(sae.encode(x) * keep.to(x.device, x.dtype)[:, None, None, :])
            h = h + (kept - sae.decode(sae.encode(x))).to(h.dtype)
        return h.reshape(hidden.shape)
    return write


@torch.inference_mode()
def reading_pass(model, rows: Sequence[dict], *, capture_layers: Sequence[int], conditions: Sequence[Steer],
                 batch_size: int, pad_token_id: int, saes: Mapping[int, object] | None = None) -> ReadingPass:
    """rows: prompt rows with `positions` (the positions to capture, possibly none); `conditions`:
    the `Steer` of each replica; `saes`: layer -> SAE-Lens SAE, for the layers whose features a
    condition ablates."""
    runner = LayerRunner(model)
    steered = sorted(set().union(*(c.steered_layers() for c in conditions))) if conditions else []
    start = steered[0] if steered else None
    d = model.config.hidden_size
    by_id = {r["prompt_id"]: r for r in rows}
    ids, diffs, cap_ids, cap_pos = [], [], [], []
    vectors: dict[int, list[torch.Tensor]] = {layer: [] for layer in capture_layers}
    for batch in tqdm(list(iter_batches(rows, batch_size, pad_token_id, runner.device)), desc="reading", unit="batch"):
        pairs = [(i, pid, p) for i, pid in enumerate(batch.prompt_ids.tolist()) for p in by_id[pid]["positions"]]
        row_idx = torch.tensor([i for i, _, _ in pairs], dtype=torch.long)
        col_idx = torch.tensor([int(batch.pad[i]) + p for i, _, p in pairs], dtype=torch.long)
        hidden, ctx = runner.begin(batch)
        rec = KVRecorder()
        entering = None
        for layer in range(runner.n_layers):
            if layer == start:
                entering = hidden
            hidden = runner.layer(layer, hidden, ctx, rec)
            if layer in vectors and pairs:
                vectors[layer].append(hidden[row_idx.to(hidden.device), col_idx.to(hidden.device)].cpu())
        per_condition = [runner.decision_logit_diff(hidden[:, -1], batch)]
        if steered:
            handles = [site_writer_hook(model, layer, "resid_post", _writer(conditions, layer, d, (saes or {}).get(layer)))
                       for layer in steered]
            try:
                out = runner.rerun_last_column(start, entering, ctx, rec.kv, replicas=len(conditions))
            finally:
                for h in handles:
                    h.remove()
            per_condition += list(runner.decision_logit_diff(out[:, -1], batch, len(conditions)).reshape(len(conditions), -1))
        ids.append(batch.prompt_ids.numpy())
        diffs.append(torch.stack(per_condition, dim=1).double().numpy())
        cap_ids += [pid for _, pid, _ in pairs]
        cap_pos += [p for _, _, p in pairs]
    return ReadingPass(np.concatenate(ids), np.concatenate(diffs), np.asarray(cap_ids, dtype=np.int32),
                       np.asarray(cap_pos, dtype=np.int32),
                       {layer: torch.cat(v) if v else torch.empty(0, d) for layer, v in vectors.items()})
