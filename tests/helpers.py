"""Readers that only the tests need: dense SAE features from the sparse table, a PNG's size."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch


def sparse_to_dense(features: pa.Table, keys: Sequence[tuple[int, int]], d_sae: int) -> torch.Tensor:
    """[len(keys), d_sae] dense features for the (prompt_id, position) keys, zeros where no row exists."""
    index = {(int(p), int(q)): i for i, (p, q) in enumerate(keys)}
    out = torch.zeros(len(keys), d_sae)
    pid = features.column("prompt_id").to_pylist()
    pos = features.column("position").to_pylist()
    rows = torch.tensor([index[(a, b)] for a, b in zip(pid, pos)], dtype=torch.long)
    if len(rows):
        out[rows, torch.from_numpy(features.column("feature_id").to_numpy().astype(np.int64))] = torch.from_numpy(
            features.column("activation").to_numpy().astype(np.float32))
    return out


def png_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; raises ValueError for anything that is not a PNG."""
    head = Path(path).read_bytes()[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ValueError(f"{path} is not a PNG file")
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
