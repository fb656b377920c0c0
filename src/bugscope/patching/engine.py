"""Attention-head patching: true per-head patches, head-set sweeps, and the original method beside them.

A head's output is the *input* of `self_attn.o_proj`, columns `h*head_dim:(h+1)*head_dim`
(research notes section 3). A patch replaces those columns of a set of heads at layer L, at some
positions of a *target* prompt, by the same columns of a *source* prompt (operation `patch`), by
zeros (`zero`) or by their mean over the prompt set (`mean`). The target is scored by its decision
logit difference (correct minus wrong token, > 0 = right).

Positions (`PatchingConfig.positions`), always given as pairs (target position, source position)
of the unpadded prompts:
- `aligned`: the prompt table's aligned positions (same tokens of the shared question and answer);
- `decision`: the decision position only;
- `suffix`: the longest common token suffix of the two prompts, matched from the end (always at
  least the decision position).

The original-method option (`site="attn_out"`, positions `seed`) reproduces the original procedure:
the *output* of `self_attn` (after `o_proj`, residual space) cut into n_heads equal slices, patched
at positions `[:min_len]` of the two prompts, whatever they hold.

Speed, without changing a number (tests compare against `sweep_naive`, one full forward per head
set): the unpatched target run is done once per prompt batch and gives the residual stream entering
every layer (so layers < L are never rerun) and the keys/values of every layer; one unpatched pass
over the batch's sources gives their patch values, their residual stream (the ceiling) and their
scores; a patched run starts at layer L, covers only the columns from the first patched position on
(earlier positions cannot change, so their keys/values are reused), carries many head sets at once
(one replica of the prompt batch per head set), and reads out only the two logits that are scored
at the decision position.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from bugscope.model.forward import Batch, LayerRunner, RecordedRun, UnpatchedPass, capture_sites, make_batch
from bugscope.model.load import model_geometry
from bugscope.model.sites import HEAD_SITE, hook_name
from bugscope.patching.head_sets import (
    CEILING,
    HeadSet,
    PatchingConfigError,
    check_head_set,
)
from bugscope.patching.pairs import (
    PatchPair,
    PatchSpec,
)

# --- the engine -----------------------------------------------------------------------------------


@dataclass
class _Prepared:
    """One prompt batch: its unpatched run, and where and what every patched run writes."""

    run: RecordedRun
    pos_mask: torch.Tensor  # [b, pos] bool: patched columns
    values: dict[int, torch.Tensor]  # layer -> [b, pos, head, d_slice] values written at patched columns
    residuals: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [b, pos, d_model] (the ceiling)

    @property
    def batch(self) -> Batch:
        return self.run.batch

    @property
    def baseline(self) -> torch.Tensor:
        return self.run.baseline


def place_values(pairs: Sequence[PatchPair], target_pad: torch.Tensor, shape: tuple[int, int, int, int],
                 operation: str, *, source: dict[int, torch.Tensor] | None, source_pad: torch.Tensor | None,
                 means: dict[int, torch.Tensor] | None, layers: Sequence[int], dtype, device
                 ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The patched-column mask [b, pos] and the values written there per layer [b, pos, head, d_slice].

    patch: the source prompt's tensor at the matched source positions; mean: the mean at the
    same rank from the end; zero: zeros. `shape` is (b, pos, head, d_slice) of the target batch.
    """
    b, n = shape[:2]
    pos_mask = torch.zeros(b, n, dtype=torch.bool, device=device)
    values = {layer: torch.zeros(*shape, dtype=dtype, device=device) for layer in layers}
    for i, p in enumerate(pairs):
        tcols = torch.tensor([int(target_pad[i]) + t for t in p.target_positions], device=device)
        pos_mask[i, tcols] = True
        for layer in layers:
            if operation == "patch":
                scols = torch.tensor([int(source_pad[i]) + s for s in p.source_positions], device=device)
                values[layer][i, tcols] = source[layer][i, scols]
            elif operation == "mean":
                ranks = torch.arange(len(tcols) - 1, -1, -1)
                values[layer][i, tcols] = means[layer][ranks].to(device)
    return pos_mask, values


def head_writer(values: torch.Tensor, pos_mask: torch.Tensor, head_mask: torch.Tensor, n_heads: int, width: int,
                fractions: torch.Tensor | None = None):
    """Replace heads (head_mask [replicas, head]) at patched columns (pos_mask [b, cols]) by `values`,
    or (fractions [replicas]) by the blend a * values + (1 - a) * the run's own value."""
    r, b, cols = head_mask.shape[0], pos_mask.shape[0], pos_mask.shape[1]
    where = head_mask[:, None, None, :] & pos_mask[None, :, :, None]  # [replicas, b, cols, head]

    def write(x):  # x: [replicas * b, cols, head * d_slice]
        y = x.reshape(r, b, cols, n_heads, width)
        new = values[None]
        if fractions is not None:
            a = fractions.to(y.dtype)[:, None, None, None, None]
            new = a * new + (1 - a) * y
        y = torch.where(where[..., None], new, y)
        return y.reshape(x.shape)
    return write


class HeadPatcher:
    """Sweeps head-set patches over prompt pairs with `bugscope.model.forward.LayerRunner`."""

    def __init__(self, model, *, pad_token_id: int, batch_rows: int | str = "auto", max_prompts: int = 128,
                 memory_fraction: float = 0.5, kv_reuse: bool = True, progress: bool = True):
        geometry = model_geometry(model.config)
        self.model = model
        self.runner = LayerRunner(model)
        self.n_layers = geometry["num_layers"]
        self.n_heads = geometry["num_heads"]
        self.head_dim = geometry["head_dim"]
        self.d_model = geometry["d_model"]
        self.n_kv = geometry["num_kv_heads"]
        self.d_mlp = geometry["d_mlp"]
        self.pad_token_id = pad_token_id
        self.batch_rows = batch_rows
        self.max_prompts = max_prompts
        self.memory_fraction = memory_fraction
        self.kv_reuse = kv_reuse
        self.progress = progress
        self._unpatched: dict[tuple[int, ...], list[tuple[int, float]]] = {}
        self._records: dict[tuple, RecordedRun] | None = None  # see reusing_records
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    def slice_width(self, site: str) -> int:
        if site == HEAD_SITE:
            return self.head_dim
        if self.d_model % self.n_heads:
            raise PatchingConfigError(
                f"The original method cuts the attention output (d_model={self.d_model}) into {self.n_heads} equal "
                "slices, which this model's width does not allow. Turn patching.original_method.enabled off.")
        return self.d_model // self.n_heads

    @torch.inference_mode()
    def capture(self, rows: Sequence[dict], layers: Sequence[int] = (), site: str | None = None, *,
                residual_layers: Sequence[int] = (), score: bool = False) -> tuple[Batch, UnpatchedPass]:
        """(batch, pass) of one unpatched pass over a batch of prompts, for everything a sweep reads
        from it: the site tensors ([b, pos, head, d_slice]) at `layers`, the residual stream after
        `residual_layers` and, with `score`, the decision logit differences, which
        `unpatched_logit_diffs` then takes instead of running the same batch again."""
        batch = make_batch(rows, self.pad_token_id, self.device)
        if layers:
            self.slice_width(site)
        got = self.runner.unpatched_pass(batch, attention_layers=layers, site=site, n_slices=self.n_heads,
                                         residual_layers=residual_layers, score=score)
        if score:
            self._unpatched[_batch_key(rows)] = list(zip(batch.prompt_ids.tolist(), got.baseline.double().tolist()))
        return batch, got

    # -- patch values --

    def mean_values(self, pairs: Sequence[PatchPair], layers: Sequence[int], site: str) -> dict[int, torch.Tensor]:
        """layer -> [rank, head, d_slice]: the mean over all prompts of both formats at each patched rank.

        Rank 0 is the last patched position (the decision position), rank 1 the one before, and so
        on: the mean is taken over the prompts that have a position at that rank.
        """
        entries = [(p.target, p.target_positions) for p in pairs] + [(p.source, p.source_positions) for p in pairs]
        n_rank = max(len(pos) for _, pos in entries)
        width = self.slice_width(site)
        sums = {layer: torch.zeros(n_rank, self.n_heads, width, dtype=torch.float64) for layer in layers}
        counts = torch.zeros(n_rank, dtype=torch.float64)
        step = max(1, self.max_prompts)
        for start in range(0, len(entries), step):
            chunk = entries[start:start + step]
            batch, got = self.capture([r for r, _ in chunk], layers, site)
            got = got.attention
            for i, (_, pos) in enumerate(chunk):
                cols = torch.tensor([int(batch.pad[i]) + p for p in pos][::-1])  # rank order
                counts[:len(pos)] += 1
                for layer in layers:
                    sums[layer][:len(pos)] += got[layer][i, cols].double().cpu()
        return {layer: (s / counts[:, None, None]).to(self.dtype) for layer, s in sums.items()}

    def placed(self, pairs: Sequence[PatchPair], batch: Batch, layers: Sequence[int], spec: PatchSpec,
               means: dict[int, torch.Tensor] | None, source: tuple[Batch, UnpatchedPass] | None = None
               ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """`place_values` for one target batch, from the sources' `capture` (run here when not given)."""
        values = pad = None
        if spec.operation == "patch":
            sbatch, got = source if source is not None else self.capture([p.source for p in pairs], layers, spec.site)
            values, pad = got.attention, sbatch.pad
        shape = (*batch.input_ids.shape, self.n_heads, self.slice_width(spec.site))
        return place_values(pairs, batch.pad, shape, spec.operation, source=values, source_pad=pad,
                            means=means, layers=layers, dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def unpatched_logit_diffs(self, rows: Sequence[dict]) -> dict[int, float]:
        """prompt_id -> unpatched decision logit difference, by the same layer-by-layer run as the sweep."""
        out = {}
        for start in range(0, len(rows), max(1, self.max_prompts)):
            chunk = rows[start:start + self.max_prompts]
            if _batch_key(chunk) not in self._unpatched:  # a job's sweeps share their sources: each batch runs once
                self.capture(chunk, score=True)
            out.update(self._unpatched[_batch_key(chunk)])
        return out

    def writer(self, values: torch.Tensor, pos_mask: torch.Tensor, head_mask: torch.Tensor, site: str,
               fractions: torch.Tensor | None = None):
        return head_writer(values, pos_mask, head_mask, self.n_heads, self.slice_width(site), fractions)

    def head_mask(self, head_sets: Sequence[HeadSet]) -> torch.Tensor:
        """[len(head_sets), n_heads] bool."""
        mask = torch.zeros(len(head_sets), self.n_heads, dtype=torch.bool, device=self.device)
        for j, s in enumerate(head_sets):
            mask[j, list(s.heads)] = True
        return mask

    @torch.inference_mode()
    def prepare(self, pairs: Sequence[PatchPair], layers: Sequence[int], spec: PatchSpec,
                means: dict[int, torch.Tensor] | None = None, ceiling_layers: Sequence[int] = (),
                score_sources: bool = False) -> _Prepared:
        """The unpatched target run of one prompt batch, recorded for reuse by every patched run,
        after one unpatched pass over its sources (`capture`) when anything is read from them
        (`score_sources`: their scores, unless an earlier sweep of this patcher has them)."""
        batch = make_batch([p.target for p in pairs], self.pad_token_id, self.device)
        source = None
        sources = [p.source for p in pairs]
        score_sources = score_sources and _batch_key(sources) not in self._unpatched
        if spec.operation == "patch" or ceiling_layers or score_sources:
            source = self.capture(sources, layers if spec.operation == "patch" else (), spec.site,
                                  residual_layers=ceiling_layers, score=score_sources)
        pos_mask, values = self.placed(pairs, batch, layers, spec, means, source)
        residuals = {}
        if ceiling_layers:
            sbatch, got = source
            after = {layer: got.residuals[layer][:, :, None] for layer in ceiling_layers}
            _, placed = place_values(pairs, batch.pad, (*batch.input_ids.shape, 1, self.d_model), "patch",
                                     source=after, source_pad=sbatch.pad, means=None, layers=ceiling_layers,
                                     dtype=self.dtype, device=self.device)
            residuals = {layer: v[:, :, 0] for layer, v in placed.items()}
        return _Prepared(self._record(batch, layers), pos_mask, values, residuals)

    @contextlib.contextmanager
    def reusing_records(self):
        """Within it, the unpatched target run of a prompt batch is recorded once and reused by every
        sweep of the same targets and layers: for several methods on the same pairs. Outside it,
        nothing is kept (a sweep over every layer records each batch once anyway)."""
        self._records = {}
        try:
            yield self
        finally:
            self._records = None

    def _record(self, batch: Batch, layers: Sequence[int]) -> RecordedRun:
        if self._records is None:
            return self.runner.record(batch, layers)
        key = (tuple(batch.prompt_ids.tolist()), tuple(layers))
        if key not in self._records:
            self._records[key] = self.runner.record(batch, layers)
        return self._records[key]

    def _first_patched(self, prep: _Prepared) -> int:
        if not self.kv_reuse:
            return 0
        patched_cols = prep.pos_mask.any(0).nonzero()
        return int(patched_cols.min()) if len(patched_cols) else prep.batch.input_ids.shape[1] - 1

    @torch.inference_mode()
    def run_ceiling(self, prep: _Prepared, layer: int) -> torch.Tensor:
        """[1, b] logit differences with the whole residual stream after `layer` patched."""
        return self.runner.run_residual_written(prep.run, layer, prep.residuals[layer], prep.pos_mask,
                                                start=self._first_patched(prep))[None]

    @torch.inference_mode()
    def run_patched(self, prep: _Prepared, layer: int, head_sets: Sequence[HeadSet], site: str,
                    fractions: Sequence[float] | None = None) -> torch.Tensor:
        """[len(head_sets), b] logit differences, all head sets in one forward from layer `layer` on
        (with `fractions`, one per head set: the replacement fraction of `head_writer`)."""
        b = prep.batch.input_ids.shape[0]
        r = len(head_sets)
        start = self._first_patched(prep)
        blend = None if fractions is None else torch.tensor(list(fractions), dtype=torch.float64, device=self.device)
        write = self.writer(prep.values[layer][:, start:], prep.pos_mask[:, start:], self.head_mask(head_sets), site,
                            blend)
        return self.runner.run_written(prep.run, layer, site, write, start=start, replicas=r).reshape(r, b)

    @torch.inference_mode()
    def patched_site_output(self, prep: _Prepared, layer: int, head_sets: Sequence[HeadSet], site: str,
                            read: str) -> torch.Tensor:
        """[len(head_sets), b, d_model]: the output of site `read` (resid_post, mlp_out, attn_out) of
        `layer` at the decision (last) column, each head set patched at `site`; only layer `layer` runs."""
        b, r = prep.batch.input_ids.shape[0], len(head_sets)
        start = self._first_patched(prep)
        write = self.writer(prep.values[layer][:, start:], prep.pos_mask[:, start:], self.head_mask(head_sets), site)
        hook, got = hook_name(layer, read), {}
        with capture_sites(self.model, [hook], lambda _, t: got.__setitem__(hook, t[:, -1])):
            self.runner.layer_written(prep.run, layer, site, write, start=start, replicas=r)
        return got[hook].reshape(r, b, -1)

    @torch.inference_mode()
    def site_output(self, rows: Sequence[dict], layer: int, read: str) -> torch.Tensor:
        """[len(rows), d_model]: the unpatched output of site `read` of `layer` at the decision (last) column."""
        batch = make_batch(rows, self.pad_token_id, self.device)
        hook, got = hook_name(layer, read), {}
        with capture_sites(self.model, [hook], lambda _, t: got.__setitem__(hook, t[:, -1])):
            self.runner.residuals_after(batch, [layer])
        return got[hook]

    # -- batch sizes --

    def rows_per_forward(self, n_cols: int, n_ctx: int) -> int:
        """Rows (prompt x head set) of one patched forward that fit in `memory_fraction` of memory: free
        GPU memory, or the machine's total memory on a CPU. The row count sets the matmul shapes and
        so the rounding; from free CPU memory, a rerun beside another process rounded differently
        (7.8e-5 in a logit difference)."""
        if self.batch_rows != "auto":
            return int(self.batch_rows)
        nbytes = torch.finfo(self.dtype).bits // 8
        inter = self.d_mlp
        per_token = 8 * self.d_model + 3 * inter + 2 * self.n_heads * self.head_dim
        per_row = nbytes * (n_cols * per_token + 2 * self.n_heads * n_cols * n_ctx
                            + 4 * self.n_kv * self.head_dim * n_ctx * 2) + 4 * 4 * self.d_model
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            cap = 1 << 16
        else:
            free = _total_cpu_memory()
            cap = 4096  # beyond this, CPU matmuls gain nothing and memory churns
        return max(1, min(cap, int(free * self.memory_fraction) // max(1, per_row)))

    # -- sweeps --

    def sweep(self, pairs: Sequence[PatchPair], layer_sets: dict[int, list[HeadSet]], spec: PatchSpec,
              desc: str = "patching", fractions: Sequence[float] | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
        """Patched and unpatched logit differences of every target prompt.

        Returns (patched: one row per layer, head_set, prompt_id; baseline: one row per prompt_id).
        With `fractions` (replacement fractions a, `head_writer`), every head set is run at each a
        and the patched rows carry a `fraction` column.
        """
        layers = sorted(layer_sets)
        ceiling_layers = [layer for layer in layers if CEILING in layer_sets[layer]]
        if ceiling_layers and spec.operation != "patch":
            raise PatchingConfigError(f"The ceiling patches the source's residual stream; operation "
                                      f"{spec.operation!r} has no source. Leave the ceiling out.")
        layer_sets = {layer: [s for s in sets if s != CEILING] for layer, sets in layer_sets.items()}
        for layer in layers:
            for s in layer_sets[layer]:
                check_head_set(s.heads, n_heads=self.n_heads, layer=layer, n_layers=self.n_layers,
                               what=f"head set {s.name!r}")
        means = self.mean_values(pairs, layers, spec.site) if spec.operation == "mean" else None
        n_ctx = max(len(p.target["input_ids"]) for p in pairs)
        n_cols = n_ctx if not self.kv_reuse else n_ctx - min(min(p.target_positions) for p in pairs)
        rows = self.rows_per_forward(n_cols, n_ctx)
        per_batch = max(1, min(len(pairs), self.max_prompts, rows))
        sets_per_forward = max(1, rows // per_batch)
        if fractions is not None and ceiling_layers:
            raise PatchingConfigError("Replacement fractions apply to head sets; leave the ceiling out.")
        units = {layer: [(s, a) for s in layer_sets[layer] for a in (fractions if fractions is not None else [None])]
                 for layer in layers}
        chunks = [(layer, units[layer][i:i + sets_per_forward])
                  for layer in layers for i in range(0, len(units[layer]), sets_per_forward)]
        chunks += [(layer, [(CEILING, None)]) for layer in ceiling_layers]
        n_batches = math.ceil(len(pairs) / per_batch)
        out, base = [], []
        bar = tqdm(total=n_batches * len(chunks), desc=desc, unit="forward", disable=not self.progress)
        for start in range(0, len(pairs), per_batch):
            part = pairs[start:start + per_batch]
            # The sources are scored here, in the pass that reads them: every caller of a sweep
            # needs their logit differences (a target is only fixable when its source is right).
            prep = self.prepare(part, layers, spec, means, ceiling_layers, score_sources=True)
            pids = [p.target["prompt_id"] for p in part]
            base.append(pl.DataFrame({"prompt_id": pids, "baseline_logit_diff": prep.baseline.double().numpy()}))
            for layer, chunk in chunks:
                sets = [s for s, _ in chunk]
                if sets == [CEILING]:
                    diffs = self.run_ceiling(prep, layer)
                else:
                    diffs = self.run_patched(prep, layer, sets, spec.site,
                                             None if fractions is None else [a for _, a in chunk])
                out.append(long_rows(layer, sets, pids, diffs, None if fractions is None else [a for _, a in chunk]))
                bar.update()
            del prep
        bar.close()
        return pl.concat(out), pl.concat(base)


def long_rows(layer: int, sets: Sequence[HeadSet], prompt_ids: Sequence[int], diffs: torch.Tensor,
          fractions: Sequence[float] | None = None) -> pl.DataFrame:
    """[len(sets), len(prompt_ids)] -> rows (layer, head_set, prompt_id, logit_diff[, fraction])."""
    r, b = len(sets), len(prompt_ids)
    out = pl.DataFrame({
        "layer": np.full(r * b, layer, dtype=np.int32),
        "head_set": np.repeat([s.name for s in sets], b),
        "prompt_id": np.tile(np.asarray(prompt_ids, dtype=np.int32), r),
        "logit_diff": diffs.double().numpy().reshape(-1),
    })
    if fractions is not None:
        out = out.with_columns(fraction=pl.Series(np.repeat(np.asarray(fractions, dtype=np.float64), b)))
    return out


def _batch_key(rows: Sequence[dict]) -> tuple[int, ...]:
    """A batch's prompt ids in order: its scores depend on the batch (padding), so they are kept per batch."""
    return tuple(r["prompt_id"] for r in rows)


def _total_cpu_memory() -> int:
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
