"""Sets of attention heads to patch together: all, even, odd, single heads and random k-subsets,
and the two references every head set is read against (research notes section 8):

- the ceiling: the whole residual stream after the layer, at the same positions (`CEILING`): what
  any patch at that layer and those positions can at most do;
- the random-head control: random sets of as many heads as the even and the odd pool, drawn from
  all heads (`random_control_sets`): what a parity-blind set of that size does.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import polars as pl

from bugscope.config import ConfigError
from bugscope.stats import subset_generator

POOLS = ("even", "odd", "all")


class PatchingConfigError(ConfigError):
    """A head set, layer or patching option does not fit the model; the message says how to fix it."""


@dataclass(frozen=True)
class HeadSet:
    """A set of heads of one layer. `family`: all | even | odd | single | subset | ceiling."""

    name: str  # unique within a layer: "all", "even", "odd", "head03", "even_k2_s05"
    family: str
    heads: tuple[int, ...]
    pool: str  # the heads it was drawn from: all | even | odd (a single head: its parity)
    sample: int = -1  # index of a random subset within (pool, k); -1 for named sets

    @property
    def k(self) -> int:
        return len(self.heads)


def pool_heads(pool: str, n_heads: int) -> list[int]:
    if pool == "all":
        return list(range(n_heads))
    if pool == "even":
        return list(range(0, n_heads, 2))
    if pool == "odd":
        return list(range(1, n_heads, 2))
    raise PatchingConfigError(f"unknown head pool {pool!r}; expected one of {', '.join(POOLS)}.")


def check_head_set(heads: Sequence[int], *, n_heads: int, layer: int, n_layers: int, what: str = "head set") -> None:
    """Raise PatchingConfigError for an empty set, a head or a layer outside the model."""
    if not 0 <= layer < n_layers:
        raise PatchingConfigError(
            f"Patching layer {layer} is outside the model, which has layers 0..{n_layers - 1}. "
            "Fix 'layers' / 'focus_layers' in the config (or model.num_layers if the model changed)."
        )
    if len(heads) == 0:
        raise PatchingConfigError(
            f"The {what} at layer {layer} is empty: a patch needs at least one head. "
            "Remove it, or give at least one head index (patching.subsets.sizes must be >= 1)."
        )
    bad = [h for h in heads if not 0 <= int(h) < n_heads]
    if bad:
        raise PatchingConfigError(
            f"The {what} at layer {layer} names head(s) {bad}, but each layer has heads 0..{n_heads - 1} "
            f"(model.num_heads={n_heads}). Fix the head indices or model.num_heads."
        )
    if len(set(heads)) != len(heads):
        raise PatchingConfigError(f"The {what} at layer {layer} repeats a head: {list(heads)}. List each head once.")


def named_head_sets(n_heads: int) -> list[HeadSet]:
    """all, even, odd (each only if non-empty) and every single head."""
    sets = [HeadSet(p, p, tuple(pool_heads(p, n_heads)), p) for p in POOLS if pool_heads(p, n_heads)]
    width = len(str(n_heads - 1))
    sets += [HeadSet(f"head{h:0{width}d}", "single", (h,), "even" if h % 2 == 0 else "odd") for h in range(n_heads)]
    return sets


def subset_head_sets(n_heads: int, *, pools: Sequence[str], sizes: Sequence[int] | None, samples: int,
                     seed: int, layer: int) -> list[HeadSet]:
    """Random k-subsets of each pool: every subset where C(n, k) <= samples, else `samples` distinct ones.

    Sizes larger than a pool are skipped for that pool. The draw for (layer, pool, k) uses its own
    generator seeded with (seed, layer, pool index, k), so adding a size or a pool leaves the others alone.
    """
    out = []
    for pool in pools:
        members = pool_heads(pool, n_heads)
        ks = range(1, len(members) + 1) if sizes is None else sizes
        for k in ks:
            if k < 1:
                raise PatchingConfigError(
                    f"patching.subsets.sizes contains {k}: an empty head set cannot be patched. Use sizes >= 1."
                )
            if k > len(members):
                continue
            total = math.comb(len(members), k)
            if total <= samples:
                combos = list(itertools.combinations(members, k))
            else:
                rng = subset_generator(seed, layer, POOLS.index(pool), k)
                seen: set[tuple[int, ...]] = set()
                combos = []
                while len(combos) < samples:
                    c = tuple(sorted(int(h) for h in rng.choice(members, size=k, replace=False)))
                    if c not in seen:
                        seen.add(c)
                        combos.append(c)
            out += [HeadSet(f"{pool}_k{k}_s{i:02d}", "subset", c, pool, i) for i, c in enumerate(combos)]
    return out


CEILING = HeadSet("resid_post", "ceiling", (), "resid")
EXHAUSTIVE_POOLS = (*POOLS, "mixed")


def _combos(members: Sequence[int], k: int, *, budget: int, samples: int, rng_key: tuple[int, ...]) -> list[tuple]:
    """Every k-subset of `members` where C(n, k) <= budget, else `samples` distinct seeded draws."""
    if math.comb(len(members), k) <= max(budget, samples):
        return list(itertools.combinations(members, k))
    rng = subset_generator(*rng_key)
    seen: set[tuple[int, ...]] = set()
    while len(seen) < samples:
        seen.add(tuple(sorted(int(h) for h in rng.choice(members, size=k, replace=False))))
    return sorted(seen)


def exhaustive_head_sets(n_heads: int, *, pools: Sequence[str], budget: int, samples: int, seed: int,
                         layer: int, sizes: Sequence[int] | None = None) -> list[HeadSet]:
    """Head sets of every size from each pool, enumerated in full where there are at most `budget`
    of them (per pool and k), else `samples` seeded draws.

    Pools: even, odd, all, and mixed: j odd plus k - j even heads for every 1 <= j < k, enumerated
    (or drawn) per (k, j), so that each composition is covered. Names are unique within a layer:
    `all_k3_0041`, `mixed_k4_o1_0007`. `sizes`: only sets of these sizes (None: every size).
    """
    even, odd = pool_heads("even", n_heads), pool_heads("odd", n_heads)
    out = []
    for pool in pools:
        if pool not in EXHAUSTIVE_POOLS:
            raise PatchingConfigError(f"unknown head pool {pool!r}; expected one of {', '.join(EXHAUSTIVE_POOLS)}.")
        if pool != "mixed":
            members = pool_heads(pool, n_heads)
            for k in range(1, len(members) + 1):
                if sizes is not None and k not in sizes:
                    continue
                combos = _combos(members, k, budget=budget, samples=samples,
                                 rng_key=(seed, layer, EXHAUSTIVE_POOLS.index(pool), k, 1))
                out += [HeadSet(f"{pool}_k{k}_{i:04d}", "exhaustive", c, pool, i) for i, c in enumerate(combos)]
            continue
        for k in range(2, n_heads + 1):
            if sizes is not None and k not in sizes:
                continue
            for j in range(max(1, k - len(even)), min(k - 1, len(odd)) + 1):
                total = math.comb(len(odd), j) * math.comb(len(even), k - j)
                if total <= max(budget, samples):
                    combos = [tuple(sorted(o + e)) for o in itertools.combinations(odd, j)
                              for e in itertools.combinations(even, k - j)]
                else:
                    rng = subset_generator(seed, layer, EXHAUSTIVE_POOLS.index(pool), k, j)
                    seen: set[tuple[int, ...]] = set()
                    while len(seen) < samples:
                        seen.add(tuple(sorted([int(h) for h in rng.choice(odd, size=j, replace=False)]
                                              + [int(h) for h in rng.choice(even, size=k - j, replace=False)])))
                    combos = sorted(seen)
                out += [HeadSet(f"mixed_k{k}_o{j}_{i:04d}", "exhaustive", c, "mixed", i) for i, c in enumerate(combos)]
    return out


def head_composition(heads: Sequence[int]) -> tuple[int, int, str]:
    """(even heads, odd heads, "even" | "odd" | "mixed") of a head set."""
    n_even = sum(1 for h in heads if h % 2 == 0)
    n_odd = len(heads) - n_even
    return n_even, n_odd, "mixed" if n_even and n_odd else ("even" if n_even else "odd")


def random_control_sets(n_heads: int, *, samples: int, seed: int, layer: int) -> list[HeadSet]:
    """Random subsets of all heads, as many heads as the even pool and as the odd pool: the draws of
    `subset_head_sets` for pool "all", so they coincide with the config's subsets where both exist."""
    return subset_head_sets(n_heads, pools=["all"], sizes=control_sizes(n_heads), samples=samples, seed=seed,
                            layer=layer)


def control_sizes(n_heads: int) -> list[int]:
    """The random-head control's set sizes: as many heads as the even pool and as the odd pool."""
    return sorted({len(pool_heads("even", n_heads)), len(pool_heads("odd", n_heads))} - {0})


def head_set_table(layer_sets: dict[int, list[HeadSet]]) -> pl.DataFrame:
    rows = [{"layer": layer, "head_set": s.name, "family": s.family, "pool": s.pool, "k": s.k,
             "sample": s.sample, "heads": list(s.heads)}
            for layer, sets in layer_sets.items() for s in sets]
    return pl.DataFrame(rows, schema={"layer": pl.Int32, "head_set": pl.String, "family": pl.String,
                                      "pool": pl.String, "k": pl.Int32, "sample": pl.Int32,
                                      "heads": pl.List(pl.Int32)})
