"""Feature pages (bugscope.features.pages): token roles, the running top-k of corpus contexts, the
per-role table, the HTML page, and the ledger's token-level feature claims on hand-made tables."""

from __future__ import annotations

import itertools

import numpy as np
import polars as pl
import pytest

from bugscope.claims.evaluate import evaluate_claim
from bugscope.claims.spec import load_ledger
from bugscope.features import page_html, pages
from tests.test_claims import LEDGER, ctx

QUESTION = "Which is bigger: 9.8 or 9.11?"
QA_PIECES = ["<|endoftext|>", "Q", ":", " Which", " is", " bigger", ":", " ", "9", ".", "8", " or", " ", "9", ".", "1",
             "1", "?", "\n", "A", ":", " ", "9", "."]
SIMPLE_PIECES = ["<|endoftext|>", "Which", " is", " bigger", ":", " ", "9", ".", "8", " or", " ", "9", ".", "1", "1",
                 "?", "\n", "Answer", ":", " ", "9", "."]


def offsets(pieces: list[str]) -> list[tuple[int, int]]:
    ends = list(itertools.accumulate(len(p) for p in pieces))
    return [(e - len(p), e) for p, e in zip(pieces, ends)]


def test_token_roles_of_both_formats():
    qa_text = "<|endoftext|>Q: " + QUESTION + "\nA:"
    roles = pages.token_roles(offsets(QA_PIECES), qa_text, QUESTION, ("9.8", "9.11"))
    assert dict(zip(range(len(QA_PIECES)), roles)) == {
        0: "sink", 1: "format", 2: "format", 3: "other", 4: "other", 5: "comparison", 6: "other", 7: "other",
        8: "number", 9: "decimal_point", 10: "number", 11: "other", 12: "other", 13: "number", 14: "decimal_point",
        15: "number", 16: "number", 17: "other", 18: "format", 19: "format", 20: "format", 21: "answer",
        22: "answer", 23: "answer"}
    simple_text = "<|endoftext|>" + QUESTION + "\nAnswer:"
    roles = pages.token_roles(offsets(SIMPLE_PIECES), simple_text, QUESTION, ("9.8", "9.11"))
    assert [p for p, r in zip(SIMPLE_PIECES, roles) if r == "format"] == ["\n", "Answer", ":"]
    assert roles.count("number") == 5 and roles.count("decimal_point") == 2 and roles.count("comparison") == 1


def test_token_roles_merged_tokens_and_numbers_inside_numbers():
    # a token covering a digit and the point is a number; "9.8" is not found inside "9.81"
    text = "Is 9.81 larger than 9.8?"
    pieces = ["<s>", "Is", " 9.", "81", " larger", " than", " 9", ".8", "?"]
    roles = pages.token_roles(offsets(pieces), "<s>" + text, text, ("9.81", "9.8"))
    assert roles == ["sink", "other", "number", "number", "comparison", "other", "number", "number", "other"]
    with pytest.raises(ValueError, match="not in the prompt text"):
        pages.token_roles(offsets(pieces), "<s>" + text, "Which is bigger?", ("9.81", "9.8"))


def test_running_top_contexts_match_a_brute_force_whatever_the_chunks():
    rng = np.random.default_rng(0)
    n = 4000
    feat = rng.integers(0, 12, n)
    doc = rng.integers(0, 40, n)
    pos = rng.integers(1, 30, n)
    act = np.round(rng.exponential(1.0, n), 1)  # rounded: ties that the order must break
    act[::7] = 0.0
    wanted = [1, 3, 5, 11]
    expected = (pl.DataFrame({"feature_id": feat, "corpus_id": doc, "position": pos, "activation": act})
                .filter(pl.col("feature_id").is_in(wanted), pl.col("activation") > 0)
                .sort("feature_id", "corpus_id", "activation", "position", descending=[False, False, True, False])
                .unique(["feature_id", "corpus_id"], keep="first")
                .sort("feature_id", "activation", "corpus_id", "position", descending=[False, True, False, False])
                .with_columns(pl.int_range(pl.len()).over("feature_id").alias("rank")).filter(pl.col("rank") < 5))
    for chunk in (n, 997, 50):
        top = pages.TopContexts(wanted, 5)
        for start in range(0, n, chunk):
            s = slice(start, start + chunk)
            top.update(feat[s], doc[s], pos[s], act[s], n_tokens=len(feat[s]))
        got = top.result()
        assert got.select("feature_id", "corpus_id", "position").rows() == \
            expected.select("feature_id", "corpus_id", "position").rows(), chunk
        assert np.allclose(got["activation"].to_numpy(), expected["activation"].to_numpy())
        assert got.group_by("feature_id").agg(pl.col("corpus_id").n_unique() == pl.len())["corpus_id"].all()
        firing = top.firing()
        assert firing["n_corpus_tokens"].to_list() == [n] * 4
        assert np.allclose(firing["corpus_firing_rate"].to_numpy(),
                           [((feat == f) & (act > 0)).sum() / n for f in wanted])


def _tokens(n_pairs: int = 6) -> pl.DataFrame:
    """Two formats x n_pairs prompts, each with one token of every role (two number digits)."""
    rows = []
    pid = 0
    for pair in range(n_pairs):
        for fmt in ("qa", "simple"):
            for pos, (role, tok) in enumerate([("format", "Q"), ("comparison", " bigger"), ("number", "9"),
                                                ("decimal_point", "."), ("number", "8"), ("other", "?"),
                                                ("answer", ".")], start=1):
                rows.append({"prompt_id": pid, "position": pos, "format": fmt, "pair_id": pair, "role": role,
                             "token": tok})
            pid += 1
    return pl.DataFrame(rows).cast({"prompt_id": pl.Int32, "position": pl.Int32, "pair_id": pl.Int32})


def test_token_table_means_rates_shares_and_splits():
    tokens = _tokens()
    # feature 7 fires on the format token (2.0, or 4.0 on odd pairs) and weakly on the first digit
    acts = tokens.filter(pl.col("role") == "format").select(
        "prompt_id", "position", pl.lit(7).alias("feature_id"),
        pl.when(pl.col("pair_id") % 2 == 1).then(4.0).otherwise(2.0).alias("activation"))
    acts = pl.concat([acts, tokens.filter(pl.col("token") == "9").select(
        "prompt_id", "position", pl.lit(7).alias("feature_id"), pl.lit(1.0).alias("activation"))])
    acts = acts.cast({"feature_id": pl.Int32})
    sel = pl.DataFrame({"feature_id": [7, 7], "selection": ["named/format", "buggy_vs_correct_heldout/up"],
                        "rank": [0, 0]}, schema=pages.SELECTION_SCHEMA)
    table = pages.token_table(acts, tokens, sel, layer=3, n_resamples=200, confidence=0.95, seed=1)
    assert set(table.columns) == set(pages.TOKEN_SCHEMA)
    role = table.filter(pl.col("level") == "role", pl.col("selection") == "named/format", pl.col("format") == "qa")
    by = {(r["pairs"], r["role"]): r for r in role.iter_rows(named=True)}
    assert by[("all", "format")]["mean_activation"] == pytest.approx(3.0)
    assert by[("heldout", "format")]["mean_activation"] == pytest.approx(4.0)
    assert by[("all", "format")]["mean_activation_low"] < 3.0 < by[("all", "format")]["mean_activation_high"]
    assert by[("all", "number")]["mean_activation"] == pytest.approx(0.5)  # one digit of two
    assert by[("all", "number")]["firing_rate"] == pytest.approx(0.5)
    assert (by[("all", "number")]["n_tokens"], by[("all", "number")]["n_prompts"], by[("all", "number")]["n_pairs"]) \
        == (12, 6, 6)
    assert by[("heldout", "format")]["n_pairs"] == 3
    assert by[("all", "other")]["mean_activation"] == 0 and by[("all", "other")]["activation_share"] == 0
    shares = role.group_by("pairs").agg(pl.col("activation_share").sum())
    assert np.allclose(shares["activation_share"].to_numpy(), 1.0)
    assert by[("all", "format")]["activation_share"] == pytest.approx(18 / 24)
    tok = table.filter(pl.col("level") == "token", pl.col("pairs") == "all", pl.col("format") == "simple",
                       pl.col("selection") == "named/format", pl.col("role") == "number")
    assert dict(zip(tok["token"], tok["mean_activation"])) == {"9": 1.0, "8": 0.0}
    # the rows of one feature are the same under each selection that chose it
    a, b = (table.filter(pl.col("selection") == s).drop("selection") for s in sel["selection"])
    assert a.equals(b)


def test_page_features_named_and_ranked():
    disc = pl.DataFrame({"layer": [3, 3, 3, 3, 4], "comparison": ["buggy_vs_correct", "buggy_vs_correct",
                                                                  "buggy_vs_correct_heldout", "wrong_vs_right",
                                                                  "buggy_vs_correct"],
                         "direction": ["up", "up", "down", "up", "up"], "rank": [0, 1, 0, 0, 0],
                         "feature_id": [10, 11, 12, 13, 14]})
    got = pages.page_features(disc, {"format": [5, 10]}, 3, top_n=1, focus=True)
    assert got.rows() == [(5, "named/format", 0), (10, "named/format", 1), (10, "buggy_vs_correct/up", 0),
                          (12, "buggy_vs_correct_heldout/down", 0)]
    assert pages.page_features(disc, {}, 3, top_n=1, focus=False).height == 0


def test_page_is_self_contained_and_links_neuronpedia_only_when_it_has_an_id():
    tokens = _tokens(2)
    acts = tokens.filter(pl.col("role") == "format").select("prompt_id", "position", pl.lit(7, pl.Int32).alias(
        "feature_id"), pl.lit(2.0).alias("activation"))
    sel = pl.DataFrame({"feature_id": [7], "selection": ["named/format"], "rank": [0]}, schema=pages.SELECTION_SCHEMA)
    table = pages.token_table(acts, tokens, sel, layer=3, n_resamples=100, confidence=0.95, seed=1)
    contexts = pl.DataFrame({"feature_id": [7], "rank": [0], "corpus_id": [4], "position": [9], "activation": [3.5],
                             "source": ["lee_background"], "left": ["the <b>bold"], "token": [":"],
                             "right": [" after\n"]})
    firing = pl.DataFrame({"feature_id": [7], "corpus_firing_rate": [0.01], "n_corpus_tokens": [1000]})
    kw = dict(layer=3, header={"title": "Feature pages: SAE set main, layer 3", "model": "m"}, features=sel,
              tokens=table, contexts=contexts, firing=firing, formats=["qa", "simple"])
    page = page_html.render_page(**kw, neuronpedia_id=None, no_neuronpedia_reason="trained here")
    assert "<script" not in page and "http" not in page and "<link" not in page
    assert "none: trained here" in page and "the &lt;b&gt;bold" in page and "<span class=hit>:</span>" in page
    assert "Feature 7" in page and "named/format #1" in page and "1.00 % of 1000 corpus tokens" in page
    page = page_html.render_page(**kw, neuronpedia_id="llama3.1-8b/10-llamascope-mlp-32k", no_neuronpedia_reason="")
    assert "https://www.neuronpedia.org/llama3.1-8b/10-llamascope-mlp-32k/7" in page


def test_neuronpedia_ids_come_from_sae_lens_directory():
    assert pages.neuronpedia_id({"source": "pretrained", "release": "llama_scope_lxm_8x", "sae_id": "l10m_8x"})[0] \
        == "llama3.1-8b/10-llamascope-mlp-32k"
    np_id, why = pages.neuronpedia_id({"source": "train", "release": None, "sae_id": None})
    assert np_id is None and "trained here" in why
    np_id, why = pages.neuronpedia_id({"source": "pretrained", "release": "no-such-release", "sae_id": "x"})
    assert np_id is None and "no Neuronpedia id" in why


# --- the ledger's token-level feature claims ---------------------------------------------------------

def role_rows(feature: int, means: dict[str, float], *, layer: int = 10, selection: str = "named/format",
              rank: int = 0, pairs: str = "all", fmt: str = "qa", rate: float = 0.9, ci: float = 0.2,
              n_pairs: int = 10) -> pl.DataFrame:
    """Hand-made feature_tokens role rows of one feature (every role; unlisted roles at 0), each mean
    with the bootstrap interval mean +/- `ci` (never below 0) over `n_pairs` number pairs: 10 is the
    fewest from which a bootstrap interval decides."""
    rows = []
    for role in page_html.ROLES:
        m = means.get(role, 0.0)
        rows.append({"layer": layer, "feature_id": feature, "selection": selection, "rank": rank, "pairs": pairs,
                     "format": fmt, "level": "role", "role": role, "token": "", "n_tokens": 4 * n_pairs,
                     "n_prompts": 2 * n_pairs, "n_pairs": n_pairs, "mean_activation": m,
                     "mean_activation_low": max(m - ci, 0.0),
                     "mean_activation_high": m + ci, "firing_rate": rate if m > 0 else 0.0,
                     "firing_rate_low": 0.0, "firing_rate_high": 1.0, "activation_share": None})
    return pl.DataFrame(rows, schema=pages.TOKEN_SCHEMA)


def ledger() -> dict:
    return {c["id"]: c for c in load_ledger(LEDGER)}


def llama():
    return ctx(model="Llama-3.1-8B-Instruct", focus=(10,), num_layers=32, num_heads=32)


def lxm(df: pl.DataFrame) -> dict:
    """The table as the ledger sees it on a run whose MLP-output set is `mlp_out`."""
    return {"feature_tokens": df.with_columns(pl.lit("mlp_out").alias("sae_set"))}


SEED_FORMAT_FEATURES = (22441, 18967, 14782)


def test_format_token_claim_literal_needs_every_seed_feature_on_format_tokens():
    # Decided on intervals: the format-token CI above every other role's CI (and above 0) passes.
    c = ledger()["feature_format_tokens"]
    good = pl.concat([role_rows(f, {"format": 3.0, "number": 1.0, "other": 0.5}) for f in SEED_FORMAT_FEATURES])
    r = evaluate_claim(c, lxm(good), llama())
    assert r["form"] == "literal" and r["verdict"] == "holds", r["detail"]
    assert r["measured"] == 3.0 and (r["ci_low"], r["ci_high"]) == pytest.approx((2.8, 3.2)) and r["n"] == 10
    # 14782's format-token CI [0.8, 1.2] lies entirely below its number-token CI [1.8, 2.2]: fails
    bad = pl.concat([role_rows(f, {"format": 3.0, "number": 1.0}) for f in SEED_FORMAT_FEATURES[:2]]
                    + [role_rows(14782, {"format": 1.0, "number": 2.0})])
    r = evaluate_claim(c, lxm(bad), llama())
    assert r["verdict"] == "fails" and "check 3: 1 [0.8, 1.2]" in r["detail"], r["detail"]
    # 14782 never fires (every CI [0, 0]): "its format-token mean has a CI above 0" is shown false
    silent = pl.concat([good.filter(pl.col("feature_id") != 14782), role_rows(14782, {}, ci=0.0)])
    r = evaluate_claim(c, lxm(silent), llama())
    assert r["verdict"] == "fails" and "mean_activation interval [0, 0] above 0 -> fail" in r["detail"], r["detail"]
    # on format tokens, but the CIs overlap the other roles' and reach 0: neither shown nor refuted
    weak = pl.concat([role_rows(f, {"format": 0.1, "number": 0.05}) for f in SEED_FORMAT_FEATURES])
    assert evaluate_claim(c, lxm(weak), llama())["verdict"] == "inconclusive"
    # the good table over 9 number pairs: a degenerate bootstrap decides nothing
    few = pl.concat([role_rows(f, {"format": 3.0, "number": 1.0, "other": 0.5}, n_pairs=9)
                     for f in SEED_FORMAT_FEATURES])
    r = evaluate_claim(c, lxm(few), llama())
    assert r["verdict"] == "inconclusive" and "fewer than 10" in r["detail"], r["detail"]
    # one of the ids missing (not named in the run): the literal form is not testable
    missing = evaluate_claim(c, lxm(good.filter(pl.col("feature_id") != 14782)), llama())
    assert missing["verdict"] == "not testable here" and "14782" in missing["detail"], missing["detail"]


def test_format_token_claim_agnostic_reads_the_heldout_ranked_feature_on_heldout_pairs():
    c = ledger()["feature_format_tokens"]
    sel = dict(layer=5, selection="buggy_vs_correct_heldout/up", rank=0)

    def table(heldout_means):
        return {"feature_tokens": pl.concat([
            role_rows(42, {"format": 3.0, "answer": 1.0}, pairs="all", **sel),  # all pairs: format tokens
            role_rows(42, heldout_means, pairs="heldout", **sel),
            role_rows(42, {"answer": 9.0}, pairs="heldout", fmt="simple", **sel),  # the other format: not read
            role_rows(43, {"answer": 9.0}, pairs="heldout", layer=5, selection="buggy_vs_correct_heldout/up",
                      rank=1)])}
    r = evaluate_claim(c, table({"format": 2.0, "answer": 1.5}), ctx(focus=(5,)))
    assert r["form"] == "agnostic" and r["verdict"] == "holds" and "feature_id=42" in r["selected"], r["detail"]
    assert r["measured"] == 2.0
    # on the held-out pairs it fires more on the answer tokens: fails, whatever all pairs say
    r = evaluate_claim(c, table({"format": 2.0, "answer": 2.5}), ctx(focus=(5,)))
    assert r["verdict"] == "fails" and r["measured"] == 2.0


@pytest.mark.parametrize("cid, feature, role, rivals_ignored", [
    ("feature_9823_numbers", 9823, "number", ("decimal_point", "answer")),
    ("feature_15604_comparison_word", 15604, "comparison", ()),
    ("feature_27391_decimal_point", 27391, "decimal_point", ("answer",)),
])
def test_numerical_feature_claims(cid, feature, role, rivals_ignored):
    c = ledger()[cid]
    assert all(f["form"] == "literal" for f in c["forms"])  # no agnostic form: see config/claims.yaml

    def verdict(means, **kw) -> str:
        return evaluate_claim(c, lxm(role_rows(feature, means, **kw)), llama())["verdict"]

    # CI [1.8, 2.2], above every compared role's (the ignored rivals may be higher)
    holds = evaluate_claim(c, lxm(role_rows(feature, {role: 2.0, "other": 0.5, **{
        r: 5.0 for r in rivals_ignored}})), llama())
    assert holds["verdict"] == "holds" and holds["measured"] == 2.0, holds["detail"]
    # another role (format) is higher, its CI [2.3, 2.7] entirely above: fails
    assert verdict({role: 2.0, "format": 2.5}) == "fails"
    # format at 2.1 [1.9, 2.3]: the intervals overlap, so "higher than every other role" is not shown
    assert verdict({role: 2.0, "format": 2.1}) == "inconclusive"
    # highest there but firing on a fifth of those tokens only: firing_rate is a point condition, which
    # can only withhold the verdict
    r = evaluate_claim(c, lxm(role_rows(feature, {role: 2.0}, rate=0.2)), llama())
    assert r["verdict"] == "inconclusive" and "firing_rate=0.2 at_least 0.5 -> not met" in r["detail"], r["detail"]
    # over 9 number pairs: decides nothing, in either direction
    assert verdict({role: 2.0}, n_pairs=9) == "inconclusive"
    assert verdict({role: 2.0, "format": 2.5}, n_pairs=9) == "inconclusive"
    # on the embedded model (or without the feature) it is not testable
    assert evaluate_claim(c, lxm(role_rows(feature, {role: 2.0})), ctx())["verdict"] == "not testable here"
    assert evaluate_claim(c, lxm(role_rows(1, {role: 2.0})), llama())["verdict"] == "not testable here"


def test_token_table_is_the_same_bits_whatever_the_row_order():
    # Values whose float sums depend on their order (not exact binary fractions), rows shuffled:
    # a rerun must write the same table, bit for bit.
    tokens = _tokens()
    rng = np.random.default_rng(0)
    acts = pl.concat([tokens.select("prompt_id", "position", pl.lit(f).alias("feature_id"),
                                    pl.Series("activation", rng.uniform(0.1, 3.3, tokens.height)))
                      for f in (7, 11)]).cast({"feature_id": pl.Int32})
    sel = pl.DataFrame({"feature_id": [7, 11], "selection": ["named/format", "named/format"], "rank": [0, 1]},
                       schema=pages.SELECTION_SCHEMA)
    tables = []
    for seed in range(3):
        order = np.random.default_rng(seed + 1)
        shuffled_acts = acts[order.permutation(acts.height).tolist()]
        shuffled_tokens = tokens[order.permutation(tokens.height).tolist()]
        tables.append(pages.token_table(shuffled_acts, shuffled_tokens, sel, layer=3, n_resamples=50,
                                        confidence=0.95, seed=1))
    assert tables[0].height > 0
    assert tables[0].equals(tables[1]) and tables[0].equals(tables[2])
