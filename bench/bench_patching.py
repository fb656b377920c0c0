"""Speed-up of the optimised head sweep over the naive loop, same prompts and head sets, one run.

naive: one full model forward (all layers, full vocabulary logits) per (layer, head set, prompt batch).
optimised (bugscope.patching.HeadPatcher.sweep): one unpatched run per prompt batch reused by every
layer (prefix) and every patched run (keys/values of earlier positions), many head sets per forward,
two logits read out at the decision position.

    python bench/bench_patching.py                       # embedded model, config/config.yaml settings
    python bench/bench_patching.py --positions aligned --questions 32 --layers 5 15 25

Needs results/model/model.json and results/prompts/prompts.parquet of a finished run (or --results).
Prints both times, the ratio, the largest difference between the two paths' logit differences, the
matmul TFLOP/s of each path (bugscope.model.flops.MatmulFlops: a lower bound) and, on a GPU, the
peak GPU memory.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import polars as pl
import torch

from bugscope.config import load_config
from bugscope.io import read_table
from bugscope.model.flops import MatmulFlops
from bugscope.model.load import ModelManifest, load_model
from bugscope.patching.head_sets import named_head_sets
from bugscope.patching.pairs import PatchSpec, make_pairs
from bugscope.patching.study import patcher_from_config, spec_from_config
from bugscope.run.jobstats import peak_gpu_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.oracle import sweep_naive  # noqa: E402  (the reference lives with the tests)

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "config" / "config.yaml"))
    ap.add_argument("--results", default=str(REPO / "results"), help="results folder of a finished run")
    ap.add_argument("--questions", type=int, default=64, help="target prompts (questions) benchmarked")
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 10, 20, 29])
    ap.add_argument("--positions", default=None, help="aligned | decision | suffix (default: the config's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    results = Path(args.results)
    manifest = ModelManifest.load(results / "model" / "model.json")
    if not Path(manifest.path).is_absolute():
        manifest = ModelManifest(**{**manifest.__dict__, "path": str(results.parent / manifest.path)})
    model, tok = load_model(manifest, args.device)
    prompts = pl.from_arrow(read_table(results / "prompts" / "prompts.parquet", kind="prompts")[0])
    prompts = prompts.filter(pl.col("question_id") < args.questions)
    spec, target, source = spec_from_config(cfg)
    if args.positions:
        spec = PatchSpec(positions=args.positions, operation=spec.operation)
    pairs = make_pairs(prompts, target, source, spec.positions)
    plan = {layer: named_head_sets(manifest.num_heads) for layer in args.layers}
    n_sets = sum(len(v) for v in plan.values())
    patcher = patcher_from_config(model, cfg, tok.pad_token_id)
    print(f"{manifest.name} on {args.device} ({args.threads} threads): {len(pairs)} target prompts, "
          f"layers {args.layers}, {n_sets} (layer, head set) combinations, positions={spec.positions}, "
          f"operation={spec.operation}")

    # Both paths end every forward with a copy of its logit differences to the CPU, so the clock
    # stops after the GPU has finished.
    with MatmulFlops() as naive_flops:
        t0 = time.perf_counter()
        slow = sweep_naive(patcher, pairs, plan, spec)
        t_naive = time.perf_counter() - t0
    with MatmulFlops() as fast_flops:
        t0 = time.perf_counter()
        fast, _ = patcher.sweep(pairs, plan, spec)
        t_fast = time.perf_counter() - t0

    joined = fast.join(slow, on=["layer", "head_set", "prompt_id"], suffix="_naive")
    diff = (joined["logit_diff"] - joined["logit_diff_naive"]).abs().max()
    print(f"naive loop:      {t_naive:8.2f} s")
    print(f"optimised sweep: {t_fast:8.2f} s")
    print(f"speed-up:        {t_naive / t_fast:8.2f}x   (max |logit diff difference| {diff:.2e} over {joined.height} rows)")
    for name, flops, t in (("naive loop", naive_flops.flops, t_naive), ("optimised sweep", fast_flops.flops, t_fast)):
        print(f"{name + ':':16s} {flops / 1e12:8.3f} matmul TFLOP, {flops / t / 1e12:8.2f} TFLOP/s")
    peak = peak_gpu_bytes()
    if peak is not None:
        print(f"peak GPU memory (torch.cuda.max_memory_allocated): {peak / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
