"""Parquet round trips with provenance metadata, refusal of stale/foreign files, atomic writes."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bugscope.io import (
    StaleTableError,
    arrow_to_vectors,
    atomic_path,
    read_table,
    vectors_to_arrow,
    write_table,
)


def test_table_round_trip_keeps_metadata(tmp_path):
    path = tmp_path / "t.parquet"
    table = pa.table({"prompt_id": pa.array([0, 1, 2], pa.int32()), "x": [0.5, 1.5, -2.0]})
    write_table(table, path, {"kind": "demo", "config_hash": "abc", "layer": 3})
    back, meta = read_table(path, kind="demo", config_hash="abc")
    assert back.equals(table.replace_schema_metadata(back.schema.metadata))
    assert meta["layer"] == 3 and meta["config_hash"] == "abc"


def test_stale_and_foreign_tables_are_refused(tmp_path):
    path = tmp_path / "t.parquet"
    write_table(pa.table({"a": [1]}), path, {"kind": "demo", "config_hash": "abc"})
    with pytest.raises(StaleTableError, match="config hash"):
        read_table(path, kind="demo", config_hash="other")
    with pytest.raises(StaleTableError, match="'activations' table was expected"):
        read_table(path, kind="activations")
    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"a": [1]}), foreign)
    with pytest.raises(StaleTableError, match="non-bugscope"):
        read_table(foreign, kind="demo")


def test_truncated_parquet_is_refused(tmp_path):
    path = tmp_path / "t.parquet"
    write_table(pa.table({"a": list(range(1000))}), path, {"kind": "demo"})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StaleTableError, match="truncated or foreign"):
        read_table(path, kind="demo")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.numerical
def test_vectors_round_trip(dtype):
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    back = arrow_to_vectors(vectors_to_arrow(x, dtype), dtype)
    assert back.shape == x.shape
    # Storing rounds to nearest in the storage dtype: at most half its eps, relative (float32: exact).
    rel = 0.0 if dtype == "float32" else torch.finfo(getattr(torch, dtype)).eps / 2
    assert ((back - x).abs() <= rel * x.abs()).all()
    if dtype == "bfloat16":
        assert torch.equal(back, x.to(torch.bfloat16).float())
    # A slice (non-zero offset), a chunked column and a Parquet round trip decode the same rows.
    stored = back
    col = vectors_to_arrow(x, dtype)
    assert torch.equal(arrow_to_vectors(col.slice(2, 3), dtype), stored[2:5])
    assert torch.equal(arrow_to_vectors(pa.chunked_array([col.slice(0, 4), col.slice(4)]), dtype), stored)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"activation": col}), sink)
    read = pq.read_table(pa.BufferReader(sink.getvalue())).column("activation")
    assert torch.equal(arrow_to_vectors(read, dtype), stored)
    # One value per row holds the row's d values in the storage dtype, little-endian.
    assert col.type.byte_width == 5 * getattr(torch, dtype).itemsize
    if dtype == "float32":
        assert np.array_equal(np.frombuffer(col[3].as_py(), "<f4"), x[3].numpy())


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "out.parquet"
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert not final.exists()
    assert os.listdir(tmp_path) == []


def test_atomic_path_replaces_only_on_success(tmp_path):
    final = tmp_path / "out.txt"
    final.write_text("old")
    with atomic_path(final) as tmp:
        tmp.write_text("new")
        assert final.read_text() == "old"
    assert final.read_text() == "new"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_disk_full_write_is_clear_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    import bugscope.io as bio

    def full(table, where, **kwargs):
        with open(where, "wb") as fh:
            fh.write(b"PAR1 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bio.pq, "write_table", full)
    with pytest.raises(bio.DiskFullError, match="is full") as err:
        write_table(pa.table({"a": [1]}), tmp_path / "t.parquet", {"kind": "demo"})
    assert "nothing was left behind" in str(err.value)
    assert os.listdir(tmp_path) == []


def test_temporaries_of_a_killed_writer_are_removed(tmp_path):
    (tmp_path / "out.parquet.tmp-abc123").write_text("left by a SIGKILLed job")
    (tmp_path / "out.parquet.tmp-dir999").mkdir()
    (tmp_path / "other.parquet.tmp-keep").write_text("another output's writer")
    write_table(pa.table({"a": [1]}), tmp_path / "out.parquet", {"kind": "demo"})
    assert sorted(os.listdir(tmp_path)) == ["other.parquet.tmp-keep", "out.parquet"]


def test_registry_refuses_a_table_without_its_declared_columns(tmp_path, ci_config):
    from bugscope import tables
    from bugscope.config import validate_config

    cfg = validate_config(ci_config)
    path = tmp_path / "scores.parquet"
    meta = {"config_hash": tables.BASELINE_SCORES.config_hash(cfg)}
    good = pa.table({c: [1] for c in tables.BASELINE_SCORES.columns})
    tables.write(tables.BASELINE_SCORES, good, path, meta)
    assert tables.read(tables.BASELINE_SCORES, cfg, path)[0].num_rows == 1
    with pytest.raises(StaleTableError, match=r"lacks the column\(s\) \['is_correct'\]"):
        tables.write(tables.BASELINE_SCORES, good.drop(["is_correct"]), path, meta)
    write_table(good.drop(["is_correct"]), path, {"kind": "baseline_scores", **meta})  # an older writer
    with pytest.raises(StaleTableError, match="--force"):
        tables.read(tables.BASELINE_SCORES, cfg, path)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_the_light_decoder_reads_what_the_torch_one_reads(dtype):
    """Both decoders (arrow_to_vectors is the light one as a tensor) give torch's own cast of the
    stored values back, bfloat16 included, from an offset into the buffer."""
    import torch

    from bugscope.io import arrow_to_numpy_vectors, arrow_to_vectors, storage_torch_dtype, vectors_to_arrow

    x = torch.randn(7, 12, generator=torch.Generator().manual_seed(0)) * 100
    col = vectors_to_arrow(x, dtype).slice(2)
    stored = x[2:].to(storage_torch_dtype(dtype)).float().numpy()
    assert np.array_equal(arrow_to_numpy_vectors(col, dtype), stored)
    assert np.array_equal(arrow_to_vectors(col, dtype).numpy(), stored)
