"""Per-layer activation cache: one forward pass per batch fills one Parquet file per hook (layer and site).

A file holds one row per (prompt, position): `prompt_id`, `position` (unpadded), `activation`
(d_model values in the storage dtype as one fixed-size binary value, `bugscope.io.vector_type`;
`bugscope.io.arrow_to_vectors` decodes a column, `np.frombuffer(value, dtype)` one value). Only
the requested positions are gathered inside the hook; each batch is appended as a row group and every file is renamed into
place at the end. The hook only gathers and starts the copy to the host: one writer thread encodes
and writes while the model runs on, so the Parquet encoding (and on a GPU the device-to-host copy)
overlaps the forward pass. At most `MAX_PENDING_WRITES` gathered layers wait for it, which bounds
memory to a few layers of one batch, never all layers of all prompts.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from bugscope import tables
from bugscope.io import (
    atomic_path,
    encode_metadata,
    fsync_files,
    storage_torch_dtype,
    vector_type,
    vectors_to_arrow,
)
from bugscope.model.forward import capture_sites, iter_batches, run_decoder
from bugscope.model.sites import parse_hook_name

INDEX_COLUMNS = ["prompt_id", "position"]
MAX_PENDING_WRITES = 8


class NonFiniteActivationError(RuntimeError):
    pass


def activation_schema(d_model: int, dtype: str, meta: dict) -> pa.Schema:
    return pa.schema(
        [("prompt_id", pa.int32()), ("position", pa.int32()),
         ("activation", vector_type(d_model, dtype))],
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
    cache (bugscope.model.sites.hook_name), one file each (`out_paths[hook]`). Returns rows written per file."""
    device = next(model.parameters()).device
    d_model = model.config.hidden_size
    written = 0
    by_id = {r["prompt_id"]: r for r in rows}
    with contextlib.ExitStack() as stack:
        writers, tmps = {}, []
        for hook in hooks:
            layer, site = parse_hook_name(hook)
            tmp = stack.enter_context(atomic_path(out_paths[hook]))
            tmps.append(tmp)
            schema = activation_schema(d_model, dtype, {
                **meta, "kind": tables.PROMPT_ACTIVATIONS.kind, "layer": layer, "site": site,
                "hook_name": hook, "dtype": dtype, "d_model": d_model,
            })
            # Float activations barely compress, and dictionary-encoding them costs 6x the write and
            # makes the file larger: plain, uncompressed values keep caching near forward speed.
            writers[hook] = stack.enter_context(pq.ParquetWriter(
                tmp, schema, compression="none", use_dictionary=INDEX_COLUMNS, write_statistics=INDEX_COLUMNS))
        # Entered last, so left first: every write has finished (or failed) before the files close.
        writes = stack.enter_context(_OrderedWrites(MAX_PENDING_WRITES))
        for batch in tqdm(list(iter_batches(rows, batch_size, pad_token_id, device)), desc=desc, unit="batch"):
            ids = batch.prompt_ids.tolist()
            row_idx, pos, prompt_col, pos_col = [], [], [], []
            for i, pid in enumerate(ids):
                for p in by_id[pid]["positions"]:
                    row_idx.append(i)
                    pos.append(int(batch.pad[i]) + p)
                    prompt_col.append(pid)
                    pos_col.append(p)
            seq_len = batch.input_ids.shape[1]
            flat_t = torch.tensor([i * seq_len + p for i, p in zip(row_idx, pos)], device=device)
            ids_arr = pa.array(prompt_col, pa.int32())
            pos_arr = pa.array(pos_col, pa.int32())
            pending = set(hooks)

            def on_output(hook, hidden):
                acts = hidden.reshape(-1, d_model).index_select(0, flat_t)  # [n, d_model]; 7x faster than hidden[rows, pos]
                # One reduction (amax propagates NaN; an Inf is its own maximum), read by the writer.
                host, finite, copied = _start_host_copy(acts, torch.isfinite(acts.abs().amax()), dtype)
                writes.submit(_write_batch, writers[hook], hook, prompt_col, ids_arr, pos_arr, host, finite, copied,
                              dtype)
                pending.discard(hook)
                if not pending:
                    raise _StopForward

            with capture_sites(model, hooks, on_output):
                try:
                    run_decoder(model, batch)
                except _StopForward:
                    pass
            written += len(prompt_col)
        writes.close()
        for writer in writers.values():
            writer.close()
        fsync_files(tmps)
    return written


def write_activations(path: str, prompt_ids, positions, vectors: torch.Tensor, *, hook: str, dtype: str,
                      meta: dict) -> None:
    """One hook's activations gathered elsewhere (bugscope.model.steering.reading_pass) as a prompt
    activation file of this module's layout, written atomically."""
    layer, site = parse_hook_name(hook)
    if not bool(torch.isfinite(vectors).all()):
        raise NonFiniteActivationError(f"NaN or Inf activations at {hook}: run the model in float32 (model.dtype).")
    schema = activation_schema(vectors.shape[1], dtype, {
        **meta, "kind": tables.PROMPT_ACTIVATIONS.kind, "layer": layer, "site": site, "hook_name": hook,
        "dtype": dtype, "d_model": vectors.shape[1]})
    table = pa.Table.from_arrays([pa.array(prompt_ids, pa.int32()), pa.array(positions, pa.int32()),
                                  vectors_to_arrow(vectors.to(storage_torch_dtype(dtype)), dtype)], schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="none", use_dictionary=INDEX_COLUMNS, write_statistics=INDEX_COLUMNS)


def _start_host_copy(acts: torch.Tensor, finite: torch.Tensor, dtype: str):
    """(acts in the storage dtype, the finite flag, copy-done event) on the host. From a GPU both go
    to pinned memory without blocking and the event marks the end of the copy; on the CPU they are
    the tensors themselves and the event is None."""
    acts = acts.to(storage_torch_dtype(dtype))
    if acts.device.type != "cuda":
        return acts, finite, None
    host = torch.empty(acts.shape, dtype=acts.dtype, pin_memory=True)
    host.copy_(acts, non_blocking=True)
    host_finite = torch.empty((), dtype=torch.bool, pin_memory=True)
    host_finite.copy_(finite, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return host, host_finite, copied


def _write_batch(writer: pq.ParquetWriter, hook: str, prompt_col: list[int], ids_arr: pa.Array, pos_arr: pa.Array,
                 acts: torch.Tensor, finite: torch.Tensor, copied, dtype: str) -> None:
    """One batch of one hook, on the writer thread: numpy and pyarrow work only, so that it never
    competes with the forward pass for torch's thread pool (save on the rare error path)."""
    if copied is not None:
        copied.synchronize()
    if not bool(finite):
        bad = sorted({prompt_col[i] for i in (~torch.isfinite(acts.float())).any(-1).nonzero().flatten().tolist()})
        raise NonFiniteActivationError(
            f"NaN or Inf activations at {hook} for prompt ids {bad[:10]}. "
            "The model or its dtype is numerically unstable here: run it in float32 "
            "(model.dtype) or check the checkpoint."
        )
    writer.write_table(pa.Table.from_arrays([ids_arr, pos_arr, vectors_to_arrow(acts, dtype)], schema=writer.schema))


class _OrderedWrites:
    """Runs writes on one worker thread, in submission order (each file's row groups stay in batch
    order). `submit` blocks while `max_pending` writes wait, and raises the error of any write that
    failed; leaving the context waits for every write and raises the first error."""

    def __init__(self, max_pending: int):
        self.max_pending = max_pending
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bugscope-cache-write")
        self.futures: list[Future] = []

    def submit(self, fn, *args) -> None:
        self.futures.append(self.pool.submit(fn, *args))
        while self.futures and (self.futures[0].done() or len(self.futures) > self.max_pending):
            self.futures.pop(0).result()

    def close(self) -> None:
        """Wait for every write; raise the first error."""
        self.pool.shutdown(wait=True)
        while self.futures:
            self.futures.pop(0).result()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            for f in self.futures:
                f.cancel()
            self.pool.shutdown(wait=True)
        else:
            self.close()
        return False


class _StopForward(Exception):
    """Raised by the last hooked layer: later layers and the unembedding are not needed."""
