"""Residual-caching throughput as a ratio to a bare forward pass over the same batches.

Run: python bench/bench_cache.py [--repeats 5] [--prompts 96]
     python bench/bench_cache.py --corpus RESULTS/corpus/corpus.parquet --prompts 48
                                        (corpus sequences, every position but 0, in sae.corpus.dtype)
     python bench/bench_cache.py --config config/llama31_8b_shaped.yaml --manifest RESULTS/model/model.json \
         --device cuda --prompts 512        (a run's model, on a GPU; see bench/gpu_check.sh)
The bare pass is `model.model(...)` over the same left-padded batches with no hooks; the caching
pass gathers the configured positions of every layer and writes one Parquet file per layer.
Prints the median time of each and the throughput ratio (target >= 0.9), the matmul TFLOP/s of
the bare pass (bugscope.model.flops.MatmulFlops: a lower bound) and, on a GPU, the peak GPU memory.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import torch

from bugscope.config import analysed_layers, load_config
from bugscope.data.corpus import cache_rows
from bugscope.data.prompts import build_prompt_table
from bugscope.model.cache import cache_activations, positions_for
from bugscope.model.flops import MatmulFlops
from bugscope.model.forward import iter_batches
from bugscope.model.load import ModelManifest, load_model, prepare_model
from bugscope.model.sites import hook_name
from bugscope.run.jobstats import peak_gpu_bytes

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(REPO / "config" / "config.yaml"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--manifest", default=None,
                    help="model.json of a run (results/model/model.json); default: prepare the config's model here")
    ap.add_argument("--corpus", default=None,
                    help="a run's corpus table (results/corpus/corpus.parquet): cache its first --prompts "
                         "sequences as cache_corpus does, instead of analysis prompts")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    if args.manifest:  # a run's manifest: the embedded test cache's model.json is left alone
        manifest = ModelManifest.load(args.manifest)
    else:
        cache_dir = REPO / ".pytest_cache" / "bugscope"
        manifest = prepare_model(cfg["model"], cache_dir / "checkpoint", cache_dir / "model.json")
    model, tok = load_model(manifest, args.device)
    device = next(model.parameters()).device

    def sync():  # CUDA runs asynchronously: time the work, not its launch
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    if args.corpus:
        rows, dtype = cache_rows(pq.read_table(args.corpus))[:args.prompts], cfg["sae"]["corpus"]["dtype"]
    else:
        rows = pl.from_arrow(build_prompt_table(cfg, tok)).head(args.prompts).to_dicts()
        rows, dtype = [{**r, "positions": positions_for(r, cfg["cache"]["positions"])} for r in rows], cfg["cache"]["dtype"]
    layers = analysed_layers(cfg)
    bs = cfg["cache"]["batch_size"]

    def bare():
        with torch.inference_mode():
            for batch in iter_batches(rows, bs, tok.pad_token_id, device):
                model.model(**batch.model_inputs(), use_cache=False)
        sync()

    scratch = tempfile.TemporaryDirectory()  # deleting the files is no part of caching: not timed

    def cached():
        out = tempfile.mkdtemp(dir=scratch.name)
        paths = {hook_name(layer): f"{out}/{hook_name(layer)}.parquet" for layer in layers}
        cache_activations(model, rows, hooks=list(paths), dtype=dtype,
                          out_paths=paths, meta={}, batch_size=bs, pad_token_id=tok.pad_token_id, desc="bench")

    with MatmulFlops() as counter:
        bare()  # warm-up; counts the FLOPs of one bare pass
    t_bare, t_cache = [], []
    for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
        for run, times in ((bare, t_bare), (cached, t_cache)):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        shutil.rmtree(scratch.name)
        Path(scratch.name).mkdir()
    scratch.cleanup()
    mb, mc = statistics.median(t_bare), statistics.median(t_cache)
    n_tokens = sum(len(r["input_ids"]) for r in rows)
    print(f"{len(rows)} {'corpus sequences' if args.corpus else 'prompts'}, {n_tokens} tokens, {len(layers)} layers, "
          f"batch {bs}, storage {dtype}, {args.repeats} repeats")
    print(f"bare forward : median {mb:.3f} s ({n_tokens / mb:.0f} tokens/s)")
    print(f"cache+write  : median {mc:.3f} s ({n_tokens / mc:.0f} tokens/s)")
    print(f"throughput ratio cache/bare: {mb / mc:.3f} (target >= 0.9)")
    print(f"bare forward : {counter.flops / 1e12:.3f} matmul TFLOP per pass, {counter.flops / mb / 1e12:.2f} TFLOP/s")
    peak = peak_gpu_bytes()
    if peak is not None:
        print(f"peak GPU memory (torch.cuda.max_memory_allocated): {peak / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
