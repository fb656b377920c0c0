"""Cached activations as SAE input: one row group at a time from the activation Parquet files, never all
tokens in memory. Position 0 of every sequence is an attention sink with a huge norm (research notes
section 3): it is left out of training and of every quality metric.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bugscope.data.prompts import SINK_POSITION
from bugscope.io import arrow_to_vectors, read_metadata
from bugscope.model.cache import NonFiniteActivationError


@dataclass(frozen=True)
class ActivationSource:
    """One cached activation Parquet file and the rows of it to use."""

    path: str
    prompt_ids: frozenset[int] | None = None  # None: every prompt id
    drop_positions: frozenset[int] = frozenset({SINK_POSITION})


def _check_finite(x: torch.Tensor, ids: np.ndarray, path) -> None:
    if not torch.isfinite(x).all():
        bad = sorted(set(ids[(~torch.isfinite(x)).any(-1).numpy()].tolist()))
        raise NonFiniteActivationError(
            f"{path} holds NaN or Inf activations (prompt ids {bad[:10]}). The cache is corrupt or the "
            "model overflowed in its dtype: rerun the caching rule, in float32 (model.dtype) if it recurs."
        )


def read_row_group(source: ActivationSource, pf: pq.ParquetFile, i: int, dtype: str):
    """(prompt_id, position, activations [n, d]) of one row group, filtered and checked for NaN/Inf."""
    t = pf.read_row_group(i, columns=["prompt_id", "position"])
    ids = t.column("prompt_id").to_numpy()
    pos = t.column("position").to_numpy()
    keep = ~np.isin(pos, list(source.drop_positions))
    if source.prompt_ids is not None:
        keep &= np.isin(ids, list(source.prompt_ids))
    if not keep.any():  # e.g. the held-out text: most row groups hold none of it, and are not decoded
        return ids[:0], pos[:0], None
    idx = np.nonzero(keep)[0]
    x = arrow_to_vectors(pf.read_row_group(i, columns=["activation"]).column("activation").take(pa.array(idx)), dtype)
    _check_finite(x, ids[idx], source.path)
    return ids[idx], pos[idx], x


def iter_activations(sources: Sequence[ActivationSource]) -> Iterator[tuple]:
    """Yield (prompt_id, position, [n, d] float32) per row group, in file order."""
    for source in sources:
        pf = pq.ParquetFile(source.path)
        dtype = _file_dtype(source.path)
        for i in range(pf.num_row_groups):
            ids, pos, x = read_row_group(source, pf, i, dtype)
            if x is not None:
                yield ids, pos, x


def _file_dtype(path) -> str:
    return read_metadata(path).get("dtype", "float32")


class ActivationStream:
    """An endless iterator of shuffled [batch_size, d_in] float32 batches from cached Parquet files.

    Each epoch visits the row groups of all sources in an order drawn from `seed`; rows go through
    a mixing buffer of `buffer_rows` rows that is shuffled before batches are taken from it. Memory
    holds one buffer, never a whole file. This is SAE-Lens's `DataProvider` (an iterator of batches).
    """

    def __init__(self, sources: Sequence[ActivationSource], *, batch_size: int, seed: int,
                 buffer_rows: int = 16384, device: str = "cpu"):
        self.sources = list(sources)
        self.batch_size = batch_size
        self.buffer_rows = max(buffer_rows, 2 * batch_size)
        self.device = device
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.files = [(s, pq.ParquetFile(s.path), _file_dtype(s.path)) for s in self.sources]
        self.groups = [(f, g) for f, (_, pf, _) in enumerate(self.files) for g in range(pf.num_row_groups)]
        self._it = self._batches()

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        return next(self._it)

    def _batches(self) -> Iterator[torch.Tensor]:
        buffer: list[torch.Tensor] = []
        n_buffered = 0
        while True:
            order = list(self.groups)
            self.rng.shuffle(order)
            produced = False
            for f, g in order:
                source, pf, dtype = self.files[f]
                _, _, x = read_row_group(source, pf, g, dtype)
                if x is None:
                    continue
                buffer.append(x)
                n_buffered += x.shape[0]
                produced = True
                if n_buffered >= self.buffer_rows:
                    yield from self._drain(buffer, keep_half=True)
                    n_buffered = sum(b.shape[0] for b in buffer)
            if not produced:
                raise ValueError(
                    f"No activation rows to train on in {', '.join(s.path for s in self.sources)} "
                    "(after leaving out position 0 and held-out prompts). Increase sae.corpus.train_tokens."
                )
            if n_buffered >= self.batch_size:
                yield from self._drain(buffer, keep_half=False)
                n_buffered = sum(b.shape[0] for b in buffer)

    def _drain(self, buffer: list[torch.Tensor], keep_half: bool) -> Iterator[torch.Tensor]:
        data = torch.cat(buffer)
        data = data[torch.randperm(data.shape[0], generator=self.gen)]
        n_out = data.shape[0] // 2 if keep_half else data.shape[0]
        n_out -= n_out % self.batch_size
        buffer.clear()
        if n_out < data.shape[0]:
            buffer.append(data[n_out:])
        for start in range(0, n_out, self.batch_size):
            yield data[start:start + self.batch_size].to(self.device)
