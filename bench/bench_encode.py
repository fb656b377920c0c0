"""Encoding throughput of the SAE stage against the dense-matmul bound, measured in the same run.

What `encode_features` runs per batch is `bugscope.sae.encode_sparse`: `sae.encode(x)` (matmul,
bias, activation function) plus the extraction of the non-zero (row, feature, value) triples. Its
unavoidable part is the dense matmul x @ W_enc of the same shapes; the ratio of the two
throughputs says how much the rest costs (target >= 0.5).

    python bench/bench_encode.py            # both shapes, on CUDA when visible
    python bench/bench_encode.py --rows 8192 --repeats 5

Shapes: the default config's trained TopK SAE (d_in 576, d_sae 1152, k 48) and a Llama Scope 8x
JumpReLU SAE (d_in 4096, d_sae 32768, threshold set for L0 about 50). Weights are random: the
cost does not depend on their values, only on shapes and L0.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bugscope.sae.encode import encode_sparse


def median_times(fns, repeats: int, sync) -> list[float]:
    """Median wall time of each function, the functions interleaved in every repeat so that a
    noisy neighbour slows them alike."""
    for fn in fns:
        fn()
    sync()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def make_topk(d_in: int, d_sae: int, k: int, device: str):
    from sae_lens import SAE

    sae = SAE.from_dict({"architecture": "topk", "d_in": d_in, "d_sae": d_sae, "k": k, "dtype": "float32",
                         "device": device, "apply_b_dec_to_input": False, "normalize_activations": "none",
                         "metadata": {"hook_name": "blocks.0.hook_resid_post"}})
    return sae.eval()


def make_jumprelu(d_in: int, d_sae: int, l0: int, x: torch.Tensor, device: str):
    from sae_lens import SAE

    sae = SAE.from_dict({"architecture": "jumprelu", "d_in": d_in, "d_sae": d_sae, "dtype": "float32",
                         "device": device, "apply_b_dec_to_input": False, "normalize_activations": "none",
                         "metadata": {"hook_name": "blocks.0.hook_resid_post"}})
    with torch.no_grad():
        sae.W_enc.normal_(0, d_in ** -0.5)
        pre = x[:256] @ sae.W_enc
        sae.threshold.fill_(pre.flatten().kthvalue(pre.numel() - l0 * 256).values.item())
    return sae.eval()


def run(name: str, sae, x: torch.Tensor, repeats: int, sync) -> float:
    w = sae.W_enc.detach()
    t_mm, t_enc = median_times([lambda: x @ w, lambda: encode_sparse(sae, x, batch_size=x.shape[0])], repeats, sync)
    nnz = encode_sparse(sae, x[:1024], batch_size=1024)[0].numel() / min(1024, x.shape[0])
    ratio = t_mm / t_enc
    print(f"{name}: rows {x.shape[0]}, d_in {sae.cfg.d_in}, d_sae {sae.cfg.d_sae}, L0 {nnz:.1f}\n"
          f"  dense matmul bound {x.shape[0] / t_mm:,.0f} rows/s ({2 * x.numel() * sae.cfg.d_sae / t_mm / 1e9:.1f} GFLOP/s)\n"
          f"  encode_sparse      {x.shape[0] / t_enc:,.0f} rows/s\n"
          f"  fraction of bound  {ratio:.2f} {'(ok, >= 0.5)' if ratio >= 0.5 else '(below the 0.5 target)'}")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    x = torch.randn(args.rows, 576, device=device)
    ratios = [run("trained TopK (default config)", make_topk(576, 1152, 48, device), x, args.repeats, sync)]
    big_rows = args.rows if device == "cuda" else max(256, args.rows // 8)
    xb = torch.randn(big_rows, 4096, device=device)
    ratios.append(run("Llama Scope 8x JumpReLU", make_jumprelu(4096, 32768, 50, xb, device), xb, args.repeats, sync))
    print(f"minimum fraction of the dense-matmul bound: {min(ratios):.2f}")


if __name__ == "__main__":
    main()
