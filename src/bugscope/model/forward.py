"""Batched forward passes over the prompt table: left padding, explicit position_ids, decision logits.

Each prompt's input ends at its decision position (see `bugscope.data.prompts`), so with left padding
the decision position of every row is the last column and `logits_to_keep=1` scores it.

With `bugscope.model.sites`, this is the only module that runs transformers internals: the decoder stack
layer by layer (`LayerRunner`), the stand-ins for a transformers KV cache that let a patched run
reuse the unpatched run's keys and values, and the recorded unpatched run itself (`RecordedRun`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from bugscope.model.sites import (
    attention_window,
    attention_writer_hook,
    cache_keyword,
    decoder_layers,
    final_norm,
    inner_model,
    logit_softcap,
    model_family,
    output_tensor,
    parse_hook_name,
    site_module,
    site_writer_hook,
    unembedding,
)


@dataclass
class Batch:
    prompt_ids: torch.Tensor  # [batch]
    input_ids: torch.Tensor  # [batch, pos]
    attention_mask: torch.Tensor  # [batch, pos]
    position_ids: torch.Tensor  # [batch, pos]
    pad: torch.Tensor  # [batch] left padding of each row
    correct_token: torch.Tensor  # [batch]
    wrong_token: torch.Tensor  # [batch]

    def model_inputs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}


def make_batch(rows: Sequence[dict], pad_token_id: int, device) -> Batch:
    """rows: dicts with prompt_id, input_ids and (optionally) correct_token / wrong_token."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, width - n:] = torch.tensor(r["input_ids"], dtype=torch.long)
        mask[i, width - n:] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(
        prompt_ids=torch.tensor([r["prompt_id"] for r in rows], dtype=torch.long),
        input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=position_ids.to(device),
        pad=width - mask.sum(-1),
        correct_token=torch.tensor([r.get("correct_token", -1) for r in rows], dtype=torch.long),
        wrong_token=torch.tensor([r.get("wrong_token", -1) for r in rows], dtype=torch.long),
    )


def iter_batches(rows: Sequence[dict], batch_size: int, pad_token_id: int, device) -> Iterator[Batch]:
    """Batches of rows of similar length: padding is compute spent on nothing (the chat format is
    twice as long as the others). The order is a stable sort by length, so it is deterministic;
    consumers key results by `Batch.prompt_ids`."""
    by_length = sorted(rows, key=lambda r: len(r["input_ids"]))
    for start in range(0, len(by_length), batch_size):
        yield make_batch(by_length[start:start + batch_size], pad_token_id, device)


def logit_diff(decision_logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """[batch] correct-minus-wrong logit at the decision position; > 0 means the model is right."""
    rows = torch.arange(decision_logits.shape[0])
    logits = decision_logits.float().cpu()
    return logits[rows, batch.correct_token] - logits[rows, batch.wrong_token]


@torch.inference_mode()
def decision_logits(model, batch: Batch) -> torch.Tensor:
    """[batch, vocab] logits at the decision (last) position."""
    out = model(**batch.model_inputs(), logits_to_keep=1, use_cache=False)
    return out.logits[:, -1, :]


def run_decoder(model, batch: Batch):
    """The decoder stack without the unembedding (for hooks that read every layer's output)."""
    return inner_model(model)(**batch.model_inputs(), use_cache=False)


@contextlib.contextmanager
def capture_sites(model, hooks: Sequence[str], on_output):
    """Call `on_output(hook, tensor [batch, pos, d_model])` for each hook's output in a forward
    (`hooks`: names such as blocks.10.hook_mlp_out, bugscope.model.sites.hook_name)."""
    handles = []
    for hook in hooks:
        layer, site = parse_hook_name(hook)

        def fire(_module, _inputs, output, hook=hook):
            on_output(hook, output_tensor(output))
        handles.append(site_module(model, layer, site).register_forward_hook(fire))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class LayerContext:
    """What every decoder layer of one padded batch needs: rotary embeddings, masks and positions."""

    cos_sin: tuple[torch.Tensor, torch.Tensor]
    mask: torch.Tensor  # [b, 1, q, k] additive attention mask of full causal attention
    position_ids: torch.Tensor  # [b, q]
    window_masks: dict[int, torch.Tensor] = field(default_factory=dict)  # window -> mask of sliding layers

    def mask_for(self, window: int | None) -> torch.Tensor:
        return self.mask if window is None else self.window_masks[window]

    def tail(self, start: int, replicas: int = 1) -> "LayerContext":
        """The context of query columns `start:` repeated `replicas` times (keys are not cut)."""
        cos, sin = self.cos_sin

        def cut(mask):
            return mask[:, :, start:].repeat(replicas, 1, 1, 1)
        return LayerContext(
            (cos[:, start:].repeat(replicas, 1, 1), sin[:, start:].repeat(replicas, 1, 1)),
            cut(self.mask), self.position_ids[:, start:].repeat(replicas, 1),
            {w: cut(m) for w, m in self.window_masks.items()})


class LayerRunner:
    """Runs a Hugging Face decoder stack (a family of `bugscope.model.sites.FAMILIES`) one layer at a time.

    A run can start at any layer from that layer's input, so stages that change one layer (head
    patching, an SAE spliced in) compute the layers before it once and reuse them.
    """

    def __init__(self, model):
        model_family(model)  # a clear error for an architecture whose internals are not known
        self.model = model
        self.inner = inner_model(model)
        self.n_layers = model.config.num_hidden_layers
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.windows = [attention_window(model, i) for i in range(self.n_layers)]
        self.softcap = logit_softcap(model)

    def begin(self, batch: Batch) -> tuple[torch.Tensor, LayerContext]:
        """(embeddings [b, pos, d_model], context) of a batch. The embedding module applies any
        scaling of the family (Gemma 2: times sqrt(d_model))."""
        hidden = self.inner.embed_tokens(batch.input_ids)
        cos_sin = self.inner.rotary_emb(hidden, batch.position_ids)
        windows = {w: self.attention_mask(batch, w) for w in set(self.windows) - {None}}
        return hidden, LayerContext(cos_sin, self.attention_mask(batch), batch.position_ids, windows)

    def attention_mask(self, batch: Batch, window: int | None = None) -> torch.Tensor:
        """[b, 1, pos, pos] additive mask: causal, no padded keys; a padded query sees itself only.
        With a sliding `window`, a query sees the `window` columns up to itself (transformers'
        sliding_window_overlay: kv > q - window; with left padding, columns and positions differ
        by a constant)."""
        valid = batch.attention_mask.bool()  # [b, pos]
        n = valid.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=valid.device).tril()
        if window is not None:
            causal = causal.triu(1 - window)
        allowed = causal[None] & valid[:, None, :]
        allowed |= torch.eye(n, dtype=torch.bool, device=valid.device)[None]
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=valid.device)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        return mask[:, None]

    def layer(self, i: int, hidden: torch.Tensor, ctx: LayerContext, kv=None) -> torch.Tensor:
        block = decoder_layers(self.model)[i]
        out = block(hidden, attention_mask=ctx.mask_for(self.windows[i]), position_ids=ctx.position_ids, use_cache=False,
                    position_embeddings=ctx.cos_sin, **{cache_keyword(block): kv})
        return output_tensor(out)

    def run(self, start: int, hidden: torch.Tensor, ctx: LayerContext, kv=None) -> torch.Tensor:
        """The residual stream after the last layer, from the input of layer `start`."""
        for i in range(start, self.n_layers):
            hidden = self.layer(i, hidden, ctx, kv)
        return hidden

    def run_keeping_kv(self, start: int, hidden: torch.Tensor, ctx: LayerContext):
        """(run()'s output, every layer's keys and values from `start` on), for `rerun_last_column`."""
        recorder = KVRecorder()
        return self.run(start, hidden, ctx, recorder), recorder.kv

    def rerun_last_column(self, start: int, hidden: torch.Tensor, ctx: LayerContext, kv,
                          replicas: int = 1) -> torch.Tensor:
        """[replicas * b, 1, d_model]: run() of the last column alone over `replicas` copies of the
        batch, the earlier columns' keys and values taken from `kv` (run_keeping_kv of the same
        input). A change confined to the last column needs no more: the earlier columns cannot see it."""
        n = hidden.shape[1] - 1
        return self.run(start, hidden[:, n:].repeat(replicas, 1, 1), ctx.tail(n, replicas), KVPrefix(kv, n, replicas))

    def decision_logit_diff(self, hidden_last: torch.Tensor, batch: Batch, replicas: int = 1) -> torch.Tensor:
        """[replicas * b] correct-minus-wrong logit from the last column's residual [replicas * b, d_model]:
        only the two scored rows of the unembedding are used. A soft-capped family (Gemma 2) caps
        both logits, cap * tanh(logit / cap), as its lm_head output is: the sign of the difference
        is kept, its size is not."""
        h = final_norm(self.model)(hidden_last).float()
        head = unembedding(self.model)
        w = head.weight
        c = batch.correct_token.to(self.device).repeat(replicas)
        wr = batch.wrong_token.to(self.device).repeat(replicas)
        lc = (h * w[c].float()).sum(-1)
        lw = (h * w[wr].float()).sum(-1)
        bias = getattr(head, "bias", None)
        if bias is not None:
            lc, lw = lc + bias[c].float(), lw + bias[wr].float()
        if self.softcap is not None:
            lc, lw = self.softcap * torch.tanh(lc / self.softcap), self.softcap * torch.tanh(lw / self.softcap)
        return (lc - lw).cpu()

    @torch.inference_mode()
    def unpatched_pass(self, batch: Batch, *, attention_layers: Sequence[int] = (), site: str | None = None,
                       n_slices: int = 1, residual_layers: Sequence[int] = (), score: bool = False) -> "UnpatchedPass":
        """One unpatched forward of a batch that collects what its callers read: the per-head outputs
        (site "z") or attention-output slices (site "attn_out") at `attention_layers`, as [b, pos,
        n_slices, width]; the residual stream after each of `residual_layers`; and, with `score`, the
        decision logit difference. Without `score` it stops after the last layer asked for."""
        attention: dict[int, torch.Tensor] = {}

        def grab(layer):
            def write(x):
                attention[layer] = x.reshape(*x.shape[:2], n_slices, -1).clone()
                return x
            return write

        last = self.n_layers - 1 if score else max([*attention_layers, *residual_layers])
        handles = [attention_writer_hook(self.model, layer, site, grab(layer)) for layer in attention_layers]
        residuals = {}
        try:
            hidden, ctx = self.begin(batch)
            for layer in range(last + 1):
                hidden = self.layer(layer, hidden, ctx)
                if layer in residual_layers:
                    residuals[layer] = hidden
        finally:
            for h in handles:
                h.remove()
        baseline = self.decision_logit_diff(hidden[:, -1], batch) if score else None
        return UnpatchedPass(attention, residuals, baseline)

    def capture_attention(self, batch: Batch, layers: Sequence[int], site: str, n_slices: int) -> dict[int, torch.Tensor]:
        """Unpatched per-head outputs (site "z") or attention-output slices (site "attn_out") at
        `layers`: layer -> [b, pos, n_slices, width]. Stops after the last layer asked for."""
        return self.unpatched_pass(batch, attention_layers=layers, site=site, n_slices=n_slices).attention

    @torch.inference_mode()
    def record(self, batch: Batch, layers: Sequence[int]) -> "RecordedRun":
        """The unpatched run of one batch: the residual entering each of `layers`, every layer's keys
        and values, and the decision logit difference."""
        hidden, ctx = self.begin(batch)
        rec = KVRecorder()
        hidden_in = {}
        for layer in range(self.n_layers):
            if layer in layers:
                hidden_in[layer] = hidden
            hidden = self.layer(layer, hidden, ctx, rec)
        return RecordedRun(batch, ctx, hidden_in, rec.kv, self.decision_logit_diff(hidden[:, -1], batch))

    @staticmethod
    def _tail_inputs(run: "RecordedRun", layer: int, start: int, replicas: int):
        """(hidden, ctx, kv) entering `layer` over `replicas` copies of the recorded batch, from query
        column `start` on. Columns before `start` cannot change: their keys and values come from `run`."""
        kv = KVPrefix(run.kv, start, replicas) if start > 0 else None
        return run.hidden_in[layer][:, start:].repeat(replicas, 1, 1), run.ctx.tail(start, replicas), kv

    @torch.inference_mode()
    def run_written(self, run: "RecordedRun", layer: int, site: str, write, *, start: int, replicas: int) -> torch.Tensor:
        """[replicas * b] decision logit differences with `write` applied to the attention output
        (`site`) of `layer`, over `replicas` copies of the batch, from query column `start` on."""
        hidden, ctx, kv = self._tail_inputs(run, layer, start, replicas)
        handle = attention_writer_hook(self.model, layer, site, write)
        try:
            hidden = self.run(layer, hidden, ctx, kv)
        finally:
            handle.remove()
        return self.decision_logit_diff(hidden[:, -1], run.batch, replicas)

    @torch.inference_mode()
    def layer_written(self, run: "RecordedRun", layer: int, site: str, write, *, start: int,
                      replicas: int) -> torch.Tensor:
        """[replicas * b, cols, d_model]: the residual stream after `layer` alone, with `write` applied
        to its attention output (`site`), over `replicas` copies of the batch, from query column `start` on."""
        hidden, ctx, kv = self._tail_inputs(run, layer, start, replicas)
        handle = attention_writer_hook(self.model, layer, site, write)
        try:
            return self.layer(layer, hidden, ctx, kv)
        finally:
            handle.remove()

    @torch.inference_mode()
    def run_site_written(self, run: "RecordedRun", layer: int, site: str, write, *, start: int,
                         replicas: int) -> torch.Tensor:
        """[replicas * b] decision logit differences with `write` applied to the output of `site`
        (bugscope.model.sites.SITES: resid_post, mlp_out, attn_out) at `layer`, over `replicas` copies of
        the batch, from query column `start` on (earlier keys and values come from `run`)."""
        hidden, ctx, kv = self._tail_inputs(run, layer, start, replicas)
        handle = site_writer_hook(self.model, layer, site, write)
        try:
            hidden = self.run(layer, hidden, ctx, kv)
        finally:
            handle.remove()
        return self.decision_logit_diff(hidden[:, -1], run.batch, replicas)

    def residuals_after(self, batch: Batch, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """layer -> [b, pos, d_model]: the unpatched residual stream after each of `layers`."""
        return self.unpatched_pass(batch, residual_layers=layers).residuals

    @torch.inference_mode()
    def run_residual_written(self, run: "RecordedRun", layer: int, values: torch.Tensor, pos_mask: torch.Tensor,
                             *, start: int) -> torch.Tensor:
        """[b] decision logit differences with the residual stream after `layer` replaced by
        `values` [b, pos, d_model] where `pos_mask` [b, pos] is set, from query column `start` on."""
        hidden, ctx, kv = self._tail_inputs(run, layer, start, 1)
        hidden = self.layer(layer, hidden, ctx, kv)
        hidden = torch.where(pos_mask[:, start:, None], values[:, start:], hidden)
        hidden = self.run(layer + 1, hidden, ctx, kv)
        return self.decision_logit_diff(hidden[:, -1], run.batch)


@dataclass
class UnpatchedPass:
    """What `LayerRunner.unpatched_pass` collected from one batch."""

    attention: dict[int, torch.Tensor]  # layer -> [b, pos, n_slices, width]
    residuals: dict[int, torch.Tensor]  # layer -> [b, pos, d_model] after the layer
    baseline: torch.Tensor | None  # [b] decision logit difference, when scored


@dataclass
class RecordedRun:
    """One prompt batch's unpatched run, reused by every patched run of that batch."""

    batch: Batch
    ctx: LayerContext
    hidden_in: dict[int, torch.Tensor]  # layer -> [b, pos, d_model] residual entering the layer
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> keys, values [b, kv_head, pos, d_head]
    baseline: torch.Tensor  # [b] decision logit difference


class KVRecorder:
    """A stand-in for a transformers Cache that keeps every layer's keys and values ([b, kv_head, pos, d])."""

    def __init__(self):
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key, value, layer_idx, *args, **kwargs):
        self.kv[layer_idx] = (key, value)
        return key, value


class KVPrefix:
    """Prepends the recorded keys/values of the unpatched earlier positions, repeated per replica."""

    def __init__(self, prefix: dict[int, tuple[torch.Tensor, torch.Tensor]], n_cols: int, replicas: int):
        self.prefix, self.n_cols, self.replicas = prefix, n_cols, replicas

    def update(self, key, value, layer_idx, *args, **kwargs):
        return tuple(self._prepend(recorded, new) for recorded, new in zip(self.prefix[layer_idx], (key, value)))

    def _prepend(self, recorded: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        # The replicas of the prefix are a broadcast view: the one copy is the concatenation.
        b, *rest = recorded.shape
        prefix = recorded[:, :, :self.n_cols][None].expand(self.replicas, b, rest[0], self.n_cols, rest[2])
        joined = torch.cat([prefix, new.reshape(self.replicas, b, *new.shape[1:])], dim=3)
        return joined.reshape(self.replicas * b, *joined.shape[2:])
