"""Hub models resolved once to a commit and loaded from its local snapshot, offline.

A fake Hugging Face cache (the layout `snapshot_download` reads: `models--org--name/refs/<ref>`
holding a commit sha, `snapshots/<sha>/<file>` linking to `blobs/<hash>`) holds two commits of a
tiny random Llama. HF_HUB_OFFLINE is on, so any request to the hub would raise: every test here
proves that the cache alone is enough.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from bugscope.model.load import (
    ModelManifest,
    ModelUnavailableError,
    load_model,
    load_tokenizer,
    prepare_model,
)

REPO_ID = "tiny-org/tiny-llama"
OLD = hashlib.sha1(b"tiny-llama v1.0").hexdigest()  # tagged v1.0
NEW = hashlib.sha1(b"tiny-llama main").hexdigest()  # main
PARTIAL = hashlib.sha1(b"tiny-llama partial").hexdigest()  # a snapshot whose weights never arrived
MODEL_CFG = {"name": "tiny-llama", "checkpoint": REPO_ID, "revision": None, "dtype": "float32",
             "num_layers": 2, "num_heads": 4}


def _tiny_llama(folder: Path, seed: int) -> None:
    """A 2-layer Llama (hidden 64, 4 heads, 2 KV heads) and a word-level tokenizer, saved as from the hub."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(253))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(vocab_size=len(words), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _add_commit(cache: Path, commit: str, files: Path, refs: tuple[str, ...], skip: tuple[str, ...] = ()) -> None:
    """Lay `files` out as commit `commit` of REPO_ID in the hub cache, the way huggingface_hub writes it."""
    storage = cache / f"models--{REPO_ID.replace('/', '--')}"
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in sorted(files.iterdir()):
        if f.name in skip:
            continue
        blob = hashlib.sha256(f.read_bytes()).hexdigest()
        (storage / "blobs" / blob).write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(os.path.join("..", "..", "blobs", blob))
    for ref in refs:
        (storage / "refs").mkdir(exist_ok=True)
        (storage / "refs" / ref).write_text(commit)


@pytest.fixture(scope="module")
def fake_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake_hub")
    cache = root / "hub"
    for commit, seed, refs, skip in ((OLD, 1, ("v1.0",), ()), (NEW, 2, ("main",), ()),
                                     (PARTIAL, 3, ("partial",), ("model.safetensors",))):
        _tiny_llama(root / commit, seed)
        _add_commit(cache, commit, root / commit, refs, skip)
    return cache


@pytest.fixture
def offline_cache(fake_cache, monkeypatch):
    """The fake cache as HF_HUB_CACHE, offline. huggingface_hub reads both variables once at import,
    and transformers reads them through huggingface_hub.constants at call time: patch the constants."""
    import huggingface_hub
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # for anything that reads the environment itself
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(fake_cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise AssertionError("auth_check needs the network; a cached model must not call it")

    monkeypatch.setattr(huggingface_hub, "auth_check", no_network)
    return fake_cache


def _snapshot(cache: Path, commit: str) -> str:
    return str(cache.resolve() / f"models--{REPO_ID.replace('/', '--')}" / "snapshots" / commit)


def test_hub_model_is_resolved_once_to_a_commit_and_its_snapshot(offline_cache, tmp_path):
    manifest = prepare_model(MODEL_CFG, tmp_path / "checkpoint", tmp_path / "model.json")
    written = json.loads((tmp_path / "model.json").read_text())
    assert written == {
        "name": "tiny-llama", "source": "hub", "path": REPO_ID, "revision": NEW,
        "snapshot_path": _snapshot(offline_cache, NEW), "dtype": "float32",
        "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "d_model": 64, "vocab_size": 256,
    }
    assert ModelManifest.load(tmp_path / "model.json") == manifest
    assert manifest.provenance() == {"model": "tiny-llama", "model_path": REPO_ID, "revision": NEW}
    assert not (tmp_path / "checkpoint").exists()  # nothing is copied out of the cache


@pytest.mark.parametrize("revision", ["v1.0", OLD])
def test_a_tag_or_a_commit_resolves_to_that_commit(offline_cache, tmp_path, revision):
    manifest = prepare_model({**MODEL_CFG, "revision": revision}, tmp_path / "checkpoint", tmp_path / "model.json")
    assert (manifest.revision, manifest.snapshot_path) == (OLD, _snapshot(offline_cache, OLD))


def test_later_jobs_load_the_recorded_snapshot_with_local_files_only(offline_cache, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = prepare_model({**MODEL_CFG, "revision": "v1.0"}, tmp_path / "checkpoint", tmp_path / "model.json")
    calls = []
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        original = cls.from_pretrained

        def spy(path, *args, _original=original, **kwargs):
            calls.append((path, kwargs.get("local_files_only")))
            return _original(path, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    model, tok = load_model(ModelManifest.load(tmp_path / "model.json"), "cpu")
    assert calls == [(_snapshot(offline_cache, OLD), True)] * 2
    # The v1.0 weights, although main has moved on to another commit.
    old = load_file(Path(_snapshot(offline_cache, OLD)) / "model.safetensors")
    new = load_file(Path(_snapshot(offline_cache, NEW)) / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.state_dict()[key], old[key]) and not torch.equal(old[key], new[key])
    assert model.config.num_hidden_layers == 2 and tok.padding_side == "left" and tok.pad_token == "</s>"
    assert tok("w1 w2")["input_ids"] == [4, 5]
    assert load_tokenizer(manifest).name_or_path == manifest.snapshot_path


def test_a_missing_revision_fails_first_and_says_what_to_do(offline_cache, tmp_path):
    with pytest.raises(ModelUnavailableError, match=r"revision 'v9' is not in the local Hugging Face cache") as err:
        prepare_model({**MODEL_CFG, "revision": "v9"}, tmp_path / "checkpoint", tmp_path / "model.json")
    msg = str(err.value)
    assert REPO_ID in msg and "HF_HUB_OFFLINE" in msg and "model.revision" in msg and "hf download" in msg
    assert not (tmp_path / "model.json").exists()


def test_an_uncached_model_offline_names_it_and_the_fixes(offline_cache, tmp_path):
    with pytest.raises(ModelUnavailableError) as err:
        prepare_model({**MODEL_CFG, "checkpoint": "meta-llama/Llama-3.1-8B-Instruct"}, tmp_path / "c", tmp_path / "m.json")
    msg = str(err.value)
    assert "meta-llama/Llama-3.1-8B-Instruct" in msg and "HF_TOKEN" in msg and "local folder" in msg
    assert not (tmp_path / "m.json").exists()


def test_a_snapshot_without_its_weights_fails_before_any_job(offline_cache, tmp_path):
    with pytest.raises(ModelUnavailableError, match=rf"commit {PARTIAL}.*lacks model.safetensors"):
        prepare_model({**MODEL_CFG, "revision": "partial"}, tmp_path / "checkpoint", tmp_path / "model.json")
    assert not (tmp_path / "model.json").exists()


@pytest.mark.parametrize("key,value", [("num_layers", 3), ("num_heads", 8)])
def test_the_config_geometry_check_applies_to_hub_models(offline_cache, tmp_path, key, value):
    with pytest.raises(ModelUnavailableError, match=rf"model.{key}={value}, but the checkpoint {REPO_ID} has"):
        prepare_model({**MODEL_CFG, key: value}, tmp_path / "checkpoint", tmp_path / "model.json")
    assert not (tmp_path / "model.json").exists()


def test_a_local_folder_manifest_has_no_snapshot_key(offline_cache, tmp_path):
    folder = _snapshot(offline_cache, NEW)
    manifest = prepare_model({**MODEL_CFG, "checkpoint": folder}, tmp_path / "checkpoint", tmp_path / "model.json")
    written = json.loads((tmp_path / "model.json").read_text())
    assert manifest.source == "local" and written["path"] == folder and written["revision"] is None
    assert "snapshot_path" not in written and manifest.folder() == folder


def test_embedded_manifest_bytes_are_unchanged(tmp_path):
    # The exact bytes ModelManifest.save wrote before hub manifests gained `snapshot_path`.
    golden = (
        '{\n  "d_model": 576,\n  "dtype": "float32",\n  "head_dim": 64,\n  "name": "SmolLM2-135M-Instruct",\n'
        '  "num_heads": 9,\n  "num_kv_heads": 3,\n  "num_layers": 30,\n  "path": "results/model/checkpoint",\n'
        '  "revision": null,\n  "source": "embedded",\n  "vocab_size": 49152\n}\n'
    )
    manifest = ModelManifest(name="SmolLM2-135M-Instruct", source="embedded", path="results/model/checkpoint",
                             revision=None, dtype="float32", num_layers=30, num_heads=9, num_kv_heads=3,
                             head_dim=64, d_model=576, vocab_size=49152)
    manifest.save(tmp_path / "model.json")
    assert (tmp_path / "model.json").read_text() == golden
    assert ModelManifest.load(tmp_path / "model.json") == manifest


def test_a_hub_manifest_without_a_snapshot_asks_for_prepare_model(tmp_path):
    (tmp_path / "model.json").write_text(json.dumps({
        "name": "x", "source": "hub", "path": REPO_ID, "revision": None, "dtype": "float32", "num_layers": 2,
        "num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "d_model": 64, "vocab_size": 256}))
    with pytest.raises(ModelUnavailableError, match=r"forcerun prepare_model"):
        load_model(ModelManifest.load(tmp_path / "model.json"), "cpu")


def test_sae_revision_is_unknown_when_the_cache_lacks_that_folder(offline_cache):
    from bugscope.sae.store import cached_revision

    assert cached_revision(REPO_ID, "tokenizer.json") == NEW  # refs/main -> NEW, which holds it
    assert cached_revision(REPO_ID, "no-such-sae") is None
    assert cached_revision("nobody/nothing", "x") is None
