"""SAEs for every analysed layer: pretrained from SAE-Lens's directory, or trained here with SAE-Lens.

One config section (`sae:`), two sources:
- `pretrained`: an SAE-Lens release (e.g. `llama_scope_lxr_8x`) and an sae-id template
  (`l{layer}r_8x`). The release, every id and every hook name are checked against SAE-Lens's own
  directory of pretrained SAEs (`pretrained_saes.yaml`, bugscope.sae_directory) before anything is
  downloaded.
- `train`: SAE-Lens's `TopKTrainingSAE` trained by SAE-Lens's `SAETrainer`, fed by
  `ActivationStream`, which streams batches from the cached activation Parquet files one row group
  at a time (never all tokens in memory).

Either way the SAE is saved in SAE-Lens's format (`cfg.json` + `sae_weights.safetensors`), so
`SAE.load_from_disk(results/sae/<hook>)` works anywhere, plus `bugscope.json` with provenance.

Position 0 of every sequence is an attention sink with a huge norm (research notes section 3): it
is left out of training and of every quality metric.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import partial, partialmethod
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bugscope.cache import NonFiniteActivationError
from bugscope.io import arrow_to_vectors, atomic_path, read_metadata
from bugscope.prompts import SINK_POSITION  # noqa: F401  (re-exported for readers of SAE tables)
from bugscope.sae_directory import (  # noqa: F401  (the pretrained check, re-exported for callers)
    SAEConfigError,
    directory_hook_name,
    resolve_pretrained,
)

PROVENANCE_FILE = "bugscope.json"

FEATURE_SCHEMA = pa.schema([
    ("prompt_id", pa.int32()), ("position", pa.int32()),
    ("feature_id", pa.int32()), ("activation", pa.float32()),
])


# --- pretrained SAEs (the check against SAE-Lens's directory: bugscope.sae_directory) -----------

def load_pretrained_sae(release: str, sae_id: str, *, device: str = "cpu", dtype: str = "float32"):
    """(SAE, hub source) of one pretrained SAE, loaded through SAE-Lens (its conversion and
    normalisation folding included).

    The hub source is {"sae_repo_id", "sae_folder", "sae_revision"}: the Hugging Face repo SAE-Lens's
    directory maps the release to, the SAE's folder in it and the commit sha its files came from.
    """
    from sae_lens import SAE
    from sae_lens.loading.pretrained_saes_directory import get_repo_id_and_folder_name

    sae, _cfg, _sparsity = SAE.from_pretrained_with_cfg_and_sparsity(release, sae_id, device=device, dtype=dtype)
    repo_id, folder = get_repo_id_and_folder_name(release, sae_id)
    return sae, {"sae_repo_id": repo_id, "sae_folder": folder, "sae_revision": cached_revision(repo_id, folder)}


def cached_revision(repo_id: str, folder: str) -> str | None:
    """The commit sha the local Hugging Face cache holds `folder` of `repo_id` at, read after SAE-Lens loaded it.

    SAE-Lens's loaders call `hf_hub_download(repo_id, ...)` without a revision and take none from us,
    so an SAE cannot be loaded at a pinned commit. What can be recorded is the commit that download
    resolved: `hf_hub_download` writes the default branch's commit to `refs/main` in the cache (online)
    or reads it from there (HF_HUB_OFFLINE=1). None when the cache does not hold the folder at that
    commit (e.g. another job moved `refs/main` meanwhile): the provenance then says "unknown".
    """
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    ref = storage / "refs" / constants.DEFAULT_REVISION
    if not ref.is_file():
        return None
    commit = ref.read_text().strip()
    return commit if (storage / "snapshots" / commit / folder).exists() else None


def check_sae_fits(sae, *, expected_hook: str, d_model: int, where: str) -> None:
    """The SAE must read the cached hook and have d_in equal to the model's width."""
    found = sae.cfg.metadata.hook_name
    if found != expected_hook:
        raise SAEConfigError(
            f"{where}: the SAE reads {found!r}, but the activations are cached at {expected_hook!r}. "
            "The SAE must be applied to the activations it was trained on: set the SAE set's site (sae.sets[].site) to the SAE's "
            "site, or choose an SAE for the cached site."
        )
    if sae.cfg.d_in != d_model:
        raise SAEConfigError(
            f"{where}: the SAE has d_in={sae.cfg.d_in} but the model's residual width is d_model={d_model}. "
            "It was trained for another model: choose an SAE release for this model (model.checkpoint) "
            "or use sae.source: train."
        )


# --- streaming activations ---------------------------------------------------------------------

@dataclass(frozen=True)
class ActivationSource:
    """One cached activation Parquet file and the rows of it to use."""

    path: str
    prompt_ids: frozenset[int] | None = None  # None: every prompt id
    drop_positions: frozenset[int] = frozenset({SINK_POSITION})


def _check_finite(x: torch.Tensor, ids: np.ndarray, path) -> None:
    if not torch.isfinite(x).all():
        bad = sorted(set(ids[(~torch.isfinite(x)).any(-1).numpy()].tolist()))
        raise NonFiniteActivationError(
            f"{path} holds NaN or Inf activations (prompt ids {bad[:10]}). The cache is corrupt or the "
            "model overflowed in its dtype: rerun the caching rule, in float32 (model.dtype) if it recurs."
        )


def read_row_group(source: ActivationSource, pf: pq.ParquetFile, i: int, dtype: str):
    """(prompt_id, position, activations [n, d]) of one row group, filtered and checked for NaN/Inf."""
    t = pf.read_row_group(i, columns=["prompt_id", "position"])
    ids = t.column("prompt_id").to_numpy()
    pos = t.column("position").to_numpy()
    keep = ~np.isin(pos, list(source.drop_positions))
    if source.prompt_ids is not None:
        keep &= np.isin(ids, list(source.prompt_ids))
    if not keep.any():  # e.g. the held-out text: most row groups hold none of it, and are not decoded
        return ids[:0], pos[:0], None
    idx = np.nonzero(keep)[0]
    x = arrow_to_vectors(pf.read_row_group(i, columns=["activation"]).column("activation").take(pa.array(idx)), dtype)
    _check_finite(x, ids[idx], source.path)
    return ids[idx], pos[idx], x


def iter_activations(sources: Sequence[ActivationSource]) -> Iterator[tuple]:
    """Yield (prompt_id, position, [n, d] float32) per row group, in file order."""
    for source in sources:
        pf = pq.ParquetFile(source.path)
        dtype = _file_dtype(source.path)
        for i in range(pf.num_row_groups):
            ids, pos, x = read_row_group(source, pf, i, dtype)
            if x is not None:
                yield ids, pos, x


def _file_dtype(path) -> str:
    return read_metadata(path).get("dtype", "float32")


class ActivationStream:
    """An endless iterator of shuffled [batch_size, d_in] float32 batches from cached Parquet files.

    Each epoch visits the row groups of all sources in an order drawn from `seed`; rows go through
    a mixing buffer of `buffer_rows` rows that is shuffled before batches are taken from it. Memory
    holds one buffer, never a whole file. This is SAE-Lens's `DataProvider` (an iterator of batches).
    """

    def __init__(self, sources: Sequence[ActivationSource], *, batch_size: int, seed: int,
                 buffer_rows: int = 16384, device: str = "cpu"):
        self.sources = list(sources)
        self.batch_size = batch_size
        self.buffer_rows = max(buffer_rows, 2 * batch_size)
        self.device = device
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.files = [(s, pq.ParquetFile(s.path), _file_dtype(s.path)) for s in self.sources]
        self.groups = [(f, g) for f, (_, pf, _) in enumerate(self.files) for g in range(pf.num_row_groups)]
        self._it = self._batches()

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        return next(self._it)

    def _batches(self) -> Iterator[torch.Tensor]:
        buffer: list[torch.Tensor] = []
        n_buffered = 0
        while True:
            order = list(self.groups)
            self.rng.shuffle(order)
            produced = False
            for f, g in order:
                source, pf, dtype = self.files[f]
                _, _, x = read_row_group(source, pf, g, dtype)
                if x is None:
                    continue
                buffer.append(x)
                n_buffered += x.shape[0]
                produced = True
                if n_buffered >= self.buffer_rows:
                    yield from self._drain(buffer, keep_half=True)
                    n_buffered = sum(b.shape[0] for b in buffer)
            if not produced:
                raise ValueError(
                    f"No activation rows to train on in {', '.join(s.path for s in self.sources)} "
                    "(after leaving out position 0 and held-out prompts). Increase sae.corpus.train_tokens."
                )
            if n_buffered >= self.batch_size:
                yield from self._drain(buffer, keep_half=False)
                n_buffered = sum(b.shape[0] for b in buffer)

    def _drain(self, buffer: list[torch.Tensor], keep_half: bool) -> Iterator[torch.Tensor]:
        data = torch.cat(buffer)
        data = data[torch.randperm(data.shape[0], generator=self.gen)]
        n_out = data.shape[0] // 2 if keep_half else data.shape[0]
        n_out -= n_out % self.batch_size
        buffer.clear()
        if n_out < data.shape[0]:
            buffer.append(data[n_out:])
        for start in range(0, n_out, self.batch_size):
            yield data[start:start + self.batch_size].to(self.device)


# --- training ----------------------------------------------------------------------------------

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


# --- saving and loading ------------------------------------------------------------------------

def save_sae(sae, out_dir: str | Path, provenance: dict) -> None:
    """Write an SAE in SAE-Lens's format plus `bugscope.json`, atomically (a folder renamed into place)."""
    with torch.no_grad():  # converted checkpoints hold transposed views, which safetensors refuses
        for param in sae.parameters():
            param.data = param.data.contiguous()
    with atomic_path(out_dir, is_dir=True) as tmp:
        if hasattr(sae, "save_inference_model"):
            sae.save_inference_model(tmp)  # a training SAE: SAE-Lens saves its inference form
        else:
            sae.save_model(tmp)
        # SAE-Lens writes cfg.json in set-iteration order, which changes with Python's hash seed:
        # sorted, a rerun writes the same bytes.
        cfg_file = tmp / "cfg.json"
        cfg_file.write_text(json.dumps(json.loads(cfg_file.read_text()), sort_keys=True))
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")


def load_sae(sae_dir: str | Path, *, device: str = "cpu"):
    """(SAE, provenance) from a folder written by `save_sae`, through `SAE.load_from_disk`."""
    from sae_lens import SAE

    sae_dir = Path(sae_dir)
    if not (sae_dir / "cfg.json").is_file():
        raise FileNotFoundError(
            f"{sae_dir} holds no SAE (cfg.json missing). Remake it with the rule that writes it: "
            f"`snakemake --cores all --force {sae_dir}`, then rerun the pipeline."
        )
    sae = SAE.load_from_disk(sae_dir, device=device)
    sae.eval()
    prov_path = sae_dir / PROVENANCE_FILE
    provenance = json.loads(prov_path.read_text()) if prov_path.is_file() else {}
    return sae, provenance


def sae_provenance_meta(provenance: dict) -> dict:
    """The SAE fields copied into the metadata of every table made with it."""
    keys = ("sae_set", "source", "release", "sae_id", "sae_repo_id", "sae_revision", "hook_name", "d_sae", "architecture",
            "seed", "training")
    return {"sae": {k: provenance.get(k) for k in keys if k in provenance}}


# --- encoding ----------------------------------------------------------------------------------

@torch.inference_mode()
def encode_sparse(sae, x: torch.Tensor, *, batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row [nnz], feature_id [nnz], activation [nnz]) of `sae.encode(x)` for x [n, d_in]; nonzeros only."""
    rows, feats, vals = [], [], []
    device = next(sae.parameters()).device
    topk = sae.cfg.architecture() == "topk"
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(device)
        if topk:
            r, f, v = _topk_sparse(sae, xb)
        else:
            acts = sae.encode(xb)  # [b, d_sae]
            r, f = acts.nonzero(as_tuple=True)
            v = acts[r, f]
        rows.append(r + start)
        feats.append(f)
        vals.append(v.float())
    if not rows:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, torch.zeros(0)
    return torch.cat(rows).cpu(), torch.cat(feats).cpu(), torch.cat(vals).cpu()


def _topk_sparse(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The non-zeros of a TopK SAE's `encode(x)` straight from its top-k, without the dense [b, d_sae] scatter.

    Same computation as SAE-Lens's TopKSAE.encode (pre-activation, optional decoder-norm rescale,
    torch.topk, ReLU); tests check equality with `sae.encode`.
    """
    pre = sae.process_sae_in(x) @ sae.W_enc
    pre += sae.b_enc  # [b, d_sae]; in place, the same bits as `+`
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        pre *= sae.W_dec.norm(dim=-1)
    values, index = torch.topk(pre, k=sae.cfg.k, dim=-1, sorted=False)  # [b, k]
    # topk's order is unspecified (it differs between machines); order by feature id, as dense
    # nonzero() does, so the feature table is byte-identical wherever it is computed.
    index, order = index.sort(dim=-1)
    values = values.gather(-1, order).clamp_min_(0).flatten()  # ReLU
    index = index.flatten()
    rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(sae.cfg.k)
    keep = (values > 0).nonzero().flatten()
    if keep.numel() == values.numel():  # the usual case: no top-k value is <= 0, nothing to drop
        return rows, index, values
    return rows.index_select(0, keep), index.index_select(0, keep), values.index_select(0, keep)


def encode_activation_file(sae, activations_path: str | Path, *, batch_size: int = 4096) -> pa.Table:
    """Sparse features of every cached (prompt, position) of one activation file."""
    pieces = []
    for ids, pos, x in iter_activations([ActivationSource(str(activations_path), drop_positions=frozenset())]):
        r, f, v = encode_sparse(sae, x, batch_size=batch_size)
        r = r.numpy()
        pieces.append(pa.Table.from_arrays([
            pa.array(ids[r], pa.int32()), pa.array(pos[r], pa.int32()),
            pa.array(f.numpy(), pa.int32()), pa.array(v.numpy(), pa.float32()),
        ], schema=FEATURE_SCHEMA))
    return pa.concat_tables(pieces) if pieces else FEATURE_SCHEMA.empty_table()
