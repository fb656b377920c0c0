"""SAE training throughput against the dense-matmul bound, measured in the same run.

What `train_sae` runs per layer is `bugscope.sae.train_topk_sae`: SAE-Lens's SAETrainer on a
TopKTrainingSAE, fed by `ActivationStream` from the layer's cached corpus activations. Timed,
interleaved in every repeat so that a noisy neighbour slows them alike:

- training: the whole `train_topk_sae` of one layer (stream, trainer set-up, every step, folding);
- stream:   the ActivationStream alone, iterated for the batches that training draws;
- bound:    the SAE's dense matmuls forward and backward (x @ W_enc, h @ W_dec, MSE) and an Adam
            step, on random data of the same batch size, as many steps; no SAE-Lens, no TopK.

Prints the medians, the fraction of the bound (bound / training, target >= 0.5) and the stream's
share (stream / training).

    python bench/bench_train.py --results /tmp/fresh2/results          # layer 8, the default config
    python bench/bench_train.py --results RESULTS --layer 21 --repeats 7

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
from bugscope.corpus import split_ids  # noqa: E402
from bugscope.sae import ActivationSource, ActivationStream, train_topk_sae  # noqa: E402
from bugscope.sites import hook_name  # noqa: E402
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
    ap.add_argument("--layer", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    cfg = with_sae_set(cfg, args.sae_set or cfg["sae"]["sets"][0]["name"])
    sae_cfg = cfg["sae"]
    hook = hook_name(args.layer, cfg["sae_set"]["site"])
    results = Path(args.results)
    acts_path = str(results / "activations" / "corpus" / f"{hook}.parquet")
    corpus = pq.read_table(results / "corpus" / "corpus.parquet", columns=["prompt_id", "split"])
    train_ids = split_ids(corpus, "train")
    seed = layer_seed(cfg["seed"], args.layer)
    batch_size = sae_cfg["batch_size"]
    n_steps = max(1, sae_cfg["training_tokens"] // batch_size)
    d_sae = sae_cfg["expansion"] * D_MODEL

    def make_stream():
        return ActivationStream([ActivationSource(acts_path, prompt_ids=train_ids)], batch_size=batch_size, seed=seed)

    def train():
        train_topk_sae(make_stream(), d_in=D_MODEL, layer=args.layer, hook=hook, sae_cfg=sae_cfg, seed=seed)

    def stream():
        s = make_stream()
        for _ in range(n_steps + n_first_batches(n_steps)):
            next(s)

    t_train, t_stream, t_bound = median_times([train, stream, dense_bound(batch_size, D_MODEL, d_sae, n_steps, seed)],
                                              args.repeats)
    ratio = t_bound / t_train
    flops = 5 * 2 * batch_size * D_MODEL * d_sae * n_steps  # 2 forward matmuls; backward: dW_enc, dW_dec, dh
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.repeats} repeats, layer {args.layer} "
          f"({acts_path})")
    print(f"SAE d_in {D_MODEL}, d_sae {d_sae}, k {sae_cfg['k']}, batch {batch_size}, {n_steps} steps "
          f"({n_steps * batch_size} tokens)")
    print(f"training     : median {t_train:.3f} s ({t_train / n_steps * 1e3:.2f} ms/step, "
          f"{n_steps * batch_size / t_train:,.0f} tokens/s)")
    print(f"stream alone : median {t_stream:.3f} s ({t_stream / n_steps * 1e3:.2f} ms/step)")
    print(f"dense bound  : median {t_bound:.3f} s ({t_bound / n_steps * 1e3:.2f} ms/step, "
          f"{flops / t_bound / 1e9:.1f} matmul GFLOP/s)")
    print(f"stream share stream/training: {t_stream / t_train:.2f}")
    print(f"fraction of bound bound/training: {ratio:.2f} "
          f"{'(ok, >= 0.5)' if ratio >= 0.5 else '(below the 0.5 target)'}")


if __name__ == "__main__":
    main()
