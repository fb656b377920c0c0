"""SAE stage (bugscope.sae, bugscope.data.corpus, workflow/scripts/*sae*): real model, real corpus, real Parquet.

The module fixture caches layer 10 of SmolLM2 for a slice of the Lee corpus and the CI prompts
with the same `cache_activations` code the workflow uses, and trains a small TopK SAE on it with
SAE-Lens. The pretrained path is tested offline on an SAE written in Llama Scope's own checkpoint
form into a local Hugging Face cache, loaded through `load_pretrained_sae` (what
`sae.source: pretrained` runs).
"""

from __future__ import annotations

import json
import runpy
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from bugscope import tables
from bugscope.data.baseline import score_prompts
from bugscope.data.corpus import SOURCES, build_corpus_table, cache_rows, heldout_pair_ids
from bugscope.io import arrow_to_vectors, read_metadata, vectors_to_arrow
from bugscope.model.cache import NonFiniteActivationError, activation_schema, cache_activations, positions_for
from bugscope.model.forward import decision_logits, logit_diff, make_batch
from bugscope.model.sites import output_tensor, site_module
from bugscope.sae import store, train
from bugscope.sae.activations import ActivationSource, ActivationStream, iter_activations
from bugscope.sae.directory import SAEConfigError, directory_hook_name, resolve_pretrained
from bugscope.sae.encode import FEATURE_SCHEMA, encode_activation_file
from bugscope.sae.quality import ReconstructionStats, spliced_logit_diffs
from bugscope.sae.store import PROVENANCE_FILE, check_sae_fits, load_sae, sae_provenance_meta, save_sae
from bugscope.sae.train import LayerTraining, train_topk_sae
from tests.helpers import sparse_to_dense
from tests.numerics import forward_tolerance, max_abs, rounding_tolerance

REPO = Path(__file__).resolve().parents[1]
LAYER = 10
HOOK = f"blocks.{LAYER}.hook_resid_post"
SAE_CFG = {"expansion": 1, "k": 8, "training_tokens": 1024, "batch_size": 64, "lr": 0.002}
CORPUS_CFG = {"train_tokens": 700, "heldout_tokens": 200, "seq_len": 64, "include_prompts": True,
              "dtype": "float16"}


# The stage whose config hash each activation file carries (as cache_residuals and cache_corpus write them).
STAGE_OF = {"prompts": "activations", "corpus": "sae"}


@pytest.fixture(scope="module")
def layer_data(tmp_path_factory, embedded, ci_config):
    from bugscope.config import stage_hash
    from bugscope.data.prompts import build_prompt_table

    model, tokenizer = embedded
    root = tmp_path_factory.mktemp("sae")
    prompts = build_prompt_table(ci_config, tokenizer)
    corpus, corpus_meta = build_corpus_table(CORPUS_CFG, prompts, tokenizer, seed=0, include_train=True)
    prompt_rows = [{**r, "positions": positions_for(r, "aligned")} for r in prompts.to_pylist()]
    paths = {"prompts": root / "prompts.parquet", "corpus": root / "corpus.parquet"}
    for name, rows, dtype in (("prompts", prompt_rows, "float32"), ("corpus", cache_rows(corpus), "float16")):
        cache_activations(model, rows, hooks=[HOOK], dtype=dtype, out_paths={HOOK: paths[name]},
                          meta={"dataset": name, "config_hash": stage_hash(ci_config, STAGE_OF[name])},
                          batch_size=16, pad_token_id=tokenizer.pad_token_id)
    train_ids = frozenset(pc.filter(corpus.column("prompt_id"), pc.equal(corpus.column("split"), "train")).to_pylist())
    stream = ActivationStream([ActivationSource(str(paths["corpus"]), prompt_ids=train_ids)],
                                   batch_size=SAE_CFG["batch_size"], seed=1, buffer_rows=256)
    result = train_topk_sae(stream, d_in=576, layer=LAYER, hook=HOOK, sae_cfg=SAE_CFG, seed=1)
    sae_dir = root / "sae" / HOOK
    save_sae(result.sae, sae_dir, {"source": "train", "hook_name": HOOK, "seed": 1, "d_sae": 576,
                                        "training": {"train_l0": result.train_l0}})
    return SimpleNamespace(root=root, prompts=prompts, corpus=corpus, corpus_meta=corpus_meta, paths=paths,
                           result=result, sae_dir=sae_dir, train_ids=train_ids)


def _read_acts(path):
    keys, xs = [], []
    for ids, pos, x in iter_activations([ActivationSource(str(path), drop_positions=frozenset())]):
        keys += list(zip(ids.tolist(), pos.tolist()))
        xs.append(x)
    return keys, torch.cat(xs)


# --- corpus -----------------------------------------------------------------------------------

def test_corpus_is_deterministic_pinned_and_holds_out_pairs(layer_data, embedded):
    _, tokenizer = embedded
    again, meta = build_corpus_table(CORPUS_CFG, layer_data.prompts, tokenizer, seed=0, include_train=True)
    assert again.equals(layer_data.corpus)
    assert meta["corpus"]["files"]["lee_background"]["sha256"] == SOURCES[0].sha256
    # The pairs held out of training are those the selection-aware claims are measured on: the odd ids.
    pair_ids = set(layer_data.prompts.column("pair_id").to_pylist())
    held = set(meta["heldout_pair_ids"])
    assert held == {p for p in pair_ids if p % 2 == 1} and held and held != pair_ids
    assert held == set(heldout_pair_ids(layer_data.prompts.column("pair_id").to_pylist()))
    # Every prompt of a selection pair is in the training text, none of a held-out pair; the held-out
    # split is only the other file.
    pair_of = dict(zip(layer_data.prompts.column("prompt_id").to_pylist(), layer_data.prompts.column("pair_id").to_pylist()))
    rows = layer_data.corpus.to_pylist()
    trained = {r["doc_index"] for r in rows if r["source"] == "prompts"}
    assert trained == {pid for pid, pair in pair_of.items() if pair % 2 == 0}
    assert {r["source"] for r in rows if r["split"] == "heldout"} == {"lee_test"}
    assert sum(r["n_tokens"] for r in rows if r["source"] == "lee_background") == 700
    assert "The" in rows[0]["text"] or rows[0]["text"].strip()  # real text, decoded


def test_corpus_cache_leaves_out_the_attention_sink(layer_data):
    pos = pq.read_table(layer_data.paths["corpus"], columns=["position"]).column("position").to_numpy()
    assert pos.min() == 1
    meta = read_metadata(layer_data.paths["corpus"])
    assert meta["hook_name"] == HOOK and meta["dtype"] == "float16"


def test_stream_batches_are_seeded_and_filtered(layer_data):
    src = ActivationSource(str(layer_data.paths["corpus"]), prompt_ids=layer_data.train_ids)
    a = ActivationStream([src], batch_size=32, seed=5, buffer_rows=128)
    b = ActivationStream([src], batch_size=32, seed=5, buffer_rows=128)
    batches = [next(a) for _ in range(6)]
    assert all(x.shape == (32, 576) for x in batches)
    assert all(torch.equal(x, next(b)) for x in batches)
    n_train = sum(x.shape[0] for _, _, x in iter_activations([src]))
    n_all = pq.ParquetFile(layer_data.paths["corpus"]).metadata.num_rows
    assert 0 < n_train < n_all  # held-out text and held-out pairs are filtered out


# --- training, saving, loading -----------------------------------------------------------------

@pytest.mark.numerical
def test_trained_sae_reloads_with_load_from_disk(layer_data):
    from sae_lens import SAE

    loaded = SAE.load_from_disk(layer_data.sae_dir)
    assert loaded.cfg.architecture() == "topk" and loaded.cfg.metadata.hook_name == HOOK
    assert loaded.cfg.d_in == 576 and loaded.cfg.d_sae == 576 and loaded.cfg.normalize_activations == "none"
    _, x = _read_acts(layer_data.paths["prompts"])
    trained = layer_data.result.sae.eval()
    with torch.no_grad():
        expected = trained.encode(x)
        tol = rounding_tolerance(torch.float32, scale=max_abs(expected), reduction=x.shape[1])
        assert (loaded.encode(x) - expected).abs().max() <= tol
    provenance = json.loads((layer_data.sae_dir / PROVENANCE_FILE).read_text())
    assert provenance["seed"] == 1 and provenance["hook_name"] == HOOK
    assert layer_data.result.train_l0 == pytest.approx(SAE_CFG["k"])


def test_training_is_deterministic(layer_data):
    src = ActivationSource(str(layer_data.paths["corpus"]), prompt_ids=layer_data.train_ids)
    cfg = {**SAE_CFG, "training_tokens": 256}
    w = [train_topk_sae(ActivationStream([src], batch_size=64, seed=3, buffer_rows=256), d_in=576,
                             layer=LAYER, hook=HOOK, sae_cfg=cfg, seed=3).sae.W_enc.detach().clone() for _ in range(2)]
    assert torch.equal(w[0], w[1])


def test_layers_trained_side_by_side_equal_one_after_another(layer_data):
    """train_layers' worker processes give every SAE the same bits as training the layers one after
    another in this process, in job order, and the caller hears of each layer once."""
    src = ActivationSource(str(layer_data.paths["corpus"]), prompt_ids=layer_data.train_ids)
    cfg = {**SAE_CFG, "training_tokens": 256}
    jobs = [LayerTraining(LAYER, HOOK, src, seed) for seed in (3, 4, 5)]
    threads = torch.get_num_threads()
    heard = []
    serial = train.train_layers(jobs, d_in=576, sae_cfg=cfg, workers=1)
    assert torch.get_num_threads() == threads  # the one thread per layer is given back
    parallel = train.train_layers(jobs, d_in=576, sae_cfg=cfg, workers=2, on_done=lambda job, r: heard.append(job.seed))
    assert sorted(heard) == [3, 4, 5]
    assert [r.seed for r in parallel] == [3, 4, 5]
    for a, b in zip(serial, parallel):
        assert type(a.sae) is type(b.sae) and a.sae.cfg.to_dict() == b.sae.cfg.to_dict()
        for name, value in a.sae.state_dict().items():
            assert torch.equal(value, b.sae.state_dict()[name]), name
        assert (a.n_steps, a.train_l0, a.train_dead_fraction, a.extra) == (b.n_steps, b.train_l0, b.train_dead_fraction,
                                                                           b.extra)
    # Different seeds train different SAEs: the comparison above could fail.
    assert not torch.equal(serial[0].sae.W_enc, serial[1].sae.W_enc)


# --- encoding ----------------------------------------------------------------------------------

def test_features_equal_sae_encode_and_round_trip_to_dense(layer_data):
    sae, _ = load_sae(layer_data.sae_dir)
    table = encode_activation_file(sae, layer_data.paths["prompts"], batch_size=37)
    assert table.schema.equals(FEATURE_SCHEMA)
    assert pc.min(table.column("activation")).as_py() != 0  # a row only for a non-zero feature
    keys, x = _read_acts(layer_data.paths["prompts"])
    with torch.no_grad():
        expected = sae.encode(x)
    dense = sparse_to_dense(table, keys, sae.cfg.d_sae)
    # Batches of 37 rows against one batch of all: another matmul blocking, so the values agree to
    # rounding (exactly on some CPUs, not on AVX2-only ones), and TopK may swap a near-tie at its
    # threshold: a feature kept on one side only is within rounding of the other side's smallest kept value.
    tol = rounding_tolerance(torch.float32, scale=max_abs(expected), reduction=sae.cfg.d_in)
    both = (dense != 0) & (expected != 0)
    assert max_abs(dense[both] - expected[both]) <= tol
    for row in ((dense != 0) ^ (expected != 0)).any(-1).nonzero().flatten().tolist():
        for mine, other in ((dense[row], expected[row]), (expected[row], dense[row])):
            lone = mine[(mine != 0) & (other == 0)]
            if len(lone):
                assert max_abs(lone - other[other != 0].min()) <= tol
    assert table.num_rows == int((dense != 0).sum())


def test_encoding_refuses_nan_activations(tmp_path, layer_data):
    sae, _ = load_sae(layer_data.sae_dir)
    bad = torch.randn(4, 576)
    bad[2, 7] = float("nan")
    path = tmp_path / "bad.parquet"
    schema = activation_schema(576, "float32", {"kind": "activations", "dtype": "float32", "d_model": 576})
    pq.write_table(pa.Table.from_arrays([pa.array([0, 0, 1, 1], pa.int32()), pa.array([1, 2, 1, 2], pa.int32()),
                                         vectors_to_arrow(bad, "float32")], schema=schema), path)
    with pytest.raises(NonFiniteActivationError, match=r"NaN or Inf.*prompt ids \[1\]"):
        encode_activation_file(sae, path)


# --- quality -------------------------------------------------------------------------------------

def _jumprelu(w_enc, b_enc, w_dec, b_dec, threshold, hook=HOOK):
    from sae_lens import SAE

    d_in, d_sae = w_enc.shape
    sae = SAE.from_dict({"architecture": "jumprelu", "d_in": d_in, "d_sae": d_sae, "dtype": "float32",
                         "device": "cpu", "apply_b_dec_to_input": False, "normalize_activations": "none",
                         "metadata": {"hook_name": hook}})
    sd = {"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec, "threshold": torch.full((d_sae,), threshold)}
    sae.load_state_dict(sd)
    return sae.eval()


@pytest.mark.numerical
def test_quality_metrics_on_known_cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g) * torch.arange(1, 7) + 0.5
    eye = torch.eye(6)
    # [I, -I] encoder, [I; -I] decoder, threshold 0: an exact reconstruction, L0 = non-zero coordinates.
    exact = _jumprelu(torch.cat([eye, -eye], 1), torch.zeros(12), torch.cat([eye, -eye], 0), torch.zeros(6), 0.0)
    stats = ReconstructionStats(6, 12)
    for chunk in x.split(128):
        stats.update(exact, chunk)
    r = stats.result()
    # x_hat = relu(x) - relu(-x) is x exactly; only float64 accumulation rounds.
    exact_tol = rounding_tolerance(torch.float64, scale=1.0, reduction=x.numel())
    assert r["ev"] == pytest.approx(1.0, abs=exact_tol) and r["mse"] == pytest.approx(0.0, abs=exact_tol)
    assert r["l0"] == pytest.approx(6.0) and r["n_tokens"] == 500 and stats.fired.all()
    # Encoder off, b_dec = the mean: EV 0, MSE = mean per-dimension variance, L0 0, every feature dead.
    mean = ReconstructionStats(6, 12)
    mean_sae = _jumprelu(torch.zeros(6, 12), torch.zeros(12), torch.zeros(12, 6), x.mean(0), 0.0)
    mean.update(mean_sae, x)
    r = mean.result()
    # b_dec is the float32 mean; the stats accumulate in float64: float32 rounding over 500 rows.
    mean_tol = rounding_tolerance(torch.float32, scale=1.0, reduction=x.shape[0])
    assert r["ev"] == pytest.approx(0.0, abs=mean_tol)
    assert r["mse"] == pytest.approx(x.var(0, unbiased=False).mean().item(), rel=mean_tol)
    assert r["l0"] == 0 and not mean.fired.any()


@pytest.mark.numerical
def test_spliced_exact_reconstruction_leaves_logit_diff_unchanged(embedded, layer_data):
    model, tokenizer = embedded
    eye = torch.eye(576)
    exact = _jumprelu(torch.cat([eye, -eye], 1), torch.zeros(1152), torch.cat([eye, -eye], 0), torch.zeros(576), 0.0)
    rows = layer_data.prompts.to_pylist()[:2]
    clean = torch.from_numpy(score_prompts(model, rows, batch_size=2, pad_token_id=tokenizer.pad_token_id)
                             ["logit_diff"].to_numpy()).float()
    zero = _jumprelu(torch.zeros(576, 4), torch.zeros(4), torch.zeros(4, 576), torch.zeros(576), 0.0)
    # One call splices each layer's SAE separately, from the same unspliced prefix.
    _, spliced = spliced_logit_diffs(model, {0: exact, LAYER: exact, LAYER + 1: zero}, rows, site="resid_post",
                                          batch_size=2, pad_token_id=tokenizer.pad_token_id)
    batch = make_batch(rows, tokenizer.pad_token_id, "cpu")
    tol = forward_tolerance(model, scale=max_abs(decision_logits(model, batch)))
    assert (clean - spliced[0]).abs().max() <= tol
    assert (clean - spliced[LAYER]).abs().max() <= tol
    assert (clean - spliced[LAYER + 1]).abs().max() > 10 * tol  # the splice really replaces the activation
    # ... and replaces that layer's output: a plain forward with a hook on the decoder layer agrees
    # (on the prompts in the splice's order: by length, as bugscope.model.forward.iter_batches takes them).
    batch = make_batch(sorted(rows, key=lambda r: len(r["input_ids"])), tokenizer.pad_token_id, "cpu")
    mask = (batch.attention_mask == 1) & (batch.position_ids > 0)

    def splice(_module, _inputs, output):
        hidden = output_tensor(output).clone()
        hidden[mask] = zero.decode(zero.encode(hidden[mask]))
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = site_module(model, LAYER + 1, "resid_post").register_forward_hook(splice)
    try:
        hooked = logit_diff(decision_logits(model, batch), batch)
    finally:
        handle.remove()
    assert (hooked - spliced[LAYER + 1]).abs().max() <= tol


# --- the pretrained path, offline ----------------------------------------------------------------

def test_directory_has_every_llama_scope_template():
    for site, letter in (("resid_post", "r"), ("mlp_out", "m"), ("attn_out", "a")):
        for width in ("8x", "32x"):
            ids = resolve_pretrained(f"llama_scope_lx{letter}_{width}", f"l{{layer}}{letter}_{width}", range(32), site)
            assert ids == {layer: f"l{layer}{letter}_{width}" for layer in range(32)}
            assert directory_hook_name(f"llama_scope_lx{letter}_{width}", f"l31{letter}_{width}") == f"blocks.31.hook_{site}"


def test_directory_reads_as_sae_lens_reads_it():
    """bugscope.sae.directory reads pretrained_saes.yaml one release at a time, without importing
    SAE-Lens (the workflow checks pretrained sets while it parses): on every release it must find
    what SAE-Lens's own reader finds, each release's text alone (the fast path) included."""
    import yaml
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    from bugscope.sae import directory as sae_directory

    theirs = get_pretrained_saes_directory()
    assert sae_directory.pretrained_releases() == list(theirs)
    for release, block in sae_directory._release_blocks().items():
        assert list(yaml.load(block, Loader=sae_directory._LOADER)) == [release]
        assert list(sae_directory.release_saes(release).items()) == list(theirs[release].neuronpedia_id.items())


@pytest.mark.parametrize("release, sae_id, site, match", [
    ("llama_scope_lxr_9x", "l{layer}r_8x", "resid_post", r"not in SAE-Lens's directory.*llama_scope_lxr_8x"),
    ("llama_scope_lxr_8x", "l{layer}m_8x", "resid_post", r"does not have.*l0r_8x, l1r_8x"),
    ("llama_scope_lxr_8x", "l10r_8x", "resid_post", r"template containing \{layer\}"),
    ("llama_scope_lxm_8x", "l{layer}m_8x", "resid_post", r"do not read the set's site 'resid_post'.*blocks.3.hook_mlp_out"),
])
def test_bad_pretrained_config_fails_before_download(release, sae_id, site, match):
    with pytest.raises(SAEConfigError, match=match):
        resolve_pretrained(release, sae_id, [3, 10], site)


def _write_llama_scope_checkpoint(cache: Path, layer: int, d_in: int, d_sae: int, site_letter: str = "R"):
    """An SAE in Llama Scope's own published form, in a local Hugging Face cache, as from_pretrained finds it."""
    from sae_lens.loading.pretrained_saes_directory import get_norm_scaling_factor
    from safetensors.torch import save_file

    release = f"llama_scope_lx{site_letter.lower()}_8x"
    sae_id = f"l{layer}{site_letter.lower()}_8x"
    factor = get_norm_scaling_factor(release, sae_id)
    repo = f"fnlp/Llama3_1-8B-Base-LX{site_letter}-8x"
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    folder = snapshot / f"Llama3_1-8B-Base-L{layer}{site_letter}-8x"
    (folder / "checkpoints").mkdir(parents=True)
    (cache / f"models--{repo.replace('/', '--')}" / "refs").mkdir(parents=True)
    (cache / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text("0" * 40)
    site = {"R": "resid_post", "M": "mlp_out", "A": "attn_out"}[site_letter]
    hyper = {"d_model": d_in, "d_sae": d_sae, "hook_point_in": f"blocks.{layer}.hook_{site}",
             "hook_point_out": f"blocks.{layer}.hook_{site}", "jump_relu_threshold": 0.3, "top_k": 50,
             "dataset_average_activation_norm": {"in": d_in ** 0.5 / factor, "out": d_in ** 0.5 / factor}}
    (folder / "hyperparams.json").write_text(json.dumps(hyper))
    g = torch.Generator().manual_seed(layer)
    raw = {"encoder.weight": torch.randn(d_sae, d_in, generator=g) / d_in ** 0.5,
           "decoder.weight": torch.randn(d_in, d_sae, generator=g) / d_sae ** 0.5,
           "encoder.bias": torch.randn(d_sae, generator=g) * 0.1, "decoder.bias": torch.randn(d_in, generator=g) * 0.1}
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in raw.items()}, folder / "checkpoints" / "final.safetensors")
    return release, sae_id, factor, {k: v.to(torch.bfloat16).float() for k, v in raw.items()}, hyper


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


@pytest.mark.numerical
def test_pretrained_llama_scope_form_loads_offline(offline_hub, layer_data):
    release, sae_id, factor, raw, hyper = _write_llama_scope_checkpoint(offline_hub, LAYER, 576, 1024)
    assert resolve_pretrained(release, "l{layer}r_8x", [LAYER], "resid_post") == {LAYER: sae_id}
    sae, hub = store.load_pretrained_sae(release, sae_id, dtype="float32")
    # The repo SAE-Lens's directory maps the release to, and the commit the cache resolved main to.
    assert hub == {"sae_repo_id": "fnlp/Llama3_1-8B-Base-LXR-8x", "sae_folder": "Llama3_1-8B-Base-L10R-8x",
                   "sae_revision": "0" * 40}
    assert sae.cfg.architecture() == "jumprelu" and sae.cfg.normalize_activations == "none"  # folded
    assert torch.unique(sae.threshold).numel() == 1  # one scalar threshold
    check_sae_fits(sae, expected_hook=HOOK, d_model=576, where="test")
    # SAE-Lens's Llama Scope conversion: input scale folded into W_enc (and W_dec, b_dec), threshold scaled.
    _, x = _read_acts(layer_data.paths["prompts"])
    pre = (x * factor) @ raw["encoder.weight"].T + raw["encoder.bias"]
    expected = torch.relu(pre) * (pre > hyper["jump_relu_threshold"] * factor)
    # Folding the input scale into the weights changes only the order of float32 roundings.
    enc_tol = rounding_tolerance(torch.float32, scale=max_abs(pre), reduction=x.shape[1])
    with torch.no_grad():
        assert (sae.encode(x) - expected).abs().max() <= enc_tol
        recon = (expected @ raw["decoder.weight"].T + raw["decoder.bias"]) / factor
        dec_tol = rounding_tolerance(torch.float32, scale=max_abs(recon), reduction=expected.shape[1], depth=2)
        assert (sae.decode(sae.encode(x)) - recon).abs().max() <= dec_tol
    # Saved and reloaded like a trained SAE, it encodes the same (what encode_features does).
    save_sae(sae, layer_data.root / "pre", {"source": "pretrained", "release": release, "sae_id": sae_id, **hub})
    again, prov = load_sae(layer_data.root / "pre")
    table = encode_activation_file(again, layer_data.paths["prompts"])
    keys, _ = _read_acts(layer_data.paths["prompts"])
    assert (sparse_to_dense(table, keys, 1024) - expected).abs().max() <= enc_tol
    assert prov["release"] == release
    assert (prov["sae_repo_id"], prov["sae_revision"]) == ("fnlp/Llama3_1-8B-Base-LXR-8x", "0" * 40)
    assert sae_provenance_meta(prov)["sae"]["sae_revision"] == "0" * 40  # copied into feature tables


def test_pretrained_d_in_and_site_mismatch_are_refused(offline_hub):
    release, sae_id, *_ = _write_llama_scope_checkpoint(offline_hub, 3, 64, 128)
    sae, _ = store.load_pretrained_sae(release, sae_id)
    with pytest.raises(SAEConfigError, match=r"d_in=64 but the model's residual width is d_model=576"):
        check_sae_fits(sae, expected_hook="blocks.3.hook_resid_post", d_model=576, where="test")
    with pytest.raises(SAEConfigError, match=r"reads 'blocks.3.hook_resid_post'.*cached at 'blocks.3.hook_mlp_out'"):
        check_sae_fits(sae, expected_hook="blocks.3.hook_mlp_out", d_model=64, where="test")


# --- the workflow scripts leave no partial outputs ------------------------------------------------

def _run_script(name, tmp_path, **fields):
    smk = SimpleNamespace(log=[str(tmp_path / f"{name}.log")], threads=1, rule=name, **fields)
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(REPO / "workflow" / "scripts" / f"{name}.py"), init_globals={"snakemake": smk})
    assert exc.value.code == 1
    return (tmp_path / f"{name}.log").read_text()


def _io(**kw):
    return SimpleNamespace(**kw)


def test_encode_features_script_errors_leave_no_outputs(tmp_path, layer_data, ci_config):
    # Layer 0's SAE is fine, layer 10's activations hold a NaN: neither feature table may appear.
    bad = tmp_path / "acts_nan.parquet"
    t = pq.read_table(layer_data.paths["prompts"])
    vecs = arrow_to_vectors(t.column("activation"), "float32")
    vecs[3, 0] = float("inf")
    t = t.set_column(2, "activation", vectors_to_arrow(vecs, "float32"))
    pq.write_table(t, bad)
    outs = [tmp_path / "f_a.parquet", tmp_path / "f_b.parquet"]
    log = _run_script("encode_features", tmp_path, config=ci_config,
                      input=_io(saes=[str(layer_data.sae_dir)] * 2, activations=[str(layer_data.paths["prompts"]), str(bad)]),
                      output=_io(features=[str(p) for p in outs]),
                      params=_io(sae_set="main", layers=[LAYER, LAYER], config_hash="x"))
    assert "NaN or Inf" in log and not any(p.exists() for p in outs)
    assert not list(tmp_path.glob("*.tmp-*"))
    # An SAE for another site than the one the set reads (ci.yaml's second set reads mlp_out).
    log = _run_script("encode_features", tmp_path, config=ci_config,
                      input=_io(saes=[str(layer_data.sae_dir)], activations=[str(layer_data.paths["prompts"])]),
                      output=_io(features=[str(outs[0])]), params=_io(sae_set="mlp", layers=[LAYER], config_hash="x"))
    assert "cached at 'blocks.10.hook_mlp_out'" in log and not outs[0].exists()


# --- the workflow ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_ci_workflow_sae_outputs(ci_workflow, ci_config):
    from sae_lens import SAE

    from bugscope import layout
    from bugscope.io import read_table

    quality, meta = read_table(ci_workflow / layout.SAE_QUALITY, kind=tables.SAE_QUALITY.kind)
    # one row per (set, layer): the main set at every analysed layer, then the mlp set at layer 10
    assert list(zip(quality.column("sae_set").to_pylist(), quality.column("layer").to_pylist())) == [
        *(("main", layer) for layer in ci_config["layers"]), ("mlp", 10)]
    assert quality.column("sae_trained_on_model").to_pylist() == [True] * quality.num_rows
    assert set(quality.column("sae_model").to_pylist()) == {ci_config["model"]["checkpoint"]}
    assert meta["excluded_positions"] == [0] and meta["heldout_pair_ids"]
    for sae_set, layer, site in [*(("main", layer, "resid_post") for layer in ci_config["layers"]), ("mlp", 10, "mlp_out")]:
        hook = f"blocks.{layer}.hook_{site}"
        sae = SAE.load_from_disk(ci_workflow / layout.per_set(layout.SAE_DIR, sae_set, hook=hook))
        assert sae.cfg.metadata.hook_name == hook
        features, fmeta = read_table(ci_workflow / layout.per_set(layout.FEATURES, sae_set, hook=hook), kind="features")
        assert fmeta["sae"]["source"] == "train" and fmeta["layer"] == layer and fmeta["sae_set"] == sae_set
        keys, x = _read_acts(ci_workflow / layout.activations("prompts", hook))
        with torch.no_grad():
            dense = sae.encode(x)
        tol = rounding_tolerance(torch.float32, scale=max_abs(dense), reduction=x.shape[1])
        assert (sparse_to_dense(features, keys, sae.cfg.d_sae) - dense).abs().max() <= tol
    row = quality.to_pylist()[0]
    assert 0 < row["l0_corpus"] <= ci_config["sae"]["k"] and 0 <= row["dead_fraction"] <= 1
    assert row["n_tokens_corpus"] > 0 and row["n_tokens_prompts"] > 0 and row["n_prompts"] > 0
