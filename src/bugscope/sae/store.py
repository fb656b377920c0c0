"""SAEs on disk: SAE-Lens's format (`cfg.json` + `sae_weights.safetensors`) with bugscope's provenance
beside it, and pretrained SAEs loaded from SAE-Lens's directory and checked against the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bugscope.io import atomic_path
from bugscope.sae.directory import SAEConfigError

PROVENANCE_FILE = "bugscope.json"


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


def sae_folders(paths) -> dict[tuple[str, str], str]:
    """A rule's SAE folders (bugscope.layout.SAE_DIR: .../<sae_set>/<hook>) by (set, hook). Scripts
    take them from their input, never rebuild them: the organism's live under results/organism/."""
    return {(Path(p).parent.name, Path(p).name): str(p) for p in ([paths] if isinstance(paths, str) else paths)}
