"""Encoding activations into sparse (prompt, position, feature, activation) rows.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import torch

from bugscope.sae.activations import ActivationSource, iter_activations

FEATURE_SCHEMA = pa.schema([
    ("prompt_id", pa.int32()), ("position", pa.int32()),
    ("feature_id", pa.int32()), ("activation", pa.float32()),
])


@torch.inference_mode()
def encode_sparse(sae, x: torch.Tensor, *, batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row [nnz], feature_id [nnz], activation [nnz]) of `sae.encode(x)` for x [n, d_in]; nonzeros only."""
    rows, feats, vals = [], [], []
    device = next(sae.parameters()).device
    topk = sae.cfg.architecture() == "topk"
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(device)
        if topk:
            r, f, v = _topk_sparse(sae, xb)
        else:
            acts = sae.encode(xb)  # [b, d_sae]
            r, f = acts.nonzero(as_tuple=True)
            v = acts[r, f]
        rows.append(r + start)
        feats.append(f)
        vals.append(v.float())
    if not rows:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, torch.zeros(0)
    return torch.cat(rows).cpu(), torch.cat(feats).cpu(), torch.cat(vals).cpu()


def _topk_sparse(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The non-zeros of a TopK SAE's `encode(x)` straight from its top-k, without the dense [b, d_sae] scatter.

    Same computation as SAE-Lens's TopKSAE.encode (pre-activation, optional decoder-norm rescale,
    torch.topk, ReLU); tests check equality with `sae.encode`.
    """
    pre = sae.process_sae_in(x) @ sae.W_enc
    pre += sae.b_enc  # [b, d_sae]; in place, the same bits as `+`
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        pre *= sae.W_dec.norm(dim=-1)
    values, index = torch.topk(pre, k=sae.cfg.k, dim=-1, sorted=False)  # [b, k]
    # topk's order is unspecified (it differs between machines); order by feature id, as dense
    # nonzero() does, so the feature table is byte-identical wherever it is computed.
    index, order = index.sort(dim=-1)
    values = values.gather(-1, order).clamp_min_(0).flatten()  # ReLU
    index = index.flatten()
    rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(sae.cfg.k)
    keep = (values > 0).nonzero().flatten()
    if keep.numel() == values.numel():  # the usual case: no top-k value is <= 0, nothing to drop
        return rows, index, values
    return rows.index_select(0, keep), index.index_select(0, keep), values.index_select(0, keep)


def encode_activation_file(sae, activations_path: str | Path, *, batch_size: int = 4096) -> pa.Table:
    """Sparse features of every cached (prompt, position) of one activation file."""
    pieces = []
    for ids, pos, x in iter_activations([ActivationSource(str(activations_path), drop_positions=frozenset())]):
        r, f, v = encode_sparse(sae, x, batch_size=batch_size)
        r = r.numpy()
        pieces.append(pa.Table.from_arrays([
            pa.array(ids[r], pa.int32()), pa.array(pos[r], pa.int32()),
            pa.array(f.numpy(), pa.int32()), pa.array(v.numpy(), pa.float32()),
        ], schema=FEATURE_SCHEMA))
    return pa.concat_tables(pieces) if pieces else FEATURE_SCHEMA.empty_table()
