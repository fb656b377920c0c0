"""Training TopK SAEs with SAE-Lens (`TopKTrainingSAE`, `SAETrainer`) on streamed activations, one
thread per layer, layers side by side in worker processes on a CPU.
"""

from __future__ import annotations

import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import partial, partialmethod
from typing import Sequence

import torch

from bugscope.sae.activations import ActivationSource, ActivationStream


@dataclass
class TrainResult:
    sae: object
    seed: int
    n_steps: int
    n_tokens: int
    train_l0: float | None
    train_dead_fraction: float | None
    extra: dict = field(default_factory=dict)


def train_topk_sae(stream: ActivationStream, *, d_in: int, layer: int, hook: str, sae_cfg: dict,
                   seed: int, device: str = "cpu", model_name: str = "") -> TrainResult:
    """Train one TopK SAE with SAE-Lens's TopKTrainingSAE and SAETrainer on `stream`.

    Activations are normalised to mean norm sqrt(d_in) during training (SAE-Lens's
    `expected_average_only_in`), and the scale is folded into the weights at the end, so the saved
    SAE takes raw activations. b_dec starts at the mean activation of the first batches.
    """
    from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    batch_size = sae_cfg["batch_size"]
    n_steps = max(1, sae_cfg["training_tokens"] // batch_size)
    cfg = TopKTrainingSAEConfig(
        d_in=d_in, d_sae=sae_cfg["expansion"] * d_in, k=sae_cfg["k"], dtype="float32", device=device,
        normalize_activations="expected_average_only_in",
        metadata=SAEMetadata(model_name=model_name, hook_name=hook, hook_head_index=None,
                             prepend_bos=False, seqpos_slice=[1, None]),
    )
    sae = TopKTrainingSAE(cfg)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=n_steps * batch_size, train_batch_size_samples=batch_size,
        lr=sae_cfg["lr"], lr_end=sae_cfg["lr"], lr_scheduler_name="constant",
        lr_warm_up_steps=0, lr_decay_steps=n_steps // 5, device=device,
        dead_feature_window=max(10, n_steps // 4), feature_sampling_window=n_steps + 1,
        n_checkpoints=0, save_final_checkpoint=False,
    )
    trainer = SAETrainer(trainer_cfg, sae, stream)
    # Normalisation scale and b_dec from the first batches; then SAE-Lens trains.
    first = torch.cat([next(stream) for _ in range(max(1, min(8, n_steps // 4)))]).float()
    scale = d_in ** 0.5 / first.norm(dim=-1).mean().item()
    trainer.activation_scaler.scaling_factor = scale
    with torch.no_grad():
        sae.b_dec.copy_((first.mean(0) * scale).to(sae.b_dec.dtype))
    sae = trainer.fit()
    meta = sae.cfg.metadata
    return TrainResult(
        sae=sae, seed=seed, n_steps=n_steps, n_tokens=n_steps * batch_size,
        train_l0=meta.get("l0"), train_dead_fraction=(meta.get("num_dead_features") or 0) / cfg.d_sae,
        extra={"norm_scaling_factor": scale},
    )


@dataclass(frozen=True)
class LayerTraining:
    """One layer's SAE to train: its cached activations (the rows to train on) and its seed."""

    layer: int
    hook: str
    source: ActivationSource
    seed: int

    def stream(self, batch_size: int, device: str = "cpu") -> ActivationStream:
        return ActivationStream([self.source], batch_size=batch_size, seed=self.seed, device=device)


def train_layer(job: LayerTraining, *, d_in: int, sae_cfg: dict, device: str = "cpu",
                model_name: str = "") -> TrainResult:
    """One layer's SAE, trained by `train_topk_sae` on the job's stream, on this process's threads."""
    return train_topk_sae(job.stream(sae_cfg["batch_size"], device), d_in=d_in, layer=job.layer, hook=job.hook,
                          sae_cfg=sae_cfg, seed=job.seed, device=device, model_name=model_name)


def train_layers(jobs: Sequence[LayerTraining], *, d_in: int, sae_cfg: dict, device: str = "cpu",
                 model_name: str = "", workers: int = 1, on_done=None) -> list[TrainResult]:
    """One SAE per job (results in job order), each trained by `train_topk_sae` on its own stream.

    On a CPU every layer trains on one thread, `workers` layers side by side in worker processes:
    a 128-row training step is many small ops, which two threads run only 1.35x faster than one,
    so on 2 cores two layers side by side finish about 1.2x sooner than one after another on two
    threads (bench/bench_train.py). One thread per layer also makes an SAE's bits independent of
    how many workers ran. On a GPU the layers train one after another in this process.
    `on_done(job, result)` is called as each layer finishes, in finishing order; a bar on stderr
    counts the layers.
    """
    from tqdm import tqdm

    train = partial(train_layer, d_in=d_in, sae_cfg=sae_cfg, device=device, model_name=model_name)
    parallel = device == "cpu" and workers > 1 and len(jobs) > 1
    if parallel:
        _stop_tqdm_monitor()
    with tqdm(total=len(jobs), desc="SAEs trained", unit="layer", file=sys.stderr) as progress:
        def done(job, result):
            if on_done:
                on_done(job, result)
            progress.update()

        if not parallel:
            return _train_here(jobs, train, device, done)
        import sae_lens  # noqa: F401  (imported once here, inherited by the forked workers: 6 s each otherwise)

        # fork, as torch's DataLoader workers: each worker runs torch on one thread, so it never enters
        # the OpenMP pool it inherited. spawn would re-run the caller's main module, a Snakemake script.
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("fork"),
                                 initializer=_init_training_worker) as pool:
            futures = {pool.submit(_train_layer_portable, job, train): job for job in jobs}
            for future in as_completed(futures):
                result = future.result()
                result.sae = _rebuild_training_sae(*result.sae)
                done(futures[future], result)
            return [f.result() for f in futures]


def _train_here(jobs, train, device: str, done) -> list[TrainResult]:
    """The layers one after another in this process, on one thread each on a CPU (the same bits as a worker)."""
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        results = []
        for job in jobs:
            results.append(train(job))
            done(job, results[-1])
        return results
    finally:
        torch.set_num_threads(threads)


def _stop_tqdm_monitor() -> None:
    """No tqdm monitor thread across the fork: one holding tqdm's lock at that moment would leave it
    locked in the workers, whose (disabled) bars take it."""
    from tqdm import tqdm

    tqdm.monitor_interval = 0
    if tqdm.monitor is not None:
        tqdm.monitor.exit()
        tqdm.monitor = None


def _init_training_worker() -> None:
    from tqdm import tqdm

    torch.set_num_threads(1)
    # SAE-Lens's per-step bars of several workers would interleave in one log: the caller reports layers.
    tqdm.__init__ = partialmethod(tqdm.__init__, disable=True)


def _train_layer_portable(job: LayerTraining, train) -> TrainResult:
    """`train(job)` with the SAE as (config, state dict): a process boundary cannot carry the SAE
    itself (SAE-Lens's modules hold lambdas)."""
    result = train(job)
    result.sae = (result.sae.cfg, result.sae.state_dict())
    return result


def _rebuild_training_sae(cfg, state: dict):
    from sae_lens import TopKTrainingSAE

    sae = TopKTrainingSAE(cfg)
    sae.load_state_dict(state)
    return sae
