"""Tolerances for comparing two floating-point computations of the same quantity.

Two correct implementations that differ only in summation order (another matmul kernel, another
batch shape, a hook instead of `output_hidden_states`) disagree by rounding. That disagreement is
set by the dtype, the computation and the size of the values, never by a fixed 1e-6:

- a dot product of length K accumulates about sqrt(K) roundings of the unit eps/2 relative to the
  magnitude of its terms (errors of opposite sign cancel; the worst case K is never reached by the
  kernels torch dispatches to, which block their sums);
- a decoder layer is a few such reductions in sequence, and its error enters the residual stream,
  which carries it to every later layer: the error grows at most linearly with the depth;
- the error is relative to the largest value in play (the residual norm, the logits).

`SAFETY` covers the constant factors of that estimate (several reductions per layer, softmax,
norms). A real bug (a wrong position, a missing head, a misaligned pad) moves values by a sizeable
fraction of their scale, orders of magnitude above these bounds.
"""

from __future__ import annotations

import math

import torch

SAFETY = 8.0


def rounding_tolerance(dtype: torch.dtype, *, scale: float, reduction: int, depth: int = 1) -> float:
    """Largest expected |a - b| between two summation orders of a value of magnitude `scale`,
    computed through `depth` sequential stages whose longest reduction has length `reduction`."""
    eps = torch.finfo(dtype).eps
    return SAFETY * eps * math.sqrt(max(1, reduction)) * max(1, depth) * float(scale)


def model_reduction(model) -> int:
    """The longest reduction in a decoder layer: the MLP's down projection (or d_model if wider)."""
    cfg = model.config
    return max(cfg.hidden_size, getattr(cfg, "intermediate_size", cfg.hidden_size))


def forward_tolerance(model, *, scale: float, depth: int | None = None) -> float:
    """`rounding_tolerance` for values computed through `depth` decoder layers of `model` (default
    all of them, plus the unembedding for logits)."""
    dtype = next(model.parameters()).dtype
    depth = model.config.num_hidden_layers + 1 if depth is None else depth
    return rounding_tolerance(dtype, scale=scale, reduction=model_reduction(model), depth=depth)


def max_abs(x) -> float:
    return float(torch.as_tensor(x).abs().max())
