"""Explained variance on held-out text against SAE training tokens (and batch size), one layer at a time.

What it answers (issue 16, item 4): how far the demo SAEs are from EV >= 0.8 on held-out text, and
which (training tokens, batch size) buys the most EV per second of the 15-minute budget.

    python bench/ev_curve.py --results RESULTS --layers 14 24
    python bench/ev_curve.py --results RESULTS --layers 14 --tokens 10240 20480 40960 --batch-sizes 128 256

Each point trains the layer's SAE exactly as `train_sae` does (`bugscope.sae.train_layers`, one thread, with
the config's `sae` settings, only `training_tokens` and `batch_size` replaced; the learning rate
stays the config's), on the run's cached training split of the corpus (several epochs where the
tokens exceed it), then measures EV on the held-out text (`lee.cor`) with the quality stage's
`reconstruction_stats`. Prints one row per point: tokens, batch, epochs, training seconds, EV.
`--results` is a finished run's results folder, read only; the corpus it cached bounds the epoch
count, not the curve (more tokens than the split cycles it).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # SAE-Lens's progress bar: noise on stderr

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from bugscope.config import load_config, with_sae_set  # noqa: E402
from bugscope.data.corpus import split_ids  # noqa: E402
from bugscope.io import read_metadata  # noqa: E402
from bugscope.model.sites import hook_name  # noqa: E402
from bugscope.sae.activations import ActivationSource, iter_activations
from bugscope.sae.quality import reconstruction_stats  # noqa: E402
from bugscope.sae.store import load_sae, save_sae
from bugscope.sae.train import LayerTraining, train_layers
from bugscope.stats import layer_seed  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(REPO / "results"), help="a finished run's results folder")
    ap.add_argument("--config", default=str(REPO / "config" / "config.yaml"))
    ap.add_argument("--sae-set", default=None, help="default: the config's first SAE set")
    ap.add_argument("--layers", type=int, nargs="+", default=[14])
    ap.add_argument("--tokens", type=int, nargs="+", default=[5120, 10240, 20480, 40960, 81920])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[128])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    cfg = with_sae_set(cfg, args.sae_set or cfg["sae"]["sets"][0]["name"])
    results = Path(args.results)
    corpus = pq.read_table(results / "corpus" / "corpus.parquet", columns=["prompt_id", "split"])
    ids = {split: split_ids(corpus, split) for split in ("train", "heldout")}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; config {args.config}: expansion "
          f"{cfg['sae']['expansion']}, k {cfg['sae']['k']}, lr {cfg['sae']['lr']}")
    print("| layer | training tokens | batch | epochs | train s | EV held-out text |")
    print("|---:|---:|---:|---:|---:|---:|")
    for layer in args.layers:
        hook = hook_name(layer, cfg["sae_set"]["site"])
        path = str(results / "activations" / "corpus" / f"{hook}.parquet")
        n_train = sum(x.shape[0] for _, _, x in iter_activations([ActivationSource(path, prompt_ids=ids["train"])]))
        heldout = ActivationSource(path, prompt_ids=ids["heldout"])
        d_in = int(read_metadata(path)["d_model"])
        seed = layer_seed(cfg["seed"], layer)
        for batch_size in args.batch_sizes:
            for tokens in args.tokens:
                sae_cfg = {**cfg["sae"], "training_tokens": tokens, "batch_size": batch_size}
                job = LayerTraining(layer, hook, ActivationSource(path, prompt_ids=ids["train"]), seed)
                t0 = time.perf_counter()
                [trained] = train_layers([job], d_in=d_in, sae_cfg=sae_cfg)
                seconds = time.perf_counter() - t0
                with tempfile.TemporaryDirectory() as tmp:  # the saved, folded form the quality stage reads
                    save_sae(trained.sae, Path(tmp) / "sae", {})
                    sae, _ = load_sae(Path(tmp) / "sae")
                ev = reconstruction_stats(sae, heldout, cfg["sae"]["encode_batch_size"]).result()["ev"]
                print(f"| {layer} | {trained.n_tokens} | {batch_size} | {trained.n_tokens / n_train:.2f} | "
                      f"{seconds:.1f} | {ev:.3f} |", flush=True)


if __name__ == "__main__":
    main()
