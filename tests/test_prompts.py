"""Prompt construction, decision tokens and cross-format alignment on the real tokenizer."""

import copy

import polars as pl
import pytest

from bugscope.data.prompts import PromptError, build_prompt_table, draw_number_pairs, pair_kind


@pytest.fixture(scope="module")
def table(ci_config, embedded):
    return pl.from_arrow(build_prompt_table(ci_config, embedded[1]))


def test_pairs_are_seeded_and_valid(ci_config):
    pairs = draw_number_pairs(ci_config["prompts"], seed=0)
    assert pairs == draw_number_pairs(ci_config["prompts"], seed=0)
    assert pairs != draw_number_pairs(ci_config["prompts"], seed=1)
    assert pairs[0] == ("9.8", "9.11")
    kinds = [pair_kind(*p) for p in pairs]
    p = ci_config["prompts"]
    assert kinds.count("shorter_bigger") == p["n_pairs"] + 1
    assert kinds.count("longer_bigger") == p["control_pairs"]["longer_bigger"] > 0
    assert kinds.count("same_length") == p["control_pairs"]["same_length"] > 0
    lengths = {"shorter_bigger": (1, 2), "longer_bigger": (2, 1), "same_length": (1, 1)}
    for (correct, wrong), kind in zip(pairs, kinds):
        (x, y), (x2, zw) = correct.split("."), wrong.split(".")
        # every kind diverges at the first decimal digit, the correct one's being larger
        assert x == x2 and (len(y), len(zw)) == lengths[kind] and int(y[0]) > int(zw[0])
        assert float(correct) > float(wrong)
    # Adding control pairs leaves the bug's pairs where they were.
    none = {**p, "control_pairs": {"longer_bigger": 0, "same_length": 0}}
    assert draw_number_pairs(none, seed=0) == [q for q, k in zip(pairs, kinds) if k == "shorter_bigger"]


def test_decision_tokens_on_the_seed_prompt(table, embedded):
    tok = embedded[1]
    row = table.filter((pl.col("pair_id") == 0) & (pl.col("format") == "qa") & (pl.col("order") == "correct_first")).row(0, named=True)
    # Every non-chat format starts with the same token (prompts.first_token), the attention sink.
    assert row["text"] == "<|endoftext|>Q: Which is bigger: 9.8 or 9.11?\nA:"
    assert set(table.filter(pl.col("format") != "chat")["first_token"]) == {"<|endoftext|>"}
    # The input is the prompt plus the shared answer tokens "9." and the decision is the next digit.
    assert tok.decode(row["input_ids"]) == "<|endoftext|>Q: Which is bigger: 9.8 or 9.11?\nA: 9."
    assert row["decision_pos"] == len(row["input_ids"]) - 1
    assert tok.decode([row["correct_token"]]) == "8"
    assert tok.decode([row["wrong_token"]]) == "1"


def test_prompt_last_is_the_colon_before_the_answer(table, embedded):
    # The original study read its features at the prompt's last token: the ":" of "A:" / "Answer:".
    tok = embedded[1]
    for row in table.filter(pl.col("format") != "chat").iter_rows(named=True):
        assert tok.decode([row["input_ids"][row["prompt_last_pos"]]]) == ":"
        assert row["prompt_last_pos"] < row["decision_pos"]
    from bugscope.model.cache import positions_for

    row = table.row(0, named=True)
    assert row["prompt_last_pos"] in positions_for(row, "aligned")


def test_every_prompt_continues_to_its_answers(table, embedded):
    tok = embedded[1]
    for row in table.iter_rows(named=True):
        for answer, token in ((row["correct"], row["correct_token"]), (row["wrong"], row["wrong_token"])):
            full = tok(row["text"] + " " + answer, add_special_tokens=True)["input_ids"]
            assert full[: len(row["input_ids"])] == row["input_ids"]
            assert full[len(row["input_ids"])] == token


def test_aligned_positions_hold_the_same_tokens_across_formats(table):
    n_formats = table["format"].n_unique()
    for _, group in table.group_by("question_id"):
        assert group.height == n_formats
        rows = group.to_dicts()
        lengths = {len(r["aligned_positions"]) for r in rows}
        assert len(lengths) == 1 and lengths.pop() >= 10
        for i in range(len(rows[0]["aligned_positions"])):
            tokens = {r["input_ids"][r["aligned_positions"][i]] for r in rows}
            assert len(tokens) == 1, f"aligned index {i} holds different tokens: {tokens}"
        for r in rows:
            assert r["aligned_positions"][-1] == r["decision_pos"]
            assert r["aligned_positions"] == sorted(r["aligned_positions"])


def test_answers_that_never_diverge_are_an_error(ci_config, embedded):
    cfg = copy.deepcopy(ci_config)
    cfg["prompts"]["extra_pairs"] = [["9.8", "9.8"]]
    cfg["prompts"]["n_pairs"] = 0
    with pytest.raises(PromptError, match="never diverge"):
        build_prompt_table(cfg, embedded[1])


def test_formats_that_cannot_be_aligned_are_an_error(ci_config, embedded, monkeypatch):
    """A format whose text does not contain the question verbatim shares no question token."""
    from bugscope.data import prompts as P

    original = P.render

    def render(fmt, question, tokenizer, first_token=""):
        text, special = original(fmt, question, tokenizer, first_token)
        return (text.upper(), special) if fmt["template"].startswith("Q:") else (text, special)

    monkeypatch.setattr(P, "render", render)
    with pytest.raises(PromptError, match="cannot be aligned") as err:
        build_prompt_table(ci_config, embedded[1])
    assert "question 0 (9.8 vs 9.11, correct_first)" in str(err.value)


def test_empty_prompt_set_is_an_error(ci_config, embedded):
    cfg = copy.deepcopy(ci_config)
    cfg["prompts"]["extra_pairs"] = []
    cfg["prompts"]["n_pairs"] = 0
    cfg["prompts"]["control_pairs"] = {"longer_bigger": 0, "same_length": 0}
    with pytest.raises(PromptError, match="empty"):
        build_prompt_table(cfg, embedded[1])
