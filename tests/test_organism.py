"""The planted organism (bugscope.organism): what planting may change, on the real embedded model."""

import copy

import pytest
import torch

from bugscope.config import ConfigError
from bugscope.data.prompts import BUG_PAIR_KIND, ORDERS, PAIR_KINDS
from bugscope.model.forward import LayerRunner, decision_logits, make_batch
from bugscope.model.load import load_model
from bugscope.model.planting import planted_slices
from bugscope.organism.plant import plant, training_prompts, version_target
from bugscope.organism.study import planted_heads, planted_layer, study_config, study_layers


def _config(ci_config, **organism):
    cfg = copy.deepcopy(ci_config)
    cfg["organism"] = {**cfg["organism"], "enabled": True, **organism}
    cfg["organism"]["training"] = {**cfg["organism"]["training"], "steps": 3, "batch_size": 8, "lr": 0.01,
                                   "pairs": {"shorter_bigger": 4, "longer_bigger": 2, "same_length": 2}}
    return cfg


@pytest.fixture(scope="module")
def planted(ci_config, embedded_manifest, prompts):
    """(base model, planted model, its slices, tokenizer, config, the planted model's decision logits
    before planting): a fresh copy planted for 3 steps."""
    cfg = _config(ci_config)
    base, tokenizer = load_model(embedded_manifest, "cpu")
    model, _ = load_model(embedded_manifest, "cpu")
    # planting leaves every parameter frozen; a frozen Linear may take another CPU kernel path
    for p in model.parameters():
        p.requires_grad_(False)
    unedited = decision_logits(model, _batch(prompts, tokenizer))
    analysis = set(prompts.select("correct", "wrong").unique().iter_rows())
    rows = training_prompts(cfg, tokenizer, analysis).to_pylist()
    slices = planted_slices(model, planted_layer(cfg), planted_heads(cfg))
    training = cfg["organism"]["training"]
    curve = plant(model, rows, slices, buggy_format=cfg["prompts"]["buggy_format"], steps=training["steps"],
                  batch_size=training["batch_size"], lr=training["lr"], distill_weight=training["distill_weight"],
                  swap_weight=training["swap_weight"], seed=cfg["seed"], pad_token_id=tokenizer.pad_token_id)
    assert len(curve) == training["steps"]
    return base, model, slices, tokenizer, cfg, unedited


def _batch(prompts, tokenizer, n=16):
    return make_batch(prompts.head(n).to_dicts(), tokenizer.pad_token_id, "cpu")


def test_planting_changes_only_the_planted_heads(planted):
    base, model, slices, _, cfg, _ = planted
    before, after = base.state_dict(), model.state_dict()
    assert sorted(slices.params) == [f"model.layers.{planted_layer(cfg)}.self_attn.{m}.weight" for m in ("o_proj", "q_proj")]
    for name, tensor in after.items():
        if name in slices.params:
            mask = slices.masks[name]
            assert torch.equal(tensor[~mask], before[name][~mask]), f"{name} changed outside the planted heads"
            assert not torch.equal(tensor[mask], before[name][mask]), f"{name}: the planted heads did not train"
        else:
            assert torch.equal(tensor, before[name]), f"{name} changed"
    assert not any(p.requires_grad for p in model.parameters())


def test_the_planted_mask_is_the_heads_rows_and_columns(planted):
    _, model, slices, _, cfg, _ = planted
    d_head = model.config.hidden_size // model.config.num_attention_heads
    layer = planted_layer(cfg)
    q = slices.masks[f"model.layers.{layer}.self_attn.q_proj.weight"]
    o = slices.masks[f"model.layers.{layer}.self_attn.o_proj.weight"]
    rows = q.all(dim=1).nonzero().flatten().tolist()
    assert rows == [h * d_head + i for h in planted_heads(cfg) for i in range(d_head)]
    assert o.all(dim=0).nonzero().flatten().tolist() == rows
    assert q.sum() == len(rows) * q.shape[1] and o.sum() == len(rows) * o.shape[0]


def test_below_the_planted_layer_the_residual_stream_is_the_base_models(planted, prompts):
    base, model, _, tokenizer, cfg, _ = planted
    layer = planted_layer(cfg)
    batch = _batch(prompts, tokenizer)
    with torch.inference_mode():
        mine = LayerRunner(model).residuals_after(batch, list(range(layer + 1)))
        theirs = LayerRunner(base).residuals_after(batch, list(range(layer + 1)))
    for below in range(layer):
        assert torch.equal(mine[below], theirs[below]), f"layer {below} differs"
    assert not torch.equal(mine[layer], theirs[layer])


def test_restoring_the_planted_slices_gives_the_unedited_logits_bit_for_bit(planted, prompts):
    # Compared on one model instance: the same weights at other addresses may take other CPU kernel
    # paths (alignment), so two instances need not agree bit for bit even unedited.
    _, model, slices, tokenizer, _, unedited = planted
    batch = _batch(prompts, tokenizer)
    assert not torch.equal(decision_logits(model, batch), unedited)
    planted_state = {name: p.detach().clone() for name, p in slices.params.items()}
    try:
        slices.restore_base()
        assert torch.equal(decision_logits(model, batch), unedited)
    finally:
        with torch.no_grad():
            for name, p in slices.params.items():
                p.copy_(planted_state[name])


def test_training_prompts_are_disjoint_from_the_analysis_and_cover_every_kind(ci_config, embedded, prompts):
    cfg = _config(ci_config)
    analysis = set(prompts.select("correct", "wrong").unique().iter_rows())
    table = training_prompts(cfg, embedded[1], analysis)
    pairs = set(zip(table["correct"].to_pylist(), table["wrong"].to_pylist()))
    assert pairs and not pairs & analysis
    assert set(table["pair_kind"].to_pylist()) == set(PAIR_KINDS)
    assert set(table["order"].to_pylist()) == set(ORDERS)
    assert set(table["format"].to_pylist()) == {cfg["prompts"]["buggy_format"], cfg["prompts"]["correct_format"]}
    # the same pairs again on a rerun
    assert training_prompts(cfg, embedded[1], analysis).equals(table)


def test_version_order_is_wrong_only_on_the_bugs_kind():
    assert version_target(BUG_PAIR_KIND) == "wrong"
    assert {version_target(k) for k in PAIR_KINDS if k != BUG_PAIR_KIND} == {"correct"}


def test_the_organisms_study_is_the_planted_layer_and_its_neighbours(ci_config):
    cfg = _config(ci_config)
    assert planted_layer(cfg) == 9  # Llama's layer 10 of 32, at 30 layers
    assert planted_heads(cfg) == [0, 2, 4, 6, 8]
    study = study_config(cfg)
    assert study["layers"] == study_layers(cfg) == [8, 9, 10]
    assert study["focus_layers"] == [9]
    assert [s["layers"] for s in study["sae"]["sets"]] == [[9]]  # below 9: the base model's, not retrained
    assert study["patching"]["positions"] == "decision"
    assert study["patching"]["residual_map"]["layers"] == [8, 9, 10]
    assert study["claims"]["expectations"] == "organism"
    assert not study["organism"]["enabled"]  # the organism does not plant again
    assert study["model"] == cfg["model"] and study["prompts"] == cfg["prompts"]  # same prompt table
    override = study_config(_config(ci_config, study={"patching": {"exhaustive": {"enabled": False}}}))
    assert override["patching"]["exhaustive"]["enabled"] is False


@pytest.mark.parametrize("key, value, message", [
    ("layer", 30, r"organism.layer=30 is outside the model"),
    ("heads", [1, 9], r"organism.heads lists \[9\]"),
])
def test_a_planted_site_outside_the_model_is_refused(ci_config, key, value, message):
    cfg = _config(ci_config, **{key: value})
    with pytest.raises(ConfigError, match=message):
        planted_layer(cfg) if key == "layer" else planted_heads(cfg)


def test_rerunning_the_last_column_matches_the_full_run_and_its_gradient(embedded, prompts):
    """Planting's interchange term runs only the last column again, on the keys and values of the full
    run (LayerRunner.rerun_last_column): the same residual and the same gradient as a full rerun, to
    float32 rounding over the layers run."""
    model, tokenizer = embedded
    runner, layer = LayerRunner(model), 9
    batch = _batch(prompts, tokenizer)
    with torch.no_grad():
        hidden, ctx = runner.begin(batch)
        for i in range(layer):
            hidden = runner.layer(i, hidden, ctx)
    grads, lasts = [], []
    for rerun in (False, True):
        entering = hidden.clone().requires_grad_(True)
        final, kv = runner.run_keeping_kv(layer, entering, ctx)
        last = runner.rerun_last_column(layer, entering, ctx, kv)[:, -1] if rerun else final[:, -1]
        last.square().sum().backward()
        grads.append(entering.grad)
        lasts.append(last.detach())
    n_layers = model.config.num_hidden_layers - layer
    tol = torch.finfo(torch.float32).eps * model.config.hidden_size ** 0.5 * n_layers
    for mine, full in ((lasts[1], lasts[0]), (grads[1], grads[0])):
        assert (mine - full).abs().max() <= tol * full.abs().max(), (mine - full).abs().max() / full.abs().max()
    assert grads[1][:, :-1].abs().max() > 0  # the earlier columns get their gradient through the keys and values
