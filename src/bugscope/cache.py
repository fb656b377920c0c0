"""Per-layer activation cache: one forward pass per batch fills one Parquet file per hook (layer and site).

A file holds one row per (prompt, position): `prompt_id`, `position` (unpadded), `activation`
(a fixed-size list of d_model values in the storage dtype). Only the requested positions are
gathered inside the hook, so memory holds one batch of one layer at a time, never all layers of
all prompts; each batch is appended as a row group and every file is renamed into place at the end.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from bugscope import tables
from bugscope.forward import capture_sites, iter_batches, run_decoder
from bugscope.io import STORAGE_DTYPES, atomic_path, encode_metadata, vectors_to_arrow
from bugscope.sites import parse_hook_name

INDEX_COLUMNS = ["prompt_id", "position"]


class NonFiniteActivationError(RuntimeError):
    pass


def activation_schema(d_model: int, dtype: str, meta: dict) -> pa.Schema:
    return pa.schema(
        [("prompt_id", pa.int32()), ("position", pa.int32()),
         ("activation", pa.list_(STORAGE_DTYPES[dtype], d_model))],
        metadata=encode_metadata(meta),
    )


def positions_for(row: dict, mode: str) -> list[int]:
    """Positions of one analysis prompt to cache: 'decision', 'aligned' (the aligned positions and
    the prompt's last token, where the original study read its features) or 'all'."""
    if mode == "decision":
        return [row["decision_pos"]]
    if mode == "aligned":
        return sorted({*row["aligned_positions"], row["prompt_last_pos"]})
    if mode == "all":
        return list(range(len(row["input_ids"])))
    raise ValueError(f"unknown position mode {mode!r}")


@torch.inference_mode()
def cache_activations(
    model, rows: Sequence[dict], *, hooks: Sequence[str], dtype: str,
    out_paths: dict[str, str], meta: dict, batch_size: int, pad_token_id: int, desc: str = "caching",
) -> int:
    """rows: dicts with prompt_id, input_ids and `positions` (unpadded); `hooks`: the hook names to
    cache (bugscope.sites.hook_name), one file each (`out_paths[hook]`). Returns rows written per file."""
    device = next(model.parameters()).device
    d_model = model.config.hidden_size
    written = 0
    by_id = {r["prompt_id"]: r for r in rows}
    with contextlib.ExitStack() as stack:
        writers = {}
        for hook in hooks:
            layer, site = parse_hook_name(hook)
            tmp = stack.enter_context(atomic_path(out_paths[hook]))
            schema = activation_schema(d_model, dtype, {
                **meta, "kind": tables.PROMPT_ACTIVATIONS.kind, "layer": layer, "site": site,
                "hook_name": hook, "dtype": dtype, "d_model": d_model,
            })
            # Float activations barely compress, and dictionary-encoding them costs 6x the write and
            # makes the file larger: plain, uncompressed values keep caching near forward speed.
            writers[hook] = stack.enter_context(pq.ParquetWriter(
                tmp, schema, compression="none", use_dictionary=INDEX_COLUMNS, write_statistics=INDEX_COLUMNS))
        for batch in tqdm(list(iter_batches(rows, batch_size, pad_token_id, device)), desc=desc, unit="batch"):
            ids = batch.prompt_ids.tolist()
            row_idx, pos, prompt_col, pos_col = [], [], [], []
            for i, pid in enumerate(ids):
                for p in by_id[pid]["positions"]:
                    row_idx.append(i)
                    pos.append(int(batch.pad[i]) + p)
                    prompt_col.append(pid)
                    pos_col.append(p)
            row_t = torch.tensor(row_idx, device=device)
            pos_t = torch.tensor(pos, device=device)
            ids_arr = pa.array(prompt_col, pa.int32())
            pos_arr = pa.array(pos_col, pa.int32())
            pending = set(hooks)

            def on_output(hook, hidden):
                acts = hidden[row_t, pos_t]  # [n, d_model]
                # One reduction (amax propagates NaN; an Inf is its own maximum), not a mask per element.
                if not torch.isfinite(acts.abs().amax()):
                    bad = sorted({prompt_col[i] for i in (~torch.isfinite(acts)).any(-1).nonzero().flatten().tolist()})
                    raise NonFiniteActivationError(
                        f"NaN or Inf activations at {hook} for prompt ids {bad[:10]}. "
                        "The model or its dtype is numerically unstable here: run it in float32 "
                        "(model.dtype) or check the checkpoint."
                    )
                writers[hook].write_table(pa.Table.from_arrays(
                    [ids_arr, pos_arr, vectors_to_arrow(acts, dtype)], schema=writers[hook].schema))
                pending.discard(hook)
                if not pending:
                    raise _StopForward

            with capture_sites(model, hooks, on_output):
                try:
                    run_decoder(model, batch)
                except _StopForward:
                    pass
            written += len(prompt_col)
    return written


class _StopForward(Exception):
    """Raised by the last hooked layer: later layers and the unembedding are not needed."""
