"""What a patch writes where: the patch spec (site, positions, operation), the prompt pairs
(target, source) and the positions matched between them. The engine that runs them is
`bugscope.patching.engine`; the position modes are described in the `bugscope.patching` docstring.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import polars as pl

from bugscope.model.sites import HEAD_SITE
from bugscope.patching.head_sets import PatchingConfigError

POSITION_MODES = ("aligned", "decision", "suffix")
ORIGINAL_POSITIONS = "original"  # the original method's positions [:min_len]
OPERATIONS = ("patch", "zero", "mean")
DIRECTIONS = ("fix", "break")
PATCH_SITES = (HEAD_SITE, "attn_out")  # patched at: o_proj input (true heads) or self_attn output (the seed's slices)



@dataclass(frozen=True)
class PatchSpec:
    """How one sweep patches: the site, the positions and the operation."""

    site: str = HEAD_SITE
    positions: str = "aligned"
    operation: str = "patch"

    def __post_init__(self):
        if self.site not in PATCH_SITES:
            raise PatchingConfigError(f"unknown patch site {self.site!r}; expected one of {', '.join(PATCH_SITES)}.")
        if self.positions not in (*POSITION_MODES, ORIGINAL_POSITIONS):
            raise PatchingConfigError(
                f"patching.positions is {self.positions!r}; expected one of {', '.join(POSITION_MODES)}.")
        if self.operation not in OPERATIONS:
            raise PatchingConfigError(
                f"patching.operation is {self.operation!r}; expected one of {', '.join(OPERATIONS)}.")

    @property
    def method(self) -> str:
        return "original" if self.site == "attn_out" else "per_head"


ORIGINAL_METHOD = PatchSpec(site="attn_out", positions=ORIGINAL_POSITIONS, operation="patch")


@dataclass
class PatchPair:
    """One target prompt, the source prompt of the same question, and the positions patched."""

    target: dict
    source: dict
    target_positions: list[int] = field(default_factory=list)
    source_positions: list[int] = field(default_factory=list)


def common_suffix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def positions_for_pair(target: dict, source: dict, mode: str) -> tuple[list[int], list[int]]:
    """(target positions, source positions), matched index by index."""
    if mode == "aligned":
        return list(target["aligned_positions"]), list(source["aligned_positions"])
    if mode == "decision":
        return [target["decision_pos"]], [source["decision_pos"]]
    if mode == "suffix":
        n = max(1, common_suffix_length(target["input_ids"], source["input_ids"]))
        nt, ns = len(target["input_ids"]), len(source["input_ids"])
        return list(range(nt - n, nt)), list(range(ns - n, ns))
    if mode == ORIGINAL_POSITIONS:
        m = min(len(target["input_ids"]), len(source["input_ids"]))
        return list(range(m)), list(range(m))
    raise PatchingConfigError(f"unknown position mode {mode!r}; expected one of {', '.join(POSITION_MODES)}.")


def direction_formats(prompts_cfg: dict, direction: str) -> tuple[str, str]:
    """(target format, source format): fix patches the correct format into the buggy one."""
    if direction == "fix":
        return prompts_cfg["buggy_format"], prompts_cfg["correct_format"]
    if direction == "break":
        return prompts_cfg["correct_format"], prompts_cfg["buggy_format"]
    raise PatchingConfigError(f"patching.direction is {direction!r}; expected one of {', '.join(DIRECTIONS)}.")


def make_pairs(prompts: pl.DataFrame, target_format: str, source_format: str, mode: str) -> list[PatchPair]:
    """One pair per question that exists in both formats, in question order."""
    t = {r["question_id"]: r for r in prompts.filter(pl.col("format") == target_format).to_dicts()}
    s = {r["question_id"]: r for r in prompts.filter(pl.col("format") == source_format).to_dicts()}
    shared = sorted(set(t) & set(s))
    if not shared:
        raise PatchingConfigError(
            f"No question exists in both the target format {target_format!r} and the source format "
            f"{source_format!r} of the prompt table. Check prompts.formats, buggy_format and correct_format."
        )
    pairs = []
    for q in shared:
        tp, sp = positions_for_pair(t[q], s[q], mode)
        if len(tp) != len(sp):
            raise PatchingConfigError(
                f"question {q}: {len(tp)} target positions but {len(sp)} source positions in mode {mode!r}; "
                "the prompt table's aligned_positions must have the same length in every format. Rebuild it.")
        pairs.append(PatchPair(t[q], s[q], tp, sp))
    return pairs
