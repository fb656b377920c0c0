"""The model adapters (`bugscope.model.sites.FAMILIES`) on tiny random models of each family's real layer types.

Each family's model is built from its own transformers config (Llama; Qwen2 with qkv biases and
sliding-window layers; Qwen3 with q_norm/k_norm and head_dim != d_model / heads; Gemma 2 with its
extra norms, scaled embeddings, alternating sliding-window layers, attention and final logit
soft-capping), small enough for the CPU. On each: the optimised head sweep equals the naive
oracle, the cache equals `output_hidden_states` and the residual identity holds for the family's
site definitions, the residual ceiling reproduces the source, and the layer-by-layer decision logit
difference equals the full model's.
"""

import polars as pl
import pytest
import torch

from bugscope.io import arrow_to_vectors, read_table
from bugscope.model.cache import cache_activations, positions_for
from bugscope.model.forward import LayerRunner, decision_logits, logit_diff, make_batch
from bugscope.model.load import model_geometry
from bugscope.model.sites import (
    FAMILIES,
    UnsupportedModelError,
    final_norm,
    head_input_module,
    hook_name,
    site_module,
)
from bugscope.patching.engine import HeadPatcher
from bugscope.patching.head_sets import CEILING, named_head_sets
from bugscope.patching.pairs import ORIGINAL_METHOD, PatchPair, PatchSpec, make_pairs
from tests.numerics import forward_tolerance, max_abs
from tests.oracle import sweep_naive

pytestmark = pytest.mark.numerical

VOCAB, D_MODEL, N_LAYERS, N_HEADS, N_KV, HEAD_DIM, WINDOW = 256, 64, 3, 4, 2, 24, 4
PAD = 0


def _config(family: str):
    import transformers

    # initializer_range 0.1 (not 0.02): logits of a few units, so that the soft-cap bends them and
    # attention is far from uniform (the sliding window changes the outputs).
    common = dict(vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=128, num_hidden_layers=N_LAYERS,
                  num_attention_heads=N_HEADS, num_key_value_heads=N_KV, max_position_embeddings=64,
                  initializer_range=0.1, pad_token_id=PAD)
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "qwen2":  # layer 0 full, layers 1 and 2 sliding
        return transformers.Qwen2Config(**common, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    if family == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=HEAD_DIM)
    if family == "gemma2":  # layers 0 and 2 sliding, layer 1 full
        return transformers.Gemma2Config(**common, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM,
                                         sliding_window=WINDOW, final_logit_softcapping=2.0,
                                         attn_logit_softcapping=5.0)
    raise ValueError(family)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(request.param), attn_implementation="eager", dtype=torch.float32)
    assert model.config.model_type == request.param
    return request.param, model.eval()


def _tokens(g, n):
    return torch.randint(1, VOCAB, (n,), generator=g).tolist()


@pytest.fixture(scope="module")
def prompts():
    """Three questions in two formats of different lengths (11 and 8 tokens, so batches of both are
    left padded), sharing their last 4 tokens (the aligned positions, the decision at the end)."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for q in range(3):
        shared = _tokens(g, 4)
        correct, wrong = _tokens(g, 2)
        for fmt, n_prefix in (("qa", 7 + q % 2), ("simple", 4)):
            ids = _tokens(g, n_prefix) + shared
            rows.append({"prompt_id": len(rows), "question_id": q, "format": fmt, "input_ids": ids,
                         "correct_token": correct, "wrong_token": wrong, "decision_pos": len(ids) - 1,
                         "aligned_positions": list(range(len(ids) - 4, len(ids))), "prompt_last_pos": len(ids) - 1})
    return pl.DataFrame(rows)


def _logit_scale(model, rows) -> float:
    return max_abs(decision_logits(model, make_batch(rows, PAD, "cpu")))


def test_geometry_and_head_width(family_model):
    family, model = family_model
    geometry = model_geometry(model.config)
    head_dim = HEAD_DIM if family in ("qwen3", "gemma2") else D_MODEL // N_HEADS
    assert (geometry["num_heads"], geometry["num_kv_heads"], geometry["head_dim"]) == (N_HEADS, N_KV, head_dim)
    assert head_input_module(model, 0).in_features == N_HEADS * head_dim


@pytest.mark.parametrize("spec", [PatchSpec(positions="aligned"), PatchSpec(positions="decision", operation="mean"),
                                  PatchSpec(positions="suffix", operation="zero"), ORIGINAL_METHOD],
                         ids=["aligned-patch", "decision-mean", "suffix-zero", "original-method"])
def test_optimised_equals_naive(family_model, prompts, spec):
    _, model = family_model
    patcher = HeadPatcher(model, pad_token_id=PAD, max_prompts=2, batch_rows=5, progress=False)
    pairs = make_pairs(prompts, "qa", "simple", spec.positions)
    sets = named_head_sets(patcher.n_heads)
    plan = {0: [sets[1], sets[-1]], 1: sets[:3]}
    fast, base = patcher.sweep(pairs, plan, spec)
    slow = sweep_naive(patcher, pairs, plan, spec)
    joined = fast.join(slow, on=["layer", "head_set", "prompt_id"], suffix="_naive").join(base, on="prompt_id")
    assert joined.height == fast.height == slow.height == len(pairs) * 5
    tol = forward_tolerance(model, scale=_logit_scale(model, prompts.to_dicts()))
    assert (joined["logit_diff"] - joined["logit_diff_naive"]).abs().max() <= tol
    # Not vacuous: the patches move the logit difference far beyond the rounding tolerance.
    assert (joined["logit_diff"] - joined["baseline_logit_diff"]).abs().max() > 100 * tol


def _hf_hidden_states(model, row):
    """The unbatched forward's hidden states [layers + 1, pos, d_model] of one prompt."""
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([row["input_ids"]]), output_hidden_states=True, use_cache=False)
    return torch.stack([h[0] for h in out.hidden_states])


def test_cache_matches_hidden_states_and_the_residual_identity_holds(family_model, prompts, tmp_path):
    family, model = family_model
    rows = [{**r, "positions": positions_for(r, "all")} for r in prompts.to_dicts()]
    hooks = [hook_name(layer, site) for layer in range(N_LAYERS) for site in ("resid_post", "attn_out", "mlp_out")]
    paths = {hook: str(tmp_path / f"{hook}.parquet") for hook in hooks}
    # batch_size 2 mixes the 8- and 11-token prompts: left padding.
    cache_activations(model, rows, hooks=hooks, dtype="float32", out_paths=paths, meta={"config_hash": "t"},
                      batch_size=2, pad_token_id=PAD)
    acts = {}
    for hook in hooks:
        table, _ = read_table(paths[hook], kind="activations", config_hash="t")
        index = pl.from_arrow(table.drop(["activation"])).with_row_index("i")
        vectors = arrow_to_vectors(table["activation"], "float32")
        acts[hook] = {pid: vectors[index.filter(pl.col("prompt_id") == pid).sort("position")["i"].to_list()]
                      for pid in prompts["prompt_id"]}
    for row in rows:
        pid = row["prompt_id"]
        hidden = _hf_hidden_states(model, row)
        for layer in range(N_LAYERS):
            resid = acts[hook_name(layer)][pid]
            tol = forward_tolerance(model, scale=max_abs(hidden[layer + 1]), depth=layer + 1)
            if layer < N_LAYERS - 1:
                assert (resid - hidden[layer + 1]).abs().max() <= tol
            else:  # transformers' last hidden state has the final norm applied
                with torch.inference_mode():
                    assert (final_norm(model)(resid) - hidden[layer + 1]).abs().max() <= tol
            before = hidden[0] if layer == 0 else acts[hook_name(layer - 1)][pid]
            attn, mlp = acts[hook_name(layer, "attn_out")][pid], acts[hook_name(layer, "mlp_out")][pid]
            assert (mlp - attn).abs().max() > 100 * tol  # distinct modules
            assert (before + attn + mlp - resid).abs().max() <= tol
    if family == "gemma2":
        _gemma2_raw_branches_break_the_identity(model, rows[0])


def _gemma2_raw_branches_break_the_identity(model, row):
    """In Gemma 2 the raw outputs of self_attn and mlp are not what the residual stream receives
    (each passes its post-norm first): the Llama site definitions would break the identity."""
    block = model.model.layers[1]
    got = {}
    handles = [block.self_attn.register_forward_hook(lambda m, i, o: got.__setitem__("attn", o[0][0])),
               block.mlp.register_forward_hook(lambda m, i, o: got.__setitem__("mlp", o[0])),
               site_module(model, 1, "attn_out").register_forward_hook(lambda m, i, o: got.__setitem__("site", o[0]))]
    try:
        hidden = _hf_hidden_states(model, row)
    finally:
        for h in handles:
            h.remove()
    assert site_module(model, 1, "attn_out") is block.post_attention_layernorm
    assert (hidden[1] + got["attn"] + got["mlp"] - hidden[2]).abs().max() > 1e-2 * max_abs(hidden[2])
    assert (got["site"] - got["attn"]).abs().max() > 1e-2 * max_abs(got["site"])


def test_residual_ceiling_reproduces_the_source(family_model):
    """The whole residual stream after layer L patched at every position of an equal-length source:
    the target's logit difference becomes the source's, at every layer."""
    _, model = family_model
    g = torch.Generator().manual_seed(2)
    rows = []
    for q in range(2):
        correct, wrong = _tokens(g, 2)
        for fmt in ("qa", "simple"):
            ids = _tokens(g, 9)
            rows.append({"prompt_id": len(rows), "question_id": q, "format": fmt, "input_ids": ids,
                         "correct_token": correct, "wrong_token": wrong, "decision_pos": 8})
    pairs = [PatchPair(rows[i], rows[i + 1], list(range(9)), list(range(9))) for i in (0, 2)]
    patcher = HeadPatcher(model, pad_token_id=PAD, progress=False)
    patched, base = patcher.sweep(pairs, {layer: [CEILING] for layer in range(N_LAYERS)}, PatchSpec())
    sources = [p.source for p in pairs]
    with torch.inference_mode():
        source_ld = logit_diff(decision_logits(model, make_batch(sources, PAD, "cpu")), make_batch(sources, PAD, "cpu"))
    expected = dict(zip([p.target["prompt_id"] for p in pairs], source_ld.tolist()))
    tol = forward_tolerance(model, scale=_logit_scale(model, rows))
    assert patched.height == N_LAYERS * len(pairs)
    for r in patched.join(base, on="prompt_id").iter_rows(named=True):
        assert abs(r["logit_diff"] - expected[r["prompt_id"]]) <= tol
        assert abs(r["baseline_logit_diff"] - expected[r["prompt_id"]]) > 100 * tol  # the target differs


def test_layer_runner_logit_diff_equals_the_full_model(family_model, prompts):
    """LayerRunner's readout (two lm_head rows, soft-capped for Gemma 2, sliding-window masks) equals
    the full model's logits; without the soft-cap or the windows it would not."""
    family, model = family_model
    rows = prompts.to_dicts()
    batch = make_batch(rows, PAD, "cpu")
    with torch.inference_mode():
        expected = logit_diff(decision_logits(model, batch), batch)
    tol = forward_tolerance(model, scale=_logit_scale(model, rows))
    runner = LayerRunner(model)
    assert (runner.record(batch, []).baseline - expected).abs().max() <= tol
    assert (runner.softcap is not None) == (family == "gemma2")
    assert any(runner.windows) == (family in ("gemma2", "qwen2"))
    if runner.softcap is not None:
        runner.softcap = None
        assert (runner.record(batch, []).baseline - expected).abs().max() > 100 * tol
    if any(runner.windows):
        runner = LayerRunner(model)
        runner.windows = [None] * N_LAYERS
        assert (runner.record(batch, []).baseline - expected).abs().max() > 100 * tol


def test_an_unsupported_architecture_is_refused_by_name():
    import transformers

    config = transformers.MistralConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1)
    model = transformers.MistralForCausalLM(config)
    for make in (lambda: HeadPatcher(model, pad_token_id=PAD), lambda: LayerRunner(model),
                 lambda: model_geometry(config), lambda: site_module(model, 0, "mlp_out")):
        with pytest.raises(UnsupportedModelError, match="'mistral'.*gemma2, llama, qwen2, qwen3"):
            make()


def test_head_attribution_refuses_a_normalised_attention_output(family_model):
    """The direct attribution's W_O[h] z_h is the heads' residual write only where nothing follows o_proj."""
    from bugscope.model.layer_parts import head_outputs

    family, model = family_model
    z = torch.zeros(2, N_HEADS * head_input_module(model, 0).in_features // N_HEADS)
    if family == "gemma2":
        with pytest.raises(UnsupportedModelError, match="post_attention_layernorm"):
            head_outputs(model, 0, z, N_HEADS)
    else:
        assert head_outputs(model, 0, z, N_HEADS).shape == (N_HEADS, 2, D_MODEL)


def test_the_lens_reads_the_models_logit_difference_and_the_attributions_add_up(family_model, prompts):
    """The logit lens at the last layer is the model's own decision logit difference (soft-capped for
    Gemma 2); the embedding's and every block's direct attribution add up to it before the soft-cap.
    Without the soft-cap, or reading the residual before the last layer, it would not match."""
    from bugscope.model.capture import decision_lens

    family, model = family_model
    rows = prompts.to_dicts()
    batch = make_batch(rows, PAD, "cpu")
    with torch.inference_mode():
        logits = decision_logits(model, batch)
    expected = dict(zip(batch.prompt_ids.tolist(), logit_diff(logits, batch).tolist()))
    lens = decision_lens(model, rows, batch_size=4, pad_token_id=PAD)
    mine = torch.tensor(lens.lens[:, -1])
    theirs = torch.tensor([expected[int(i)] for i in lens.prompt_ids])
    tol = forward_tolerance(model, scale=_logit_scale(model, rows))
    assert (mine - theirs).abs().max() <= tol
    assert (torch.tensor(lens.lens[:, -2]) - theirs).abs().max() > 100 * tol
    total = torch.tensor(lens.embedding_attribution + lens.attn_attribution.sum(-1) + lens.mlp_attribution.sum(-1))
    cap = model.config.final_logit_softcapping if family == "gemma2" else None
    if cap is None:
        uncapped = theirs
    else:  # the logits before the cap, from the capped ones
        rows_ = torch.arange(logits.shape[0])
        raw = cap * torch.atanh(logits.double() / cap)
        by_id = dict(zip(batch.prompt_ids.tolist(), (raw[rows_, batch.correct_token] - raw[rows_, batch.wrong_token]).tolist()))
        uncapped = torch.tensor([by_id[int(i)] for i in lens.prompt_ids])
        assert (total - theirs).abs().max() > 100 * tol
    assert (total - uncapped).abs().max() <= tol * max(1.0, max_abs(uncapped) / max_abs(theirs))
