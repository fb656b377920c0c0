"""Model preparation: the embedded conversion, and clear failures for missing or gated models."""

import copy

import pytest
import torch

from bugscope.model.load import ModelManifest, ModelUnavailableError, prepare_model, resolve_hub_model
from tests.conftest import MODEL_CACHE, REPO, run_snakemake


def test_embedded_checkpoint_matches_the_config(embedded_manifest, embedded):
    assert embedded_manifest.source == "embedded"
    assert (embedded_manifest.num_layers, embedded_manifest.num_heads, embedded_manifest.head_dim) == (30, 9, 64)
    assert ModelManifest.load(MODEL_CACHE / "model.json") == embedded_manifest
    model, tok = embedded
    assert type(model).__name__ == "LlamaForCausalLM"
    assert next(model.parameters()).dtype == torch.float32
    assert tok.padding_side == "left"


def test_layer_count_mismatch_is_an_error(ci_config, tmp_path):
    cfg = copy.deepcopy(ci_config["model"])
    cfg["num_layers"] = 31
    with pytest.raises(ModelUnavailableError, match=r"model.num_layers=31.*has 30"):
        prepare_model(cfg, MODEL_CACHE / "checkpoint", tmp_path / "model.json")
    assert not (tmp_path / "model.json").exists()


def test_unreachable_hub_model_names_model_and_fixes(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError) as err:
        resolve_hub_model("meta-llama/Llama-3.1-8B-Instruct", None)
    msg = str(err.value)
    assert "meta-llama/Llama-3.1-8B-Instruct" in msg and "HF_TOKEN" in msg and "local folder" in msg


@pytest.mark.parametrize("error,expected", [("GatedRepoError", "is gated"), ("RepositoryNotFoundError", "was not found"),
                                            ("RevisionNotFoundError", "has no revision 'v9'")])
def test_gated_or_missing_hub_model(monkeypatch, error, expected):
    import huggingface_hub
    from huggingface_hub import utils

    def refuse(repo_id, revision=None, **kwargs):
        cls = getattr(utils, error)
        exc = cls.__new__(cls)  # the hub's errors want an HTTP response; only the type matters here
        Exception.__init__(exc, f"{repo_id}: {error}")
        raise exc

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(ModelUnavailableError, match=expected) as err:
        resolve_hub_model("meta-llama/Llama-3.1-8B-Instruct", "v9" if error == "RevisionNotFoundError" else None)
    fix = "model.revision" if error == "RevisionNotFoundError" else "HF_TOKEN"
    assert fix in str(err.value)


def test_gated_model_stops_the_workflow_before_any_work(tmp_path):
    proc = run_snakemake(tmp_path, configfile=REPO / "config" / "llama31_8b.yaml", check=False, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "bugscope: rule prepare_model failed" in out and "HF_TOKEN" in out
    assert not (tmp_path / "results" / "model" / "model.json").exists()
    assert not (tmp_path / "results" / "prompts").exists()
