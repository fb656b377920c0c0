"""SAE training throughput against the dense-matmul bound, measured in the same run.

What `train_sae` runs is `bugscope.sae.train_layers`: per layer, SAE-Lens's SAETrainer on a
TopKTrainingSAE (`train_topk_sae`), fed by `ActivationStream` from the layer's cached corpus
activations; on a CPU one thread per layer, `--threads` layers side by side in worker processes.
Timed, interleaved in every repeat so that a noisy neighbour slows them alike:

- training: `train_layers` over the layers, as train_sae runs them (worker start-up included);
- stream:   the ActivationStream alone, iterated for the batches that training draws, per layer;
- bound:    per layer, the SAE's dense matmuls forward and backward (x @ W_enc, h @ W_dec, MSE)
            and an Adam step on `--threads` threads, on random data of the same batch size, as many
            steps; no SAE-Lens, no TopK, no auxiliary loss.

Prints the medians, the fraction of the bound (bound / training, target >= 0.5), the stream's
share (stream / training) and, for comparison, the layers trained one after another in this
process on `--threads` threads (what train_sae did before the worker processes).

    python bench/bench_train.py --results RESULTS                      # layers 10-17
    python bench/bench_train.py --results RESULTS --layers 14 27 --repeats 5

`--results` is a finished run's results folder (its corpus activations and corpus table are read,
never written).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # SAE-Lens's progress bar: noise on stderr

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from bugscope.config import load_config, with_sae_set  # noqa: E402
from bugscope.data.corpus import split_ids  # noqa: E402
from bugscope.model.sites import hook_name  # noqa: E402
from bugscope.sae.activations import ActivationSource
from bugscope.sae.train import LayerTraining, train_layer, train_layers  # noqa: E402
from bugscope.stats import layer_seed  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
D_MODEL = 576


def median_times(fns, repeats: int) -> list[float]:
    """Median wall time of each function, the functions interleaved in every repeat."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def n_first_batches(n_steps: int) -> int:
    """Batches `train_topk_sae` draws for the normalisation scale and b_dec before SAE-Lens trains."""
    return max(1, min(8, n_steps // 4))


def dense_bound(batch_size: int, d_in: int, d_sae: int, n_steps: int, seed: int):
    """n_steps of the SAE's dense matmuls forward and backward plus Adam, on random data."""
    gen = torch.Generator().manual_seed(seed)
    w_enc = torch.nn.Parameter(torch.randn(d_in, d_sae, generator=gen) * d_in ** -0.5)
    w_dec = torch.nn.Parameter(torch.randn(d_sae, d_in, generator=gen) * d_sae ** -0.5)
    b_enc = torch.nn.Parameter(torch.zeros(d_sae))
    b_dec = torch.nn.Parameter(torch.zeros(d_in))
    xs = torch.randn(8, batch_size, d_in, generator=gen)
    opt = torch.optim.Adam([w_enc, b_enc, w_dec, b_dec], lr=1e-4)

    def run():
        for step in range(n_steps):
            x = xs[step % xs.shape[0]]
            out = (x @ w_enc + b_enc) @ w_dec + b_dec
            loss = (out - x).pow(2).sum(-1).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(REPO / "results"), help="a finished run's results folder")
    ap.add_argument("--config", default=str(REPO / "config" / "config.yaml"))
    ap.add_argument("--sae-set", default=None, help="default: the config's first SAE set")
    ap.add_argument("--layers", type=int, nargs="+", default=list(range(10, 18)))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    cfg = with_sae_set(cfg, args.sae_set or cfg["sae"]["sets"][0]["name"])
    sae_cfg = cfg["sae"]
    results = Path(args.results)
    corpus = pq.read_table(results / "corpus" / "corpus.parquet", columns=["prompt_id", "split"])
    train_ids = split_ids(corpus, "train")
    jobs = []
    for layer in args.layers:
        hook = hook_name(layer, cfg["sae_set"]["site"])
        source = ActivationSource(str(results / "activations" / "corpus" / f"{hook}.parquet"), prompt_ids=train_ids)
        jobs.append(LayerTraining(layer, hook, source, layer_seed(cfg["seed"], layer)))
    batch_size = sae_cfg["batch_size"]
    n_steps = max(1, sae_cfg["training_tokens"] // batch_size)
    d_sae = sae_cfg["expansion"] * D_MODEL
    bound_one = dense_bound(batch_size, D_MODEL, d_sae, n_steps, cfg["seed"])

    def train():
        train_layers(jobs, d_in=D_MODEL, sae_cfg=sae_cfg, workers=args.threads)

    def train_serial():  # one after another in this process, on every thread
        for job in jobs:
            train_layer(job, d_in=D_MODEL, sae_cfg=sae_cfg)

    def stream():
        for job in jobs:
            s = job.stream(batch_size)
            for _ in range(n_steps + n_first_batches(n_steps)):
                next(s)

    def bound():
        for _ in jobs:
            bound_one()

    t_train, t_serial, t_stream, t_bound = median_times([train, train_serial, stream, bound], args.repeats)
    ratio = t_bound / t_train
    n = len(jobs)
    flops = n * 5 * 2 * batch_size * D_MODEL * d_sae * n_steps  # 2 forward matmuls; backward: dW_enc, dW_dec, dh
    print(f"torch {torch.__version__}, threads {args.threads}, {args.repeats} repeats, layers {args.layers} of {results}")
    print(f"SAE d_in {D_MODEL}, d_sae {d_sae}, k {sae_cfg['k']}, batch {batch_size}, {n_steps} steps "
          f"({n_steps * batch_size} tokens) per layer")
    print(f"training (train_layers, {args.threads} workers x 1 thread): median {t_train:.2f} s "
          f"({t_train / n:.2f} s/layer, {n * n_steps * batch_size / t_train:,.0f} tokens/s)")
    print(f"one after another on {args.threads} threads      : median {t_serial:.2f} s ({t_serial / n:.2f} s/layer); "
          f"speed-up of the workers {t_serial / t_train:.2f}x")
    print(f"stream alone : median {t_stream:.2f} s")
    print(f"dense bound  : median {t_bound:.2f} s ({t_bound / n:.2f} s/layer, {flops / t_bound / 1e9:.1f} matmul GFLOP/s)")
    print(f"stream share stream/training: {t_stream / t_train:.2f}")
    print(f"fraction of bound bound/training: {ratio:.2f} "
          f"{'(ok, >= 0.5)' if ratio >= 0.5 else '(below the 0.5 target)'}; one after another: {t_bound / t_serial:.2f}")


if __name__ == "__main__":
    main()
