"""Compare two results folders file by file: are they the same run, byte for byte?

    python tests/compare_results.py BEFORE/results AFTER/results [--rename old=new ...]

Parquet tables are compared on their data (schema and every value, bit for bit) and on their
`bugscope.*` metadata, key by key, so that a renamed metadata key is reported as a rename rather
than as a different table. Every other file (SAE weights, JSON, figures) is compared byte for byte.
`--rename old=new` declares an expected metadata key or path rename (a folder when it ends in /). Exits 1 if anything differs
beyond the declared renames.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

META_PREFIX = b"bugscope."


def files_under(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def parquet_parts(path: Path) -> tuple[object, dict[str, bytes]]:
    table = pq.read_table(path)
    raw = table.schema.metadata or {}
    meta = {k[len(META_PREFIX):].decode(): v for k, v in raw.items() if k.startswith(META_PREFIX)}
    return table.replace_schema_metadata({k: v for k, v in raw.items() if not k.startswith(META_PREFIX)}), meta


def data_bytes(table) -> bytes:
    """The table's schema and values as Arrow IPC bytes: bit for bit, so NaN equals the same NaN
    (Table.equals says NaN != NaN), independent of how the rows were split into row groups."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.combine_chunks())
    return sink.getvalue().to_pybytes()


def compare_parquet(a: Path, b: Path, renames: dict[str, str]) -> list[str]:
    ta, ma = parquet_parts(a)
    tb, mb = parquet_parts(b)
    problems = []
    if data_bytes(ta) != data_bytes(tb):
        problems.append("data differ")
    ma = {renames.get(k, k): v for k, v in ma.items()}
    for key in sorted(set(ma) | set(mb)):
        if ma.get(key) != mb.get(key):
            problems.append(f"metadata {key!r} differs")
    return problems


def renamed_path(name: str, renames: dict[str, str]) -> str:
    """`name` after the declared renames: an exact path, or a folder prefix ending in '/'."""
    if name in renames:
        return renames[name]
    for old, new in renames.items():
        if old.endswith("/") and name.startswith(old):
            return new + name[len(old):]
    return name


def compare(before: Path, after: Path, renames: dict[str, str]) -> tuple[list[str], int]:
    fa, fb = files_under(before), files_under(after)
    fa = {renamed_path(k, renames): v for k, v in fa.items()}
    lines, n_same = [], 0
    for name in sorted(set(fa) | set(fb)):
        if name not in fb:
            lines.append(f"only in {before}: {name}")
        elif name not in fa:
            lines.append(f"only in {after}: {name}")
        elif name.endswith(".parquet"):
            problems = compare_parquet(fa[name], fb[name], renames)
            if problems:
                lines.append(f"{name}: {'; '.join(problems)}")
            else:
                n_same += 1
        elif digest(fa[name]) != digest(fb[name]):
            if name.endswith(".json") and json.loads(fa[name].read_text()) == json.loads(fb[name].read_text()):
                lines.append(f"{name}: same JSON, other key order")
            else:
                lines.append(f"{name}: bytes differ")
        else:
            n_same += 1
    return lines, n_same


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                        help="an expected rename of a metadata key or of a path relative to the folder")
    args = parser.parse_args(argv)
    renames = dict(r.split("=", 1) for r in args.rename)
    lines, n_same = compare(args.before, args.after, renames)
    for line in lines:
        print(line)
    print(f"{n_same} files identical, {len(lines)} differences" + (f" (renames: {renames})" if renames else ""))
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
