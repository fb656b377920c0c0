"""Crash-safe files and provenance-carrying Parquet tables.

Every file the pipeline writes goes through `atomic_path`: it is written under a temporary name in
its final folder, fsynced and renamed, so a killed job never leaves a file that looks complete.
Every Parquet table carries `bugscope.*` metadata (kind, config hash, model, ...) and readers refuse
a table whose kind or config hash is not the one they expect.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    import torch

META_PREFIX = "bugscope."
TMP_MARKER = ".tmp-"

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class DiskFullError(OSError):
    """An output could not be written because its disk is full."""


class StaleTableError(RuntimeError):
    """A Parquet table is truncated, foreign or was written under another config."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_files(paths: Sequence[str | os.PathLike]) -> None:
    """fsync many files at once: each call mostly waits on the disk, so threads overlap the waits
    (the later fsync of `atomic_path` then finds nothing left to flush)."""
    def sync(path):
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
    with ThreadPoolExecutor(max_workers=min(16, max(1, len(paths)))) as pool:
        list(pool.map(sync, paths))


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success fsync it and rename it into place.

    On any exception the temporary file or folder is removed and `final` is left untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # Temporaries of a writer that was killed (SIGKILL, node failure) never got cleaned up; only
    # one job writes a given output at a time, so any left beside `final` are dead.
    for stale in final.parent.glob(final.name + TMP_MARKER + "*"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=final.name + TMP_MARKER, dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=final.name + TMP_MARKER, dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        files = [p for p in tmp.rglob("*") if p.is_file()] if is_dir else [tmp]
        for f in files:
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if is_dir and final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException as err:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise DiskFullError(
                f"The disk holding {final.parent} is full: {final.name} could not be written and "
                "nothing was left behind. Free some space (or point the workflow at a larger disk "
                "with snakemake --directory) and rerun; finished outputs are kept."
            ) from err
        raise


def installed_file(package: str, relative: str, *, not_installed: str, missing: str,
                   error: type[Exception]) -> Path:
    """The file `relative` inside the installed distribution `package` (data shipped in a wheel).

    Raises `error(not_installed)` when the package is absent and `error(missing)` when the file is;
    `missing` may name `{version}` and `{path}`.
    """
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError as err:
        raise error(not_installed) from err
    path = Path(dist.locate_file(relative))
    if not path.is_file():
        raise error(missing.format(version=dist.version, path=path))
    return path


def encode_metadata(meta: Mapping[str, object]) -> dict[bytes, bytes]:
    return {(META_PREFIX + k).encode(): json.dumps(v, sort_keys=True).encode() for k, v in meta.items()}


def decode_metadata(raw: Mapping[bytes, bytes] | None) -> dict[str, object]:
    out = {}
    for k, v in (raw or {}).items():
        key = k.decode()
        if key.startswith(META_PREFIX):
            out[key[len(META_PREFIX):]] = json.loads(v)
    return out


def with_metadata(table: pa.Table, meta: Mapping[str, object]) -> pa.Table:
    existing = dict(table.schema.metadata or {})
    existing.update(encode_metadata(meta))
    return table.replace_schema_metadata(existing)


def write_table(table: pa.Table, path: str | os.PathLike, meta: Mapping[str, object]) -> None:
    """Write `table` atomically with provenance `meta` (must include `kind`)."""
    if "kind" not in meta:
        raise ValueError("table metadata must name its kind")
    with atomic_path(path) as tmp:
        write_parquet(table, tmp, meta)


def write_parquet(table: pa.Table, path: str | os.PathLike, meta: Mapping[str, object]) -> None:
    """The pipeline's Parquet encoding (zstd) with `bugscope.*` metadata, written at `path` as is."""
    pq.write_table(with_metadata(table, meta), path, compression="zstd")


def read_metadata(path: str | os.PathLike) -> dict[str, object]:
    try:
        return decode_metadata(pq.read_schema(path).metadata)
    except (pa.ArrowInvalid, OSError) as err:
        raise StaleTableError(
            f"{path} is not a readable Parquet file ({err}). It is truncated or foreign: remake it "
            f"with `snakemake --cores all --force {path}`, then rerun the pipeline."
        ) from err


def check_metadata(path, meta: Mapping[str, object], *, kind: str, config_hash: str | None) -> None:
    found_kind = meta.get("kind")
    if found_kind != kind:
        raise StaleTableError(
            f"{path} holds a {found_kind or 'non-bugscope'} table where a '{kind}' table was expected. "
            f"It was not written by this pipeline step: remake it with `snakemake --cores all --force {path}`."
        )
    if config_hash is not None and meta.get("config_hash") != config_hash:
        raise StaleTableError(
            f"{path} was written under config hash {meta.get('config_hash')}, but the current config "
            f"hashes to {config_hash} for the settings this table depends on. It is stale: remake it "
            f"with `snakemake --cores all --force {path}`, then rerun the pipeline (by default "
            "Snakemake reruns a rule whose settings changed; this happens with --rerun-triggers mtime "
            "or a file copied from another run)."
        )


def check_table(path, *, kind: str, config_hash: str | None) -> dict:
    """The metadata of a bugscope table, after checking its kind and config hash (for readers that
    stream the file themselves)."""
    meta = read_metadata(path)
    check_metadata(path, meta, kind=kind, config_hash=config_hash)
    return meta


def read_table(path, *, kind: str, config_hash: str | None = None, columns=None) -> tuple[pa.Table, dict]:
    """Read a bugscope table, checking its kind and (if given) the config hash it was made under."""
    meta = check_table(path, kind=kind, config_hash=config_hash)
    try:
        table = pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, OSError) as err:
        raise StaleTableError(f"{path} cannot be read ({err}): rerun the rule that writes it.") from err
    return table, meta


# --- dense vectors in Parquet -------------------------------------------------------------------

def storage_torch_dtype(dtype: str):
    """The torch dtype of a storage dtype name. torch is imported here, not at the top: the light
    jobs (figures, tables, the ledger) import this module and never need it (1.5 s a job)."""
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def vector_type(d: int, dtype: str) -> pa.DataType:
    """Arrow type of one stored vector: its d values in the storage dtype, little-endian, back to back."""
    return pa.binary(d * DTYPE_BYTES[dtype])


def vectors_to_arrow(x: torch.Tensor, dtype: str) -> pa.FixedSizeBinaryArray:
    """[n, d] tensor -> one fixed-size binary value per row (`vector_type`).

    One opaque value per row rather than a list of d numbers: Parquet writes a list with a
    definition and a repetition level per element, which made encoding 5-10x slower than copying
    the bytes, the largest cost of caching after the forward pass itself.
    """
    import torch

    x = x.detach().cpu().to(storage_torch_dtype(dtype)).contiguous()
    n, d = x.shape
    raw = x.view(torch.uint8).numpy()  # bfloat16 has no NumPy dtype; its bytes do
    return pa.Array.from_buffers(vector_type(d, dtype), n, [None, pa.py_buffer(raw)])


def arrow_to_numpy_vectors(col: pa.ChunkedArray | pa.FixedSizeBinaryArray, dtype: str) -> np.ndarray:
    """Inverse of `vectors_to_arrow`, without torch (the light jobs read it): float32 [n, d].
    bfloat16 has no NumPy dtype: its 16 bits are the top half of the float32 with the same value."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    width = col.type.byte_width
    raw = np.frombuffer(col.buffers()[1], dtype=np.uint8, count=len(col) * width, offset=col.offset * width)
    if dtype == "bfloat16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(len(col), -1)
    return raw.view({"float32": "<f4", "float16": "<f2"}[dtype]).astype(np.float32).reshape(len(col), -1)


def arrow_to_vectors(col: pa.ChunkedArray | pa.FixedSizeBinaryArray, dtype: str) -> torch.Tensor:
    """`arrow_to_numpy_vectors` as a torch tensor: float32 [n, d]."""
    import torch

    return torch.from_numpy(arrow_to_numpy_vectors(col, dtype))
