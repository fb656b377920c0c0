"""The reference the optimised head sweep is tested against: one full forward of the whole model per
head set and prompt batch, no reuse of anything (`HeadPatcher.sweep` must give the same numbers)."""

from __future__ import annotations

import math
from typing import Sequence

import polars as pl
import torch
from tqdm import tqdm

from bugscope.model.forward import logit_diff, make_batch
from bugscope.model.sites import attention_writer_hook
from bugscope.patching.engine import HeadPatcher, long_rows
from bugscope.patching.head_sets import HeadSet
from bugscope.patching.pairs import PatchPair, PatchSpec


@torch.inference_mode()
def sweep_naive(patcher: HeadPatcher, pairs: Sequence[PatchPair], layer_sets: dict[int, list[HeadSet]],
                spec: PatchSpec, desc: str = "patching (naive)") -> pl.DataFrame:
    """Rows (layer, head_set, prompt_id, logit_diff), like the first table of `HeadPatcher.sweep`."""
    layers = sorted(layer_sets)
    means = patcher.mean_values(pairs, layers, spec.site) if spec.operation == "mean" else None
    out = []
    step = max(1, patcher.max_prompts)
    total = math.ceil(len(pairs) / step) * sum(len(v) for v in layer_sets.values())
    bar = tqdm(total=total, desc=desc, unit="forward", disable=not patcher.progress)
    for start in range(0, len(pairs), step):
        part = pairs[start:start + step]
        batch = make_batch([p.target for p in part], patcher.pad_token_id, patcher.device)
        pos_mask, values = patcher.placed(part, batch, layers, spec, means)
        pids = [p.target["prompt_id"] for p in part]
        for layer in layers:
            for s in layer_sets[layer]:
                write = patcher.writer(values[layer], pos_mask, patcher.head_mask([s]), spec.site)
                handle = attention_writer_hook(patcher.model, layer, spec.site, write)
                try:
                    logits = patcher.model(**batch.model_inputs(), logits_to_keep=1, use_cache=False).logits[:, -1]
                finally:
                    handle.remove()
                out.append(long_rows(layer, [s], pids, logit_diff(logits, batch)[None]))
                bar.update()
    bar.close()
    return pl.concat(out)
