"""How one check is decided: three outcomes on intervals, two-arm tests and Holm within a family
(research notes section 9).

A check's *region* is where the claim is true: [target - tolerance, target + tolerance] for
`near`, [low, high] for `range`, [x, inf) for `at_least`, (-inf, x] for `at_most`. Against the
measured interval:

- pass: the interval lies inside the region (so it excludes the negation);
- fail: the interval lies outside the region;
- inconclusive: otherwise.

A bound that equals the metric's null (a ratio of 1, a gap of 0) is strict: "at least 0" on a
format effect passes only when the interval lies above 0. `near` and `at_most` decided this way
are equivalence tests (TOST) against the stated margin, each side at half of 1 - confidence.

Two arms compared by `above` / `below` are decided by a test: Fisher's exact test on success
counts (the arms share targets, so treating them as independent is conservative), or, for a
metric without counts, by whether the intervals are separate. A p-value decides through Holm's
adjustment within the claim's family (its ledger section).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from bugscope.stats import holm_adjusted

PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"


def region_outcome(low: float, high: float, lo: float = -math.inf, hi: float = math.inf, *,
                   strict_lo: bool = False, strict_hi: bool = False) -> str:
    """pass / fail / inconclusive of the interval [low, high] against the region [lo, hi]."""
    inside_lo = low > lo if strict_lo else low >= lo
    inside_hi = high < hi if strict_hi else high <= hi
    if inside_lo and inside_hi:
        return PASS
    if (high <= lo if strict_lo else high < lo) or (low >= hi if strict_hi else low > hi):
        return FAIL
    return INCONCLUSIVE


def combine(outcomes) -> str:
    """A claim's checks all have to pass: one fail fails it, all passing passes it."""
    outcomes = list(outcomes)
    if FAIL in outcomes:
        return FAIL
    if outcomes and all(o == PASS for o in outcomes):
        return PASS
    return INCONCLUSIVE


@dataclass
class PTest:
    """One p-value of a check, decided once the family's p-values are known (Holm).

    kind `effect`: passes when significant in the claimed direction, fails when significant in the
    other one. `significant` / `not_significant`: a gate on a p column of the table; absence of an
    effect cannot be shown by p > alpha, so `not_significant` only ever fails (when significant).
    """

    label: str
    p: float
    kind: str  # effect | significant | not_significant
    claimed_direction: bool = True
    adjusted: float | None = field(default=None)

    def outcome(self, alpha: float) -> str:
        significant = (self.adjusted if self.adjusted is not None else self.p) <= alpha
        if self.kind == "effect":
            if not significant:
                return INCONCLUSIVE
            return PASS if self.claimed_direction else FAIL
        if self.kind == "significant":
            return PASS if significant else INCONCLUSIVE
        return FAIL if significant else INCONCLUSIVE

    def text(self, alpha: float) -> str:
        adj = f", Holm-adjusted {self.adjusted:.3g}" if self.adjusted is not None else ""
        return f"{self.label}: p={self.p:.3g}{adj} (alpha {alpha:g}) -> {self.outcome(alpha)}"


def adjust_family(tests: list[PTest]) -> None:
    """Sets each test's Holm-adjusted p within one family."""
    if not tests:
        return
    for t, a in zip(tests, holm_adjusted([t.p for t in tests])):
        t.adjusted = float(a)
