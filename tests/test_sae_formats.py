"""Pretrained SAEs in the Gemma Scope, Qwen Scope and dictionary-learning formats, offline.

Each release goes through SAE-Lens's own conversion (its directory's `conversion_func`):

- Gemma Scope (`gemma-scope-2b-pt-res-canonical`, converter `gemma_2` =
  `gemma_2_sae_huggingface_loader`): `<folder>/params.npz` with W_enc [d_in, d_sae], W_dec [d_sae, d_in],
  b_enc, b_dec and a per-latent JumpReLU `threshold`; f = pre * (pre > threshold), pre = x W_enc + b_enc
  (b_dec is not subtracted); x_hat = f W_dec + b_dec. No normalisation (folded in before release).
- Qwen Scope (`qwen-scope-3-1.7b-base-w32k-l50`, converter `qwen_scope` =
  `qwen_scope_sae_huggingface_loader`): `layer<L>.sae.pt`, a torch dict with W_enc [d_sae, d_in],
  W_dec [d_in, d_sae], b_enc, b_dec; TopK with k from the repo name (`L0_50`): the k largest of
  pre = x W_enc^T + b_enc are kept (SAE-Lens also applies a ReLU to them; here they are all positive,
  so "exactly k features are non-zero", as the model card says).
- dictionary-learning (andyrdt's `llama-3.1-8b-instruct-andyrdt`, converter `dictionary_learning_1` =
  `dictionary_learning_sae_huggingface_loader_1`): `<folder>/config.json` (trainer: dict_class,
  activation_dim, dict_size, k, layer, lm_name) and `<folder>/ae.pt`, the state dict of a
  `BatchTopKSAE` (encoder.weight [d_sae, d_in], encoder.bias, decoder.weight [d_in, d_sae], b_dec,
  k and a scalar `threshold`). At inference dictionary_learning's BatchTopKSAE.encode is
  f = r * (r > threshold), r = relu((x - b_dec) W_enc^T + b_enc): a JumpReLU on input minus b_dec.

Each is written into a local Hugging Face cache (HF_HUB_OFFLINE, as tests/test_sae.py does for
Llama Scope) and loaded by the workflow's own script (workflow/scripts/load_pretrained_sae.py:
bugscope.sae.load_pretrained_sae, the fit check, save_sae) at small widths, then compared with a
reference computed here from the raw tensors. Gemma Scope's and Qwen Scope's converters take the
widths from the release's names (Gemma: the model in the repo id and `width_16k` in the folder;
Qwen: `Qwen3-1.7B-Base` and `W32K` in the repo id), not from the files: at the test widths the
directory's per-SAE `config_overrides`, which SAE-Lens applies over the converter's config, carry
d_in and d_sae (a monkeypatch of that lookup, nothing else). What the converters derive at the real
widths is checked on their config alone, without weights.
"""

from __future__ import annotations

import json
import runpy
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch

from bugscope.config import validate_config
from bugscope.io import vectors_to_arrow, write_parquet
from bugscope.model.cache import activation_schema
from bugscope.model.load import ModelManifest
from bugscope.model.sites import hook_name
from bugscope.sae import store
from bugscope.sae.directory import SAEConfigError, directory_hook_name, resolve_pretrained
from bugscope.sae.encode import encode_activation_file
from bugscope.sae.quality import sae_training_model
from bugscope.sae.store import load_sae, sae_provenance_meta
from tests.helpers import sparse_to_dense
from tests.numerics import rounding_tolerance

REPO = Path(__file__).resolve().parents[1]
COMMIT = "5" * 40  # the fake hub cache's refs/main
D_IN, D_SAE = 64, 256  # test widths
N_TOKENS = 300


@dataclass(frozen=True)
class Format:
    release: str
    template: str  # sae.sets[].sae_id
    layer: int
    conversion_func: str  # the directory's name for the converter
    loader: str  # the converter's function in sae_lens.loading.pretrained_sae_loaders
    architecture: str  # of the loaded SAE
    sae_model: str  # the model SAE-Lens's metadata says the SAE was trained on
    checkpoint: str  # a model under study this SAE set would be used with
    trained_on_it: bool  # the quality table's sae_trained_on_model for that model
    real_d_in: int
    real_d_sae: int
    overrides_widths: bool  # the converter takes the widths from the release's names, not the files

    @property
    def sae_id(self) -> str:
        return self.template.replace("{layer}", str(self.layer))


FORMATS = {
    "gemma_scope": Format("gemma-scope-2b-pt-res-canonical", "layer_{layer}/width_16k/canonical", 12, "gemma_2",
                          "gemma_2_sae_huggingface_loader", "jumprelu", "gemma-2-2b", "google/gemma-2-2b-it", False,
                          2304, 16384, True),
    "qwen_scope": Format("qwen-scope-3-1.7b-base-w32k-l50", "layer{layer}", 3, "qwen_scope",
                         "qwen_scope_sae_huggingface_loader", "topk", "Qwen/Qwen3-1.7B-Base", "Qwen/Qwen3-1.7B", False,
                         2048, 32768, True),
    "dictionary_learning": Format("llama-3.1-8b-instruct-andyrdt", "resid_post_layer_{layer}_trainer_1", 7,
                                  "dictionary_learning_1", "dictionary_learning_sae_huggingface_loader_1", "jumprelu",
                                  "Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B-Instruct", True, 4096, 131072,
                                  False),
}
QWEN_K = 50  # L0_50 in the Qwen Scope repo id
DL_K = 8  # dictionary-learning's trainer k (training only; inference uses the threshold)


# --- writing the three formats into a local hub cache ----------------------------------------------

def _snapshot(cache: Path, repo_id: str) -> Path:
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(COMMIT)
    return storage / "snapshots" / COMMIT


def _raw_weights(seed: int, d_in: int, d_sae: int) -> dict[str, torch.Tensor]:
    """Random float32 weights in SAE-Lens's orientation (W_enc [d_in, d_sae], W_dec [d_sae, d_in])."""
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5,
            "W_dec": torch.randn(d_sae, d_in, generator=g) / d_sae ** 0.5,
            "b_enc": torch.randn(d_sae, generator=g) * 0.1,
            "b_dec": torch.randn(d_in, generator=g) * 0.5,  # sizeable: a wrongly subtracted b_dec shows
            "threshold": 0.3 + 0.7 * torch.rand(d_sae, generator=g)}


def write_checkpoint(name: str, cache: Path, *, d_in: int = D_IN, d_sae: int = D_SAE, weights: bool = True) -> dict:
    """The SAE of FORMATS[name] in its release's own published form; returns the raw float32 tensors
    (SAE-Lens's orientation) the reference computes with."""
    from sae_lens.loading.pretrained_saes_directory import get_repo_id_and_folder_name

    fmt = FORMATS[name]
    repo_id, folder = get_repo_id_and_folder_name(fmt.release, fmt.sae_id)
    snapshot = _snapshot(cache, repo_id)
    raw = _raw_weights(fmt.layer, d_in, d_sae)
    if name == "gemma_scope":  # layer_12/width_16k/average_l0_<n>/params.npz, SAE-Lens's orientation
        (snapshot / folder).mkdir(parents=True)
        np.savez(snapshot / folder / "params.npz", **{k: v.numpy() for k, v in raw.items()})
    elif name == "qwen_scope":  # layer3.sae.pt at the repo root, encoder and decoder transposed
        snapshot.mkdir(parents=True)
        raw["b_enc"] += 2.0  # the k largest pre-activations are positive: exactly k latents fire
        del raw["threshold"]
        torch.save({"W_enc": raw["W_enc"].T.contiguous(), "W_dec": raw["W_dec"].T.contiguous(),
                    "b_enc": raw["b_enc"], "b_dec": raw["b_dec"]}, snapshot / folder)
    else:  # resid_post_layer_7/trainer_1/{config.json, ae.pt}: a dictionary_learning BatchTopKSAE
        (snapshot / folder).mkdir(parents=True)
        raw["threshold"] = torch.tensor(0.6)  # BatchTopK's one global inference threshold
        config = {"trainer": {"dict_class": "BatchTopKSAE", "trainer_class": "BatchTopKTrainer",
                              "activation_dim": d_in, "dict_size": d_sae, "k": DL_K, "layer": fmt.layer,
                              "lm_name": "meta-llama/Llama-3.1-8B-Instruct", "submodule_name": f"resid_post_layer_{fmt.layer}"},
                  "buffer": {"d_submodule": d_in, "ctx_len": 1024, "out_batch_size": 4096}}
        (snapshot / folder / "config.json").write_text(json.dumps(config))
        if weights:
            torch.save({"k": torch.tensor(DL_K), "threshold": raw["threshold"],
                        "encoder.weight": raw["W_enc"].T.contiguous(), "encoder.bias": raw["b_enc"],
                        "decoder.weight": raw["W_dec"].T.contiguous(), "b_dec": raw["b_dec"]},
                       snapshot / folder / "ae.pt")
    return raw


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hub"


def _test_widths(monkeypatch, name: str) -> None:
    """Gemma Scope and Qwen Scope: d_in and d_sae through the directory's config_overrides (see the docstring)."""
    if not FORMATS[name].overrides_widths:
        return
    import sae_lens.saes.sae as sae_module

    real = sae_module.get_config_overrides
    monkeypatch.setattr(sae_module, "get_config_overrides",
                        lambda release, sae_id: {**real(release, sae_id), "d_in": D_IN, "d_sae": D_SAE})


# --- the hand-written references ------------------------------------------------------------------

def reference_pre(name: str, raw: dict, x: torch.Tensor) -> torch.Tensor:
    """The pre-activation [n, d_sae] in float64, as the format defines it."""
    x, w, b = x.double(), raw["W_enc"].double(), raw["b_enc"].double()
    if name == "dictionary_learning":
        x = x - raw["b_dec"].double()
    return x @ w + b


def reference_acts(name: str, raw: dict, pre: torch.Tensor) -> torch.Tensor:
    if name == "qwen_scope":
        top = pre.topk(QWEN_K, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    if name == "dictionary_learning":
        r = pre.relu()
        return r * (r > raw["threshold"].double())
    return pre * (pre > raw["threshold"].double())  # Gemma Scope's JumpReLU, per-latent threshold


def ambiguous(name: str, raw: dict, pre: torch.Tensor, tol: float) -> torch.Tensor:
    """[n, d_sae] entries whose firing another summation order may flip: within `tol` of the
    threshold (JumpReLU) or in a row whose k-th and (k+1)-th pre-activations are within 2 tol (TopK)."""
    if name == "qwen_scope":
        top = pre.topk(QWEN_K + 1, dim=-1).values
        return ((top[:, -2] - top[:, -1]) <= 2 * tol)[:, None].expand_as(pre)
    return (pre - raw["threshold"].double()).abs() <= tol


def _activation_file(path: Path, x: torch.Tensor) -> None:
    n, d = x.shape
    schema = activation_schema(d, "float32", {})
    table = pa.Table.from_arrays([pa.array(np.arange(n) // 10, pa.int32()), pa.array(np.arange(n) % 10, pa.int32()),
                                  vectors_to_arrow(x, "float32")], schema=schema)
    write_parquet(table, path, {"kind": "activations", "dtype": "float32"})


def _run_load_script(tmp_path: Path, fmt: Format, *, d_model: int, set_name: str = "pretrained") -> Path:
    """workflow/scripts/load_pretrained_sae.py for one layer of a set of `fmt`'s release, in-process."""
    config = validate_config({
        "model": {"name": fmt.checkpoint.rsplit("/", 1)[-1], "checkpoint": fmt.checkpoint,
                  "num_layers": 32, "num_heads": 8},
        "sae": {"sets": [{"name": set_name, "source": "pretrained", "release": fmt.release, "sae_id": fmt.template,
                          "site": "resid_post", "layers": [fmt.layer]}]},
    })
    manifest = tmp_path / "model.json"
    ModelManifest(name=config["model"]["name"], source="local", path=str(tmp_path / "weights"), revision=None,
                  dtype="float32", num_layers=32, num_heads=8, num_kv_heads=8, head_dim=8, d_model=d_model,
                  vocab_size=100).save(manifest)
    ids = resolve_pretrained(fmt.release, fmt.template, [fmt.layer], "resid_post")
    out = tmp_path / "sae" / set_name / hook_name(fmt.layer)
    smk = SimpleNamespace(config=config, rule="load_pretrained_sae_test", threads=1, log=[str(tmp_path / "load.log")],
                          input=SimpleNamespace(manifest=str(manifest)), output=SimpleNamespace(saes=[str(out)]),
                          params=SimpleNamespace(sae_set=set_name, layers=[fmt.layer], sae_ids=[ids[fmt.layer]],
                                                 config_hash="test"))
    try:
        runpy.run_path(str(REPO / "workflow" / "scripts" / "load_pretrained_sae.py"), init_globals={"snakemake": smk})
    except SystemExit as exc:  # the script's one-paragraph error is in its log
        raise AssertionError((tmp_path / "load.log").read_text()[-3000:]) from exc
    return out


# --- the tests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(FORMATS))
def test_each_release_goes_through_its_own_converter(name):
    from sae_lens.loading.pretrained_sae_loaders import NAMED_PRETRAINED_SAE_LOADERS, get_conversion_loader_name

    fmt = FORMATS[name]
    assert get_conversion_loader_name(fmt.release) == fmt.conversion_func
    assert NAMED_PRETRAINED_SAE_LOADERS[fmt.conversion_func].__name__ == fmt.loader
    # the config's id template resolves against SAE-Lens's directory, and its site is the residual stream
    assert resolve_pretrained(fmt.release, fmt.template, [fmt.layer], "resid_post") == {fmt.layer: fmt.sae_id}
    expected = None if name == "qwen_scope" else hook_name(fmt.layer)  # Qwen Scope's entries do not name the site
    assert directory_hook_name(fmt.release, fmt.sae_id) == expected
    if expected:
        with pytest.raises(SAEConfigError, match="do not read the set's site 'mlp_out'"):
            resolve_pretrained(fmt.release, fmt.template, [fmt.layer], "mlp_out")


@pytest.mark.parametrize("name", list(FORMATS))
def test_converter_config_at_the_real_widths(name, offline_hub):
    """What SAE-Lens's converter derives for the real release (no weights are read): the widths,
    the hook, the architecture and the model the SAE was trained on."""
    from sae_lens.loading.pretrained_sae_loaders import load_sae_config_from_huggingface

    fmt = FORMATS[name]
    if name == "dictionary_learning":  # the only one of the three that reads a file for its config
        write_checkpoint(name, offline_hub, d_in=fmt.real_d_in, d_sae=fmt.real_d_sae, weights=False)
    cfg = load_sae_config_from_huggingface(fmt.release, fmt.sae_id)
    assert (cfg["d_in"], cfg["d_sae"]) == (fmt.real_d_in, fmt.real_d_sae)
    meta = cfg.get("metadata", cfg)
    assert (meta["hook_name"], meta["model_name"]) == (hook_name(fmt.layer), fmt.sae_model)
    assert cfg["architecture"] == fmt.architecture
    if name == "qwen_scope":
        assert cfg["k"] == QWEN_K if "k" in cfg else cfg["activation_fn_kwargs"]["k"] == QWEN_K
    assert cfg.get("normalize_activations") in (None, "none")  # nothing to fold: the files take raw activations


@pytest.mark.numerical
@pytest.mark.parametrize("name", list(FORMATS))
def test_format_loads_through_the_workflow_and_encodes_as_its_definition(name, offline_hub, tmp_path, monkeypatch):
    fmt = FORMATS[name]
    _test_widths(monkeypatch, name)
    raw = write_checkpoint(name, offline_hub)
    out = _run_load_script(tmp_path, fmt, d_model=D_IN)
    sae, prov = load_sae(out)
    # provenance: the hub source, the site and the model the quality table compares with
    assert prov["sae_repo_id"] and (prov["sae_revision"], prov["release"], prov["sae_id"]) == (COMMIT, fmt.release, fmt.sae_id)
    assert (prov["hook_name"], prov["layer"], prov["d_in"], prov["d_sae"]) == (hook_name(fmt.layer), fmt.layer, D_IN, D_SAE)
    assert sae.cfg.metadata.hook_name == hook_name(fmt.layer)
    assert (prov["architecture"], sae.cfg.architecture()) == (fmt.architecture, fmt.architecture)
    assert prov["sae_model_name"] == fmt.sae_model
    assert sae_training_model(prov, fmt.checkpoint) == (fmt.sae_model, fmt.trained_on_it)
    assert sae_provenance_meta(prov)["sae"]["sae_revision"] == COMMIT
    if name == "qwen_scope":
        assert sae.cfg.k == QWEN_K

    g = torch.Generator().manual_seed(1)
    x = torch.randn(N_TOKENS, D_IN, generator=g) * 1.5
    pre = reference_pre(name, raw, x)
    expected = reference_acts(name, raw, pre)
    # the terms of each pre-activation bound its rounding: |x| |W_enc| + |b_enc| (+ |b_dec| |W_enc|)
    terms = (x.abs().double() + raw["b_dec"].abs().double() * (name == "dictionary_learning")) @ raw["W_enc"].abs().double()
    enc_tol = rounding_tolerance(torch.float32, scale=float((terms + raw["b_enc"].abs().double()).max()), reduction=D_IN)
    unsure = ambiguous(name, raw, pre, enc_tol)
    assert unsure.double().mean() < 0.05  # the comparison below covers nearly every entry (TopK: row)
    with torch.no_grad():
        got = sae.encode(x).double()
    assert ((got - expected).abs() * ~unsure).max() <= enc_tol
    # an entry near the threshold is either off or its pre-activation
    assert (torch.minimum(got.abs(), (got - pre).abs()) * unsure).max() <= enc_tol
    fired = (expected > 0).sum(-1).double()
    assert fired.min() > 0 and fired.mean() < D_SAE / 2  # sparse but not dead: the reference is not vacuous
    if name == "qwen_scope":
        assert ((got > 0).sum(-1) == QWEN_K).all()
    # decoding: x_hat = f W_dec + b_dec, from the reference activations
    with torch.no_grad():
        recon = sae.decode(expected.float()).double()
    ref_recon = expected @ raw["W_dec"].double() + raw["b_dec"].double()
    dec_terms = expected.abs() @ raw["W_dec"].abs().double() + raw["b_dec"].abs().double()
    dec_tol = rounding_tolerance(torch.float32, scale=float(dec_terms.max()), reduction=D_SAE, depth=2)
    assert (recon - ref_recon).abs().max() <= dec_tol
    # the feature table encode_features writes from a cached activation file
    acts_path = tmp_path / "acts.parquet"
    _activation_file(acts_path, x)
    table = encode_activation_file(sae, acts_path)
    assert table.num_rows == int((got != 0).sum())  # one row per non-zero of sae.encode
    dense = sparse_to_dense(table, [(i // 10, i % 10) for i in range(N_TOKENS)], D_SAE).double()
    assert ((dense - expected).abs() * ~unsure).max() <= enc_tol


def test_a_format_for_another_width_is_refused_by_the_fit_check(offline_hub, tmp_path, monkeypatch):
    """An andyrdt SAE (d_in 64 here) on a model of another width fails the workflow's fit check."""
    write_checkpoint("dictionary_learning", offline_hub)
    with pytest.raises(AssertionError, match=r"d_in=64 but the model's residual width is d_model=96"):
        _run_load_script(tmp_path, FORMATS["dictionary_learning"], d_model=96)


@pytest.mark.numerical
def test_gemma_scope_scaling_factor_of_ones_is_dropped_and_another_refused(offline_hub, monkeypatch):
    """Gemma Scope's converter accepts a `scaling_factor` in params.npz only when it is all ones (it is
    dropped: the SAE is the same); any other factor is refused rather than silently ignored."""
    from sae_lens.loading.pretrained_saes_directory import get_repo_id_and_folder_name

    fmt = FORMATS["gemma_scope"]
    _test_widths(monkeypatch, "gemma_scope")
    raw = write_checkpoint("gemma_scope", offline_hub)
    _, folder = get_repo_id_and_folder_name(fmt.release, fmt.sae_id)
    path = next(offline_hub.glob(f"models--*/snapshots/{COMMIT}/{folder}/params.npz"))
    plain, _ = store.load_pretrained_sae(fmt.release, fmt.sae_id)
    np.savez(path, **{k: v.numpy() for k, v in raw.items()}, scaling_factor=np.ones(D_SAE, np.float32))
    ones, _ = store.load_pretrained_sae(fmt.release, fmt.sae_id)
    assert {k: v.shape for k, v in ones.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    assert all(torch.equal(ones.state_dict()[k], v) for k, v in plain.state_dict().items())
    np.savez(path, **{k: v.numpy() for k, v in raw.items()}, scaling_factor=np.full(D_SAE, 2.0, np.float32))
    with pytest.raises(ValueError, match="Scaling factor is present"):
        store.load_pretrained_sae(fmt.release, fmt.sae_id)
