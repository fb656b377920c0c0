"""The figures' shared style: the palette, sizes, `Labels` (what the titles name), the title and
n-label helpers, the pair-kind selection and facets, the head order, and `save_chart`.

Every figure function (bugscope.figures.behaviour, features, overlap, patching, experiments,
original, interventions) takes the tables it draws (as read by `bugscope.tables.read`) plus a `Labels`
(model name, format names) and returns a chart whose title says what is plotted and on how many
prompts. `save_chart` writes the chart as SVG and PNG (rendered by vl-convert, no browser) and as
an interactive HTML page with Vega, Vega-Lite and Vega-Embed inlined, so it works offline; every
file is written atomically.

The tables split by pair kind and question order (the baseline accuracy, the patching summaries)
are drawn one column (or row) per pair kind, never the pooled kind, which mixes the bug's pairs
with the controls; the patching figures read the rows with both orders pooled (`by_kind`), the
baseline figure shows each order beside them.

Colours: the Okabe-Ito palette (distinguishable under the common colour-vision deficiencies) for
categories, `viridis` for sequential and `blueorange` for diverging heatmaps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import altair as alt
import polars as pl
import vl_convert as vlc

from bugscope.data.prompts import ALL, PAIR_KINDS
from bugscope.io import atomic_path

# Okabe & Ito (2008), "Color Universal Design".
OKABE_ITO = {
    "orange": "#E69F00", "sky_blue": "#56B4E9", "green": "#009E73", "yellow": "#F0E442",
    "blue": "#0072B2", "vermillion": "#D55E00", "purple": "#CC79A7", "black": "#000000", "grey": "#999999",
}
BUGGY_COLOUR = OKABE_ITO["vermillion"]
CORRECT_COLOUR = OKABE_ITO["blue"]
SEQUENTIAL = "viridis"
DIVERGING = "blueorange"
WIDTH, HEIGHT = 520, 300
FIGURE_EXTS = ("svg", "png", "html")


@dataclass(frozen=True)
class Labels:
    """What the titles need: the model and the two formats of the contrast."""

    model: str
    buggy_format: str = "qa"
    correct_format: str = "simple"
    confidence: float = 0.95

    @property
    def ci(self) -> str:
        return f"{round(100 * self.confidence)} % CI"

    def format_role(self, column: str = "format") -> pl.Expr:
        """A format's name with its role in the contrast: 'qa (buggy)', 'simple (correct)'; others as named."""
        role = {self.buggy_format: " (buggy)", self.correct_format: " (correct)"}
        return (pl.col(column) + pl.col(column).replace_strict(role, default="")).alias("format_role")

    @classmethod
    def from_config(cls, config) -> "Labels":
        return cls(config["model"]["name"], config["prompts"]["buggy_format"], config["prompts"]["correct_format"],
                   config["bootstrap"]["confidence"])


def chart_title(text: str, subtitle: str | Sequence[str] | None = None) -> alt.TitleParams:
    """A title anchored left, with its subtitle (a line or several)."""
    return alt.TitleParams(text, subtitle=subtitle or "", anchor="start")


def n_label(values) -> str:
    """'64' or '60-64' for a column of counts."""
    values = [int(v) for v in values if v is not None]
    if not values:
        return "?"
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


KIND_NOTE = "shorter_bigger = 9.8 vs 9.11 (the bug), longer_bigger = 9.81 vs 9.7, same_length = 9.8 vs 9.7"


def by_kind(table: pl.DataFrame) -> pl.DataFrame:
    """The rows of each pair kind with both question orders pooled: what the patching figures draw,
    one column per pair kind. The pooled kind ("all") is left out: it mixes the bug's pairs with
    the control pairs."""
    return table.filter(pl.col("order") == ALL, pl.col("pair_kind") != ALL)


def kind_order(df: pl.DataFrame) -> list[str]:
    """The pair kinds present in `df`: those of PAIR_KINDS in its order, then any other sorted."""
    present = set(df["pair_kind"].to_list())
    return [k for k in PAIR_KINDS if k in present] + sorted(present - set(PAIR_KINDS))


def kind_column(df: pl.DataFrame) -> alt.Column:
    """One facet column per pair kind, in `kind_order`."""
    return alt.Column("pair_kind:N", title="pair kind", sort=kind_order(df))


def null_nan(df: pl.DataFrame, *columns: str) -> pl.DataFrame:
    """NaN (a rate over no rows) as null, which Vega-Lite leaves undrawn."""
    return df.with_columns(pl.when(pl.col(c).is_not_nan()).then(pl.col(c)).alias(c) for c in columns)


def head_order(n_heads: int) -> list[str]:
    """Head labels, even heads first then odd: h0, h2, ..., h1, h3, ..."""
    return [f"h{h}" for h in [*range(0, n_heads, 2), *range(1, n_heads, 2)]]


def save_chart(chart: alt.TopLevelMixin, outputs: dict[str, str | Path], *, png_scale: float = 2.0) -> dict:
    """Write `chart` to the paths in `outputs` (keys among svg, png, html), each atomically.

    Returns the rendered Vega-Lite spec (a dict), which the tests inspect.
    """
    unknown = set(outputs) - set(FIGURE_EXTS)
    if unknown:
        raise ValueError(f"save_chart: unknown output kinds {sorted(unknown)}; expected some of {FIGURE_EXTS}.")
    spec = chart.to_dict()
    if "svg" in outputs:
        svg = vlc.vegalite_to_svg(spec)
        with atomic_path(outputs["svg"]) as tmp:
            tmp.write_text(svg)
    if "png" in outputs:
        png = vlc.vegalite_to_png(spec, scale=png_scale)
        with atomic_path(outputs["png"]) as tmp:
            tmp.write_bytes(png)
    if "html" in outputs:
        html = chart.to_html(inline=True)
        with atomic_path(outputs["html"]) as tmp:
            tmp.write_text(html)
    return spec
