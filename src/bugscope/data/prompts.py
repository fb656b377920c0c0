"""The contrastive prompt set: number pairs x question orders x formats, tokenised and aligned.

Scoring (research notes section 4): the two answers, e.g. "9.8" and "9.11", share their first
tokens. Each prompt's model input is the prompt plus the answer tokens both answers share; the
decision position is its last position, and the answer is scored by the logits of the two tokens
that follow there (correct minus wrong).

Alignment: a position of one format is aligned with a position of another when both hold the same
token over the same characters of the shared question (or of the shared answer prefix). The
decision positions are always aligned. Every format of one question gets the same number of
aligned positions, in the same order, so index i means the same thing in every format.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa

from bugscope.stats import derived_seed

# The first position of every sequence is an attention sink with a residual norm ~100x the rest
# (research notes section 3); SmolLM2 adds no BOS, so it is whatever token comes first. SAE
# training, quality metrics and the feature analyses leave it out.
SINK_POSITION = 0

ORDERS = ("correct_first", "wrong_first")
# The published study's one question, "Which is bigger: 9.8 or 9.11?": its (correct, wrong) pair,
# asked correct first (STUDY_ORDER). The one name for it ("seed" means a random seed).
STUDY_PAIR = ("9.8", "9.11")
STUDY_ORDER = "correct_first"

# Kinds of number pair (research notes section 8). Every kind's answers diverge at the first
# decimal digit, the correct one's digit being the larger, so one decision token is scored for all:
# - shorter_bigger: X.Y vs X.ZW, Y > Z (9.8 vs 9.11): the bug's kind;
# - longer_bigger: X.YZ vs X.W, Y > W (9.81 vs 9.7): "pick the shorter number" is wrong here
#   (Y = W is left out: then one answer is a prefix of the other and never diverges in tokens);
# - same_length: X.Y vs X.Z, Y > Z (9.8 vs 9.7): no length cue at all.
PAIR_KINDS = ("shorter_bigger", "longer_bigger", "same_length")
BUG_PAIR_KIND = "shorter_bigger"
ALL = "all"  # the pooled value of pair_kind and order in the summary tables
CONTROLS = "controls"  # the pair_kind of the rows pooling every kind but the bug's


def is_selection_pair(pair_id):
    """True for the number pairs that select features or marks (even pair_id); the odd ones are the
    held-out pairs every selection-aware statistic is measured on. Takes a Polars expression or a
    NumPy array."""
    return pair_id % 2 == 0


def kind_order_splits(pair_kind, order):
    """(pair kind, order, row mask) for every kind and order of the rows, each also pooled (ALL):
    the rows every summary table gives. `pair_kind` and `order` are per-row sequences."""
    kind, order = np.asarray(pair_kind, dtype=object), np.asarray(order, dtype=object)
    for k in [ALL, *sorted(set(kind))]:
        for o in [ALL, *sorted(set(order))]:
            mask = ((kind == k) | (k == ALL)) & ((order == o) | (o == ALL))
            if mask.any():
                yield k, o, mask
_PAIR_STREAM = 7  # label of the control kinds' pair generators in stats.derived_seed


class PromptError(ValueError):
    """The prompt set cannot be scored or aligned; the message lists the offending rows."""


def pair_kind(correct: str, wrong: str) -> str:
    """The PAIR_KINDS entry of a (correct, wrong) pair, from the lengths of the two decimal parts."""
    a, b = len(correct.split(".")[1]), len(wrong.split(".")[1])
    return "shorter_bigger" if a < b else "longer_bigger" if a > b else "same_length"


def _draw_one(kind: str, rng: random.Random, lo: int, hi: int) -> tuple[str, str]:
    x = rng.randint(lo, hi)
    y = rng.randint(2, 9)
    z = rng.randint(1, y - 1)
    w = rng.randint(1, 9)
    if kind == "shorter_bigger":
        return f"{x}.{y}", f"{x}.{z}{w}"
    if kind == "longer_bigger":
        return f"{x}.{y}{w}", f"{x}.{z}"
    return f"{x}.{y}", f"{x}.{z}"


def _capacity(kind: str, lo: int, hi: int) -> int:
    digit_pairs = sum(y - 1 for y in range(2, 10))  # (Y, Z) with 9 >= Y > Z >= 1
    return (hi - lo + 1) * digit_pairs * (1 if kind == "same_length" else 9)


def draw_number_pairs(prompts_cfg: dict, seed: int) -> list[tuple[str, str]]:
    """(correct, wrong) pairs: the config's extra pairs, `n_pairs` shorter_bigger pairs, then the
    control kinds' `control_pairs` counts, each drawn with its own generator seeded from `seed`."""
    pairs = [tuple(p) for p in prompts_cfg["extra_pairs"]]
    lo, hi = prompts_cfg["integer_range"]
    seen = set(pairs)
    counts = {BUG_PAIR_KIND: prompts_cfg["n_pairs"], **prompts_cfg["control_pairs"]}
    for kind in PAIR_KINDS:
        n = counts.get(kind, 0)
        capacity = _capacity(kind, lo, hi) - sum(pair_kind(*p) == kind for p in seen)
        if n > capacity:
            key = "prompts.n_pairs" if kind == BUG_PAIR_KIND else f"prompts.control_pairs.{kind}"
            raise PromptError(f"{key}={n} exceeds the {capacity} distinct {kind} pairs left in integer_range "
                              f"{lo}..{hi}: lower it or widen prompts.integer_range.")
        # The bug's kind keeps the generator it always had, so its pairs do not move when controls are added.
        rng = random.Random(seed if kind == BUG_PAIR_KIND else derived_seed(seed, _PAIR_STREAM, PAIR_KINDS.index(kind)))
        drawn = 0
        while drawn < n:
            pair = _draw_one(kind, rng, lo, hi)
            if pair not in seen:
                seen.add(pair)
                pairs.append(pair)
                drawn += 1
    return pairs


def first_token_text(prompts_cfg: dict, tokenizer) -> str:
    """The token put before every non-chat format ("" for none): the position-0 attention sink is
    then the same token in every format (research notes section 8)."""
    choice = prompts_cfg["first_token"]
    if choice == "none":
        return ""
    if choice == "auto":
        if _adds_bos(tokenizer):
            return ""
        choice = tokenizer.bos_token
        if not choice:
            raise PromptError("prompts.first_token is 'auto', but this tokenizer adds no BOS and has no bos_token: "
                              "name the token (e.g. its document separator) or write 'none'.")
    ids = tokenizer(choice, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise PromptError(f"prompts.first_token {choice!r} is {len(ids)} tokens for this tokenizer; "
                          "name a single (special) token, or write 'none'.")
    return choice


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


def render(fmt: dict, question: str, tokenizer, first_token: str = "") -> tuple[str, bool]:
    """(prompt text, whether the text already carries its special tokens)."""
    if fmt.get("chat_template"):
        if not getattr(tokenizer, "chat_template", None):
            raise PromptError("a format asks for the chat template, but this tokenizer has none; remove that format.")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        return text, True
    return first_token + fmt["template"].replace("{question}", question), False


@dataclass
class _Scored:
    input_ids: list[int]
    offsets: list[tuple[int, int]]
    decision_pos: int
    correct_token: int
    wrong_token: int


def _score_tokens(tokenizer, prompt: str, prefix: str, correct: str, wrong: str, special: bool) -> _Scored | str:
    enc = [
        tokenizer(prompt + prefix + answer, add_special_tokens=not special, return_offsets_mapping=True)
        for answer in (correct, wrong)
    ]
    a, b = enc[0]["input_ids"], enc[1]["input_ids"]
    lcp = 0
    while lcp < min(len(a), len(b)) and a[lcp] == b[lcp]:
        lcp += 1
    if lcp == len(a) or lcp == len(b):
        return "the two answers never diverge in tokens"
    if lcp == 0:
        return "the two answers diverge at the first token"
    if enc[0]["offset_mapping"][lcp - 1][1] < len(prompt):
        return "the answers' tokens diverge inside the prompt text"
    return _Scored(a[:lcp], [tuple(o) for o in enc[0]["offset_mapping"][:lcp]], lcp - 1, a[lcp], b[lcp])


def _prompt_last(scored: _Scored, prompt_length: int) -> int:
    """The last position inside the prompt text, before the answer prefix: the ":" of "A:", where
    the original study read its features (research notes section 8)."""
    inside = [pos for pos, (s, e) in enumerate(scored.offsets) if e <= prompt_length and e > s]
    return inside[-1] if inside else scored.decision_pos


def _alignment_keys(scored: _Scored, text: str, question: str) -> dict[tuple, int]:
    """Map (region, char start, char end, token) -> position, for tokens inside the question or the answer."""
    q0 = text.find(question)
    q1 = q0 + len(question)
    keys = {}
    for pos, ((s, e), tok) in enumerate(zip(scored.offsets, scored.input_ids)):
        if e <= s:
            continue
        if q0 >= 0 and q0 <= s and e <= q1:
            keys[("question", s - q0, e - q0, tok)] = pos
        elif s >= len(text):
            keys[("answer", s - len(text), e - len(text), tok)] = pos
    return keys


@dataclass(frozen=True)
class Question:
    """One question of a prompt table: a number pair asked in one order and one wording."""

    pair_id: int
    correct: str  # the right answer in the question's reading (its family)
    wrong: str
    pair_kind: str
    order: str
    family: str  # DECIMAL for the analysis prompts; the reading families (bugscope.data.reading) otherwise
    wording: str  # ANALYSIS for the analysis prompts; a reading family's TRAIN or TEST wording
    template: str  # the question, with {a} and {b}


# The analysis prompts are the decimal family in the one wording of prompts.question.
DECIMAL, ANALYSIS = "decimal", "analysis"


def _second_number_span(question: Question, a: str, b: str) -> tuple[int, int]:
    """The characters of the number named second ({b}) inside the rendered question."""
    t = question.template
    before = t[:t.index("{b}")].replace("{a}", a)
    return len(before), len(before) + len(b)


def _numbers_pos(scored: _Scored, q0: int, span: tuple[int, int]) -> int:
    """The last token over the number named second: where both numbers have been read."""
    inside = [pos for pos, (s, e) in enumerate(scored.offsets) if e > q0 + span[0] and s < q0 + span[1]]
    return inside[-1]


def questions_of(pairs: Sequence[tuple[str, str]], template: str, *, family: str = DECIMAL,
                 wording: str = ANALYSIS, first_pair_id: int = 0, kinds: Sequence[str] | None = None) -> list[Question]:
    """Both orders of every (correct, wrong) pair, numbered from `first_pair_id`."""
    out = []
    for i, (correct, wrong) in enumerate(pairs):
        kind = kinds[i] if kinds is not None else pair_kind(correct, wrong)
        for order in ORDERS:
            out.append(Question(first_pair_id + i, correct, wrong, kind, order, family, wording, template))
    return out


def build_prompt_table(config: dict, tokenizer) -> pa.Table:
    """The analysis prompts: every pair of draw_number_pairs in both orders, in every format."""
    pcfg = config["prompts"]
    return prompt_table(questions_of(draw_number_pairs(pcfg, config["seed"]), pcfg["question"]), pcfg["formats"],
                        tokenizer, first_token_text(pcfg, tokenizer))


def prompt_table(questions: Sequence[Question], formats: dict, tokenizer, first: str, *, first_prompt_id: int = 0,
                 first_question_id: int = 0) -> pa.Table:
    """Every question rendered in every format, scored and aligned (module docstring); prompt ids
    from `first_prompt_id`, in question order, then format order."""
    rows, problems = [], []
    for q_index, q in enumerate(questions):
        a, b = (q.correct, q.wrong) if q.order == "correct_first" else (q.wrong, q.correct)
        question = q.template.replace("{a}", a).replace("{b}", b)
        question_id = first_question_id + q_index
        span = _second_number_span(q, a, b)
        group = []
        for fmt_name, fmt in formats.items():
            text, special = render(fmt, question, tokenizer, first)
            scored = _score_tokens(tokenizer, text, fmt["answer_prefix"], q.correct, q.wrong, special)
            if isinstance(scored, str):
                problems.append(f"question {question_id} ({q.correct} vs {q.wrong}, {q.order}), format {fmt_name}: {scored}")
                continue
            group.append((fmt_name, text, scored, _alignment_keys(scored, text + fmt["answer_prefix"], question)))
        if len(group) != len(formats):
            continue
        shared = set.intersection(*(set(k) for *_, k in group))
        if not any(key[0] == "question" for key in shared):
            problems.append(
                f"question {question_id} ({q.correct} vs {q.wrong}, {q.order}): formats "
                f"{', '.join(g[0] for g in group)} share no question token, so they cannot be aligned"
            )
            continue
        ordered = sorted(shared, key=lambda k: (k[0] != "question", k[1]))
        for fmt_name, text, scored, keys in group:
            aligned = [keys[k] for k in ordered if keys[k] != scored.decision_pos] + [scored.decision_pos]
            rows.append({
                "question_id": question_id, "pair_id": q.pair_id, "pair_kind": q.pair_kind,
                "order": q.order, "format": fmt_name, "family": q.family, "wording": q.wording,
                "text": text, "correct": q.correct, "wrong": q.wrong,
                "input_ids": scored.input_ids, "n_tokens": len(scored.input_ids),
                "decision_pos": scored.decision_pos, "correct_token": scored.correct_token,
                "wrong_token": scored.wrong_token, "aligned_positions": aligned,
                "first_token": tokenizer.convert_ids_to_tokens(scored.input_ids[0]),
                "prompt_last_pos": _prompt_last(scored, len(text)),
                "numbers_pos": _numbers_pos(scored, text.find(question), span),
            })
    if problems:
        shown = "\n  ".join(problems[:20])
        raise PromptError(
            f"{len(problems)} prompt(s) cannot be scored or aligned:\n  {shown}\n"
            "Fix the formats (prompts.formats), the answer_prefix or the pairs (prompts.extra_pairs) "
            "so that the two answers diverge in tokens after the prompt and every format contains the question verbatim."
        )
    if not rows:
        raise PromptError("The prompt set is empty: set prompts.n_pairs > 0 or list prompts.extra_pairs.")
    for prompt_id, row in enumerate(rows, start=first_prompt_id):
        row["prompt_id"] = prompt_id
    return pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA)


PROMPT_SCHEMA = pa.schema([
    ("prompt_id", pa.int32()), ("question_id", pa.int32()), ("pair_id", pa.int32()),
    ("pair_kind", pa.string()), ("order", pa.string()), ("format", pa.string()), ("family", pa.string()),
    ("wording", pa.string()), ("text", pa.string()),
    ("correct", pa.string()), ("wrong", pa.string()), ("input_ids", pa.list_(pa.int32())),
    ("n_tokens", pa.int32()), ("decision_pos", pa.int32()), ("correct_token", pa.int32()),
    ("wrong_token", pa.int32()), ("aligned_positions", pa.list_(pa.int32())), ("first_token", pa.string()),
    ("prompt_last_pos", pa.int32()), ("numbers_pos", pa.int32()),
])
