"""The original study's patching procedure in full, generation included, and the decomposition of
the gap between it and the per-head decision-logit method (research notes section 1, shared
paper notes "How the original code measures success").

The original procedure (GusSand/surgeon, `test_minimal_even_heads.py`), one prompt pair at a time:
1. run the source (correct-format) prompt and save the output of `layers[L].self_attn` (after
   o_proj, residual space);
2. on the target (buggy-format) prompt, a forward hook on `self_attn` views the output as
   [batch, pos, n_heads, d_model / n_heads] and copies the chosen slices from the saved tensor at
   positions [:min(seq_len, saved_len)];
3. `model.generate(do_sample=False)` with the hook live on every step: after the prefill each
   decoding step has seq_len 1, so [:min_len] is position 0 and every generated token's attention
   output slices are replaced by the source's *first* position (the attention sink);
4. success: the generated text (lower-cased) contains "<correct> is bigger / larger / greater" and
   none of "<wrong> is bigger / larger / greater".

`generate_patched` runs that procedure on many prompts and head sets at once: rows (target prompt
x head set) are left-padded, so its positions [:min_len] are positions of the *unpadded* prompts
(the original's position 0 is the first real token) and the decode-time replacement uses each
row's source's first real token. Tests compare it with the one-prompt-at-a-time reference.

The decomposition (`SETTINGS`) changes one factor at a time, on the same prompts, from the original
to the per-head method: the number pairs (the seed pair -> many), the input (the prompt text -> the
scoring input: prompt, answer prefix and the answer tokens both answers share, which ends at the
decision position), the metric (string criterion -> the first number of the answer), decode-time
patching (on -> off), the metric again (generation -> the decision logit difference), the site (attn_out slices ->
o_proj input heads) and the positions ([:min_len] -> aligned -> the configured positions).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import polars as pl
import torch

from bugscope.data.baseline import parse_answer
from bugscope.data.prompts import BUG_PAIR_KIND, STUDY_ORDER, STUDY_PAIR
from bugscope.model.forward import LayerRunner, make_batch
from bugscope.model.generate import generate_with_attention_write, generate_with_source_heads
from bugscope.model.sites import HEAD_SITE
from bugscope.patching.head_sets import HeadSet
from bugscope.patching.pairs import ORIGINAL_POSITIONS, PatchPair, positions_for_pair

VERBS = ("bigger", "larger", "greater")
INPUTS = ("prompt", "scoring")  # generation from the prompt text, or from the scoring input (input_ids)
METRICS = ("string", "parse_answer", "logit_diff")


def string_success(text: str, correct: str, wrong: str) -> bool:
    """The original's criterion: the lower-cased text says "<correct> is bigger/larger/greater" and
    never "<wrong> is ..." (plain substrings, as in the original; the pair's own numbers)."""
    t = text.lower()
    has_correct = any(f"{correct} is {v}" in t for v in VERBS)
    has_wrong = any(f"{wrong} is {v}" in t for v in VERBS)
    return has_correct and not has_wrong


def judge(text: str, correct: str, wrong: str, metric: str) -> bool:
    if metric == "string":
        return string_success(text, correct, wrong)
    if metric == "parse_answer":
        return parse_answer(text, correct, wrong) == "correct"
    raise ValueError(f"judge: metric {metric!r} is not a generation metric (string, parse_answer)")


# --- the settings of the decomposition -------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One way of patching and scoring. `step` orders the chain from the original (0) to the
    per-head method; departures (step -1) change one factor of `reference` and are not in the chain."""

    name: str
    step: int
    changed: str  # the factor changed from `reference`, "from -> to"
    reference: str | None  # the setting it differs from in one factor
    site: str = "attn_out"
    positions: str = ORIGINAL_POSITIONS
    decode_patch: bool = True
    input: str = "prompt"
    metric: str = "string"
    pairs: str = "all"  # "seed": the seed pair asked correct first only; "all": every decomposition pair

    @property
    def generates(self) -> bool:
        return self.metric != "logit_diff"

    @property
    def run_key(self) -> tuple:
        """Settings with the same key share one generation run (they differ in metric or pairs only)."""
        return (self.site, self.positions, self.decode_patch, self.input)


def settings(positions: str) -> list[Setting]:
    """The chain from the original to the per-head method with the configured `positions`, then
    the departures (single-factor changes that are not on the chain)."""
    s0 = Setting("original", 0, "the original procedure: the seed pair", None, pairs="seed")
    chain = [s0]

    def step(name, changed, **kw):
        chain.append(replace(chain[-1], name=name, step=len(chain), changed=changed, reference=chain[-1].name, **kw))

    step("all_pairs", "pairs: the seed pair -> every decomposition pair", pairs="all")
    step("scoring_input", "input: the prompt text -> prompt + answer prefix + shared answer tokens", input="scoring")
    step("parse_answer", "metric: the string criterion -> the first number of the answer", metric="parse_answer")
    step("no_decode_patch", "decode-time patching: on -> off (prefill only)", decode_patch=False)
    step("logit_diff", "metric: generation -> the decision logit difference (no generation)", metric="logit_diff")
    step("o_proj_input", "site: attn_out slices -> o_proj input (true heads)", site=HEAD_SITE)
    step("aligned", "positions: [:min_len] -> aligned", positions="aligned")
    if positions != "aligned":
        step(positions, f"positions: aligned -> {positions} (the configured per-head method)", positions=positions)
    per_head = chain[-1]
    departures = [
        replace(chain[1], name="prompt_no_decode_patch", step=-1, reference="all_pairs",
                changed="decode-time patching: on -> off, on the prompt text", decode_patch=False),
        replace(per_head, name="per_head_generation_string", step=-1, reference=per_head.name, metric="string",
                changed="metric: the decision logit difference -> the string criterion on generation (prefill patch)"),
        replace(per_head, name="per_head_generation_parse", step=-1, reference=per_head.name, metric="parse_answer",
                changed="metric: the decision logit difference -> the first number of the generated answer"),
        replace(per_head, name="per_head_seed_pair", step=-1, reference=per_head.name, pairs="seed",
                changed="pairs: every decomposition pair -> the seed pair"),
    ]
    return chain + departures


# --- which prompts ---------------------------------------------------------------------------------


def decomposition_pairs(prompts: pl.DataFrame, target_format: str, source_format: str, n_pairs: int
                        ) -> list[PatchPair]:
    """(target, source) prompt rows of the first `n_pairs` number pairs of the bug's kind (by
    pair_id; the config's extra pairs come first, so the seed pair 9.8/9.11 is among them when it is
    listed), both question orders. Positions are set per setting (`pair_positions`)."""
    kind = prompts.filter(pl.col("pair_kind") == BUG_PAIR_KIND)
    ids = sorted(kind["pair_id"].unique().to_list())[:n_pairs]
    sub = kind.filter(pl.col("pair_id").is_in(ids))
    t = {r["question_id"]: r for r in sub.filter(pl.col("format") == target_format).to_dicts()}
    s = {r["question_id"]: r for r in sub.filter(pl.col("format") == source_format).to_dicts()}
    return [PatchPair(t[q], s[q]) for q in sorted(set(t) & set(s))]


def is_seed_prompt(row: dict) -> bool:
    return (row["correct"], row["wrong"]) == STUDY_PAIR and row["order"] == STUDY_ORDER


def generation_ids(row: dict, input_kind: str, tokenizer, add_special_tokens: bool) -> list[int]:
    """The tokens generation starts from: the prompt text tokenised as the original does, or the
    scoring input (the prompt table's input_ids, ending at the decision position)."""
    if input_kind == "prompt":
        return list(tokenizer(row["text"], add_special_tokens=add_special_tokens)["input_ids"])
    if input_kind == "scoring":
        return list(row["input_ids"])
    raise ValueError(f"unknown generation input {input_kind!r}; expected one of {', '.join(INPUTS)}")


def answer_prefix_ids(row: dict, input_kind: str) -> list[int]:
    """The scoring input's tokens after the prompt text (answer prefix and shared answer tokens):
    part of the judged answer when generation starts from the scoring input."""
    return list(row["input_ids"][row["prompt_last_pos"] + 1:]) if input_kind == "scoring" else []


def pair_positions(target_ids: Sequence[int], source_ids: Sequence[int], pair: PatchPair, mode: str
                   ) -> tuple[list[int], list[int]]:
    """(target positions, source positions) in the unpadded generation inputs: [:min_len] of the
    two inputs for the original's mode, else `bugscope.patching.positions_for_pair` (scoring input)."""
    if mode == ORIGINAL_POSITIONS:
        m = min(len(target_ids), len(source_ids))
        return list(range(m)), list(range(m))
    return positions_for_pair(pair.target, pair.source, mode)


# --- patched greedy generation ---------------------------------------------------------------------


def eos_ids(model, tokenizer) -> set[int]:
    """The tokens that end a generation (the generation config's, else the tokenizer's)."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = tokenizer.eos_token_id if eos is None else eos
    return set(eos) if isinstance(eos, (list, tuple)) else {eos}


def until_eos(tokens: Sequence[int], eos: set[int]) -> list[int]:
    """The new tokens up to and including the first end-of-generation token: a finished row of a
    batch is padded after it, an unbatched generation stops there."""
    out = []
    for t in tokens:
        out.append(t)
        if t in eos:
            break
    return out


def _capture(model, ids: Sequence[Sequence[int]], layer: int, site: str, n_heads: int, pad_token_id: int,
             batch_rows: int) -> list[torch.Tensor]:
    """Unpatched site tensors [len, n_heads, width] of each unpadded input at `layer`."""
    runner = LayerRunner(model)
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(ids), batch_rows):
        chunk = ids[start:start + batch_rows]
        batch = make_batch([{"prompt_id": i, "input_ids": list(x)} for i, x in enumerate(chunk)], pad_token_id, device)
        got = runner.capture_attention(batch, [layer], site, n_heads)[layer]
        out += [got[i, int(batch.pad[i]):] for i in range(len(chunk))]
    return out


class _GenerationWriter:
    """The hook's write: prefill (the first call) replaces the chosen heads at the patched columns;
    each decoding step (seq_len 1) replaces them by the source's first real token when
    `decode_patch`, as the original's [:min_len] does."""

    def __init__(self, values, pos_mask, head_mask, first, decode_patch: bool, n_heads: int):
        self.values, self.pos_mask, self.head_mask, self.first = values, pos_mask, head_mask, first
        self.decode_patch, self.n_heads, self.calls = decode_patch, n_heads, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        y = x.reshape(b, n, self.n_heads, d // self.n_heads)
        if self.calls == 0:
            if n != self.pos_mask.shape[1]:
                raise RuntimeError(f"patched generation: the prefill has {n} columns, expected {self.pos_mask.shape[1]}")
            where = self.pos_mask[:, :, None, None] & self.head_mask[:, None, :, None]
            y = torch.where(where, self.values, y)
        elif self.decode_patch:
            where = self.head_mask[:, None, :, None]
            y = torch.where(where, self.first[:, None], y)
        self.calls += 1
        return y.reshape(b, n, d)


@torch.inference_mode()
def generate_patched(model, tokenizer, pairs: Sequence[PatchPair], layer: int, head_sets: Sequence[HeadSet], *,
                     site: str, positions: str, decode_patch: bool, input_kind: str, max_new_tokens: int,
                     add_special_tokens: bool = True, batch_rows: int = 64) -> pl.DataFrame:
    """Greedy generation of every (target, head set) with the head set's slices patched at `layer`
    (site attn_out: the original's post-o_proj slices; site z: o_proj input heads). An empty head set
    is the unpatched target. One row per (head_set, prompt_id) with the new tokens and the judged text
    (the answer-prefix tokens of a scoring input, then the new tokens)."""
    n_heads = model.config.num_attention_heads
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    t_ids = [generation_ids(p.target, input_kind, tokenizer, add_special_tokens) for p in pairs]
    s_ids = [generation_ids(p.source, input_kind, tokenizer, add_special_tokens) for p in pairs]
    source = _capture(model, s_ids, layer, site, n_heads, pad, batch_rows)
    eos = eos_ids(model, tokenizer)
    places = [pair_positions(t, s, p, positions) for t, s, p in zip(t_ids, s_ids, pairs)]
    jobs = [(i, hs) for hs in head_sets for i in range(len(pairs))]
    out = []
    for start in range(0, len(jobs), batch_rows):
        chunk = jobs[start:start + batch_rows]
        width = max(len(t_ids[i]) for i, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        shape = (len(chunk), width, n_heads, source[0].shape[-1])
        values = torch.zeros(shape, dtype=dtype, device=device)
        pos_mask = torch.zeros((len(chunk), width), dtype=torch.bool, device=device)
        head_mask = torch.zeros((len(chunk), n_heads), dtype=torch.bool, device=device)
        first = torch.stack([source[i][0] for i, _ in chunk]).to(device)
        for r, (i, hs) in enumerate(chunk):
            n = len(t_ids[i])
            ids[r, width - n:] = torch.tensor(t_ids[i])
            mask[r, width - n:] = 1
            tpos, spos = places[i]
            cols = torch.tensor([width - n + t for t in tpos], dtype=torch.long)
            pos_mask[r, cols] = True
            values[r, cols] = source[i][torch.tensor(spos, dtype=torch.long)]
            head_mask[r, list(hs.heads)] = True
        write = _GenerationWriter(values, pos_mask, head_mask, first, decode_patch, n_heads)
        gen = generate_with_attention_write(model, layer, site, write, input_ids=ids.to(device),
                                            attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                            pad_token_id=pad)
        new = [until_eos(t, eos) for t in gen[:, width:].tolist()]
        for r, (i, hs) in enumerate(chunk):
            p = pairs[i]
            prefix = answer_prefix_ids(p.target, input_kind)
            out.append({"head_set": hs.name, "prompt_id": p.target["prompt_id"], "new_tokens": new[r],
                        "generated": tokenizer.decode(prefix + new[r], skip_special_tokens=True)})
    return pl.DataFrame(out, schema={"head_set": pl.String, "prompt_id": pl.Int32, "new_tokens": pl.List(pl.Int64),
                                     "generated": pl.String})


@torch.inference_mode()
def generate_plain(model, tokenizer, rows: Sequence[dict], *, input_kind: str, max_new_tokens: int,
                   add_special_tokens: bool = True, batch_rows: int = 64) -> pl.DataFrame:
    """Unpatched greedy generation of prompt rows (the sources' own answers): prompt_id, generated."""
    pairs = [PatchPair(r, r) for r in rows]
    none = HeadSet("none", "none", (), "all")
    layer = 0
    return generate_patched(model, tokenizer, pairs, layer, [none], site="attn_out", positions=ORIGINAL_POSITIONS,
                            decode_patch=False, input_kind=input_kind, max_new_tokens=max_new_tokens,
                            add_special_tokens=add_special_tokens, batch_rows=batch_rows).drop("head_set")


# --- the one-prompt-at-a-time reference (the original code, for tests) ----------------------------


@torch.inference_mode()
def generate_one_original(model, tokenizer, target_ids: Sequence[int], source_ids: Sequence[int], layer: int,
                          heads: Sequence[int], *, max_new_tokens: int, decode_patch: bool = True) -> list[int]:
    """The original procedure on one unpadded prompt pair (bugscope.model.generate.generate_with_source_heads):
    its new tokens up to the first end-of-generation token."""
    new = generate_with_source_heads(model, target_ids, source_ids, layer, heads, max_new_tokens=max_new_tokens,
                                     decode_patch=decode_patch, pad_token_id=tokenizer.pad_token_id)
    return until_eos(new, eos_ids(model, tokenizer))
