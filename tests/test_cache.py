"""The residual cache equals the decoder-layer outputs of an independent, unbatched forward pass."""

import polars as pl
import pytest
import torch

from bugscope.data.prompts import build_prompt_table
from bugscope.io import arrow_to_vectors, read_table
from bugscope.model.cache import NonFiniteActivationError, cache_activations, positions_for
from bugscope.model.forward import iter_batches
from bugscope.model.sites import hook_name
from tests.numerics import forward_tolerance, max_abs

pytestmark = pytest.mark.numerical


@pytest.fixture(scope="module")
def cached(ci_config, embedded, tmp_path_factory):
    model, tok = embedded
    prompts = pl.from_arrow(build_prompt_table(ci_config, tok)).head(6)
    rows = [{**r, "positions": positions_for(r, "aligned")} for r in prompts.to_dicts()]
    last = model.config.num_hidden_layers - 1
    out = tmp_path_factory.mktemp("cache")
    paths = {0: str(out / f"{hook_name(0)}.parquet"), last: str(out / f"{hook_name(last)}.parquet")}
    # batch_size 4 mixes lengths (qa and simple rows), so left padding is exercised.
    assert any(b.pad.max() > 0 for b in iter_batches(rows, 4, tok.pad_token_id, "cpu"))
    cache_activations(model, rows, hooks=[hook_name(0), hook_name(last)], dtype="float32",
                      out_paths={hook_name(layer): path for layer, path in paths.items()},
                      meta={"config_hash": "test"}, batch_size=4, pad_token_id=tok.pad_token_id)
    return prompts, paths, last


def _reference_outputs(model, rows, layer, last, batch_size, pad_token_id):
    """prompt_id -> [pos, d_model] decoder-layer output from a plain forward with output_hidden_states."""
    captured = {}
    handle = model.model.layers[last].register_forward_hook(
        lambda m, i, o: captured.update(out=o[0] if isinstance(o, tuple) else o))
    out = {}
    try:
        for batch in iter_batches(rows, batch_size, pad_token_id, "cpu"):
            with torch.inference_mode():
                res = model(**batch.model_inputs(), output_hidden_states=True)
            hidden = captured["out"] if layer == last else res.hidden_states[layer + 1]
            for i, pid in enumerate(batch.prompt_ids.tolist()):
                out[pid] = hidden[i, int(batch.pad[i]):]
                if layer == last:
                    # output_hidden_states' last entry is post-norm, which is not resid_post.
                    assert (res.hidden_states[-1][i, int(batch.pad[i]):] - out[pid]).abs().max() > 1.0
    finally:
        handle.remove()
    return out


@pytest.mark.parametrize("which", ["first", "last"])
@pytest.mark.parametrize("batch_size", [4, 1])
def test_cache_matches_decoder_outputs(cached, embedded, which, batch_size):
    """Same batches or unbatched (batch_size 1, no padding): equal up to float32 summation order,
    which grows with the depth and the residual norm (~1e3 at the last layer)."""
    model, tok = embedded
    prompts, paths, last = cached
    layer = 0 if which == "first" else last
    table, meta = read_table(paths[layer], kind="activations", config_hash="test")
    assert meta["hook_name"] == f"blocks.{layer}.hook_resid_post" and meta["layer"] == layer
    acts = arrow_to_vectors(table["activation"], "float32")
    index = pl.from_arrow(table.drop(["activation"])).with_row_index("i")
    reference = _reference_outputs(model, prompts.to_dicts(), layer, last, batch_size, tok.pad_token_id)
    for row in prompts.iter_rows(named=True):
        sub = index.filter(pl.col("prompt_id") == row["prompt_id"])
        cached = sorted({*row["aligned_positions"], row["prompt_last_pos"]})  # aligned, and the prompt's last token
        assert sub["position"].to_list() == cached
        got = acts[sub["i"].to_list()]
        expected = reference[row["prompt_id"]][cached]
        tol = forward_tolerance(model, scale=max_abs(expected), depth=layer + 1)
        diff = (got - expected).abs().max().item()
        assert diff <= tol, f"layer {layer}, prompt {row['prompt_id']}: max abs diff {diff} > {tol}"


def test_non_finite_activations_stop_the_cache(ci_config, embedded, tmp_path):
    model, tok = embedded
    prompts = pl.from_arrow(build_prompt_table(ci_config, tok)).head(2)
    rows = [{**r, "positions": positions_for(r, "decision")} for r in prompts.to_dicts()]
    handle = model.model.layers[0].register_forward_hook(lambda m, i, o: (o[0] * float("nan"),) + tuple(o[1:]) if isinstance(o, tuple) else o * float("nan"))
    path = tmp_path / "blocks.1.hook_resid_post.parquet"
    try:
        with pytest.raises(NonFiniteActivationError, match="NaN or Inf"):
            cache_activations(model, rows, hooks=[hook_name(1)], dtype="float32",
                              out_paths={hook_name(1): str(path)}, meta={}, batch_size=2,
                              pad_token_id=tok.pad_token_id)
    finally:
        handle.remove()
    assert list(tmp_path.iterdir()) == []


def test_one_pass_caches_every_site_and_the_residual_identity_holds(ci_config, embedded, tmp_path):
    """Several sites of one layer in one forward pass (what a run with a residual and an MLP-output
    SAE set caches): each lands in its own file, and resid_post(L) = resid_post(L-1) + attn_out(L) +
    mlp_out(L), which fails if a site were mapped to the wrong module."""
    model, tok = embedded
    prompts = pl.from_arrow(build_prompt_table(ci_config, tok)).head(4)
    rows = [{**r, "positions": positions_for(r, "aligned")} for r in prompts.to_dicts()]
    layer = 5
    hooks = [hook_name(layer - 1), hook_name(layer, "attn_out"), hook_name(layer, "mlp_out"), hook_name(layer)]
    paths = {hook: str(tmp_path / f"{hook}.parquet") for hook in hooks}
    n = cache_activations(model, rows, hooks=hooks, dtype="float32", out_paths=paths, meta={"config_hash": "test"},
                          batch_size=4, pad_token_id=tok.pad_token_id)
    acts = {}
    for hook in hooks:
        table, meta = read_table(paths[hook], kind="activations", config_hash="test")
        assert meta["hook_name"] == hook and table.num_rows == n
        acts[hook] = arrow_to_vectors(table["activation"], "float32")
    resid_pre, attn, mlp, resid_post = (acts[h] for h in hooks)
    assert (mlp - attn).abs().max() > 1e-3  # the sites differ: a hook on the wrong module would not
    tol = forward_tolerance(model, scale=max_abs(resid_post), depth=layer + 1)
    assert (resid_pre + attn + mlp - resid_post).abs().max().item() <= tol
