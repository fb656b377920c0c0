"""The results-folder comparison reports a changed value, a changed metadata key and a missing file."""

import pyarrow as pa

from bugscope.io import write_table
from tests.compare_results import compare


def _tables(root, values, meta):
    write_table(pa.table({"x": values}), root / "t.parquet", meta)
    (root / "w.bin").write_bytes(b"weights")


def test_identical_folders_and_each_kind_of_difference(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    _tables(a, [1.0, 2.0], {"kind": "demo", "seed_value": 3})
    _tables(b, [1.0, 2.0], {"kind": "demo", "seed_value": 3})
    assert compare(a, b, {}) == ([], 2)
    _tables(b, [1.0, 2.0], {"kind": "demo", "original_value": 3})
    assert compare(a, b, {}) == (["t.parquet: metadata 'original_value' differs; metadata 'seed_value' differs"], 1)
    assert compare(a, b, {"seed_value": "original_value"}) == ([], 2)
    _tables(b, [1.0, 2.5], {"kind": "demo", "seed_value": 3})
    (b / "w.bin").write_bytes(b"other")
    (a / "old.json").write_text("{}")
    lines, same = compare(a, b, {})
    assert same == 0 and lines == ["only in " + str(a) + ": old.json", "t.parquet: data differ", "w.bin: bytes differ"]


def test_folder_renames_map_paths(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "analysis").mkdir(parents=True)
    (b / "features").mkdir(parents=True)
    _tables(a / "analysis", [1.0], {"kind": "demo"})
    _tables(b / "features", [1.0], {"kind": "demo"})
    assert compare(a, b, {"analysis/": "features/"}) == ([], 2)
    assert compare(a, b, {})[1] == 0
