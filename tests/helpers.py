"""Builders and readers that only the tests need: hand-made prompt and sparse feature tables, dense SAE
features from the sparse table, a PNG's and an SVG's size, and readers of Vega-Lite specs (the fields
encoded, the titles, the rows each mark draws)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import torch

from bugscope.figures.style import FIGURE_EXTS, save_chart


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


def sparse_features(rows):
    """rows: (prompt_id, position, feature_id, activation) -> a feature table as the SAE stage writes it."""
    return pl.DataFrame(rows, schema={"prompt_id": pl.Int32, "position": pl.Int32, "feature_id": pl.Int32,
                                      "activation": pl.Float32}, orient="row")


def pair_prompts(n_questions: int, decision_pos: int = 5, aligned=(0, 2, 5)):
    """A prompt table of `n_questions` shorter_bigger questions in the qa and simple formats: prompt ids
    2q (qa) and 2q + 1 (simple), two questions (both orders) per number pair."""
    rows = []
    for q in range(n_questions):
        for j, fmt in enumerate(("qa", "simple")):
            rows.append({"prompt_id": 2 * q + j, "question_id": q, "pair_id": q // 2, "pair_kind": "shorter_bigger",
                         "order": ("correct_first", "wrong_first")[q % 2], "format": fmt,
                         "correct": f"{9 + q // 2}.8", "wrong": f"{9 + q // 2}.11",
                         "family": "decimal", "wording": "analysis", "decision_pos": decision_pos,
                         "numbers_pos": aligned[-2] if len(aligned) > 1 else decision_pos,
                         "aligned_positions": list(aligned),
                         "prompt_last_pos": aligned[-2] if len(aligned) > 1 else decision_pos})
    return pl.DataFrame(rows, schema_overrides={"prompt_id": pl.Int32, "aligned_positions": pl.List(pl.Int32)})


# --- Vega-Lite specs ---------------------------------------------------------------------------


def spec_nodes(spec):
    """Every dict of a Vega-Lite spec, depth first (layers, facets, concats and their encodings)."""
    if isinstance(spec, dict):
        yield spec
        for v in spec.values():
            yield from spec_nodes(v)
    elif isinstance(spec, list):
        for v in spec:
            yield from spec_nodes(v)


def encoded_fields(spec) -> set[str]:
    """Every `field` an encoding channel of the Vega-Lite spec (any layer, facet or concat) reads."""
    found = set()
    for node in spec_nodes(spec):
        if "encoding" in node:
            for channel in node["encoding"].values():
                for enc in channel if isinstance(channel, list) else [channel]:
                    if isinstance(enc, dict) and "field" in enc:
                        found.add(enc["field"])
        if "facet" in node and isinstance(node["facet"], dict):
            for enc in node["facet"].values():
                if isinstance(enc, dict) and "field" in enc:
                    found.add(enc["field"])
    return found


def titles(spec) -> str:
    text = []
    for node in spec_nodes(spec):
        t = node.get("title")
        if isinstance(t, dict):
            text.extend([str(t.get("text", "")), str(t.get("subtitle", ""))])
        elif isinstance(t, str):
            text.append(t)
    return " ".join(text)


# The channels whose fields say which row a mark draws where (a value drawn: quantitative y or colour).
KEY_CHANNELS = ("x", "y", "xOffset", "yOffset", "color", "strokeDash", "shape", "detail")


def passes_filter(row: dict, predicate: dict) -> bool:
    if "oneOf" in predicate:
        return row.get(predicate["field"]) in predicate["oneOf"]
    if "equal" in predicate:
        return row.get(predicate["field"]) == predicate["equal"]
    raise AssertionError(f"drawn_marks cannot evaluate the filter {predicate}")


def drawn_marks(spec) -> list[tuple[str, tuple[str, ...], list[dict]]]:
    """(mark, key fields, rows drawn) for every mark of a Vega-Lite spec that encodes a field: the rows
    of the data it inherits, through its filter transforms, less those missing a quantitative position
    (which Vega-Lite leaves out). Key fields: the enclosing facets' fields and the fields of its
    KEY_CHANNELS, less quantitative y and colour (the values drawn)."""
    datasets, out = spec.get("datasets", {}), []

    def walk(node, rows, keys):
        if "data" in node:
            rows = datasets[node["data"]["name"]] if "name" in node["data"] else node["data"]["values"]
        for transform in node.get("transform", []):
            assert set(transform) == {"filter"}, f"drawn_marks cannot evaluate the transform {transform}"
            rows = [r for r in rows if passes_filter(r, transform["filter"])]
        facet = node.get("facet")
        if isinstance(facet, dict):
            keys = keys + tuple(e["field"] for e in ([facet] if "field" in facet else facet.values()))
        if "mark" in node:
            fields = {ch: e for ch, e in node.get("encoding", {}).items() if isinstance(e, dict) and "field" in e}
            if fields:  # a mark of constants only (the chance line) is drawn the same from every row
                key = keys + tuple(e["field"] for ch, e in fields.items() if ch in KEY_CHANNELS
                                   and (ch == "x" or e.get("type") != "quantitative"))
                quantitative = [e["field"] for ch, e in fields.items()
                                if ch in ("x", "y", "x2", "y2") and e.get("type") == "quantitative"]
                mark = node["mark"]["type"] if isinstance(node["mark"], dict) else node["mark"]
                out.append((mark, key, [r for r in rows if all(r.get(f) is not None for f in quantitative)]))
        for part in ("layer", "vconcat", "hconcat", "concat"):
            for child in node.get(part, []):
                walk(child, rows, keys)
        if "spec" in node:
            walk(node["spec"], rows, keys)

    walk(spec, [], ())
    return out


def assert_one_row_per_key(spec, name: str) -> None:
    """Every mark draws at most one row per (x, series, facet): no two pair kinds or orders at one place."""
    for mark, key, rows in drawn_marks(spec):
        counts: dict = {}
        for r in rows:
            counts[tuple(r.get(k) for k in key)] = counts.get(tuple(r.get(k) for k in key), 0) + 1
        twice = [k for k, n in counts.items() if n > 1]
        assert not twice, (name, mark, key, twice[:3])


def drawn_rows(spec, mark: str | None = None) -> list[dict]:
    return [r for m, _, rows in drawn_marks(spec) if mark in (None, m) for r in rows]


def svg_size(path: Path) -> tuple[float, float]:
    head = path.read_text()[:400]
    return float(re.search(r'width="([\d.]+)"', head).group(1)), float(re.search(r'height="([\d.]+)"', head).group(1))


def check_saved(tmp: Path, name: str, chart, scale: float = 2.0) -> dict:
    outputs = {ext: tmp / f"{name}.{ext}" for ext in FIGURE_EXTS}
    spec = save_chart(chart, outputs, png_scale=scale)
    w, h = svg_size(outputs["svg"])
    assert png_size(outputs["png"]) == (round(w * scale), round(h * scale))
    html = outputs["html"].read_text()
    assert "<script src=" not in html and "vega-embed" in html.lower()  # libraries inlined: works offline
    return spec


EXPECTED = {
    "baseline_accuracy": {"format_role", "order_label", "pair_kind", "accuracy", "accuracy_low", "accuracy_high"},
    "lens": {"layer", "format_role", "lens_logit_diff", "lens_logit_diff_low", "lens_logit_diff_high", "block", "value",
             "low", "high"},
    "feature_overlap": {"layer", "overlap_pct", "overlap_pct_low", "overlap_pct_high", "variant", "set", "features"},
    "amplification": {"layer", "amplification", "amplification_low", "amplification_high", "variant"},
    "format_features": {"mean_buggy", "mean_correct", "direction", "label"},
    "head_attribution": {"head_label", "feature", "direct_attribution", "panel", "layer"},
    "sae_quality": {"layer", "ev", "l0", "tokens", "dead_fraction"},
    "head_sweep": {"layer", "layer_x", "series", "recovery", "recovery_low", "recovery_high", "head_set_label",
                   "success_rate", "pair_kind"},
    "head_subsets": {"k_jitter", "recovery", "recovery_low", "recovery_high", "pool", "k", "kind", "mean_recovery",
                     "layer", "pair_kind"},
    "original_method": {"head_set_label", "method_label", "recovery", "recovery_low", "recovery_high", "layer",
                        "pair_kind"},
}
