"""Feature pages: what a researcher reads to judge a feature (workflow rule feature_pages).

For the named features of an SAE set (sae.sets[].named) and the top discriminative features of
each focus layer (features.pages.top_n per direction of the buggy-vs-correct rankings):

- its top-activating contexts in the SAE corpus: the cached corpus activations of the layer are
  encoded by the set's SAE one row group at a time, and a running top-k per feature (at most one
  context per corpus sequence) keeps memory at n_features x n_contexts whatever the corpus size;
- its activation on the tokens of the analysis prompts by token *role* (`token_roles`): the
  digits of the two numbers, the decimal point, the comparison word, the format's own tokens
  (the template around the question: "Q", ":", "A", "Answer", newlines), the answer tokens
  after the prompt (the decision position is the last), and the rest of the question. Values
  come from the set's feature table of the prompts, so they cover the positions the cache holds
  (cache.positions: `aligned` holds the question, the shared answer tokens and the prompt's
  last token, the ":" of "A:"; `all` holds every token);
- its Neuronpedia page, when the SAE-Lens release names one (`neuronpedia` in pretrained_saes.yaml).

One self-contained HTML page per layer (bugscope.features.page_html: no script, no external file) and two tables:
feature_tokens (per role and per token string, with cluster-bootstrap CIs over number pairs) and
feature_contexts.
"""

from __future__ import annotations

import logging
import re
from typing import Iterable, Sequence

import numpy as np
import polars as pl

from bugscope.data.prompts import is_selection_pair
from bugscope.features.page_html import render_index, render_page
from bugscope.stats import cluster_bootstrap_mean_ci_columns

log = logging.getLogger("bugscope.features")

SINK_ROLE = "sink"  # position 0, the attention sink: never in the tables
COMPARISON_WORDS = ("bigger", "larger", "greater", "smaller", "higher", "lower", "more", "less")
PAIR_SPLITS = ("all", "heldout")  # heldout: the odd pair ids (the even ones rank buggy_vs_correct_heldout)
# The rankings of the discriminative table a page shows (the split one is what the claims read).
RANKINGS = ("buggy_vs_correct", "buggy_vs_correct_heldout")


# --- token roles ------------------------------------------------------------------------------------

def _number_spans(question: str, numbers: Sequence[str]) -> list[tuple[int, int]]:
    """Character spans of the numbers in the question (a number is not matched inside a longer one)."""
    spans = []
    for number in dict.fromkeys(numbers):
        for m in re.finditer(rf"(?<![\d.]){re.escape(number)}(?![\d])", question):
            spans.append((m.start(), m.end()))
    return sorted(spans)


def _word_spans(question: str, words: Iterable[str]) -> list[tuple[int, int]]:
    pattern = r"\b(" + "|".join(re.escape(w) for w in words) + r")\b"
    return [(m.start(), m.end()) for m in re.finditer(pattern, question, flags=re.IGNORECASE)]


def token_roles(offsets: Sequence[tuple[int, int]], text: str, question: str, numbers: Sequence[str],
                comparison_words: Iterable[str] = COMPARISON_WORDS) -> list[str]:
    """The role of each token of one prompt (ROLES, or SINK_ROLE for position 0).

    `offsets` are the tokens' character spans in `text` followed by the answer prefix and answer
    (as the tokenizer's offset mapping gives them); `question` is the question as it appears in
    `text`; `numbers` are its two numbers. A token inside the question is a number when it covers a
    digit of a number, a decimal point when the only characters of a number it covers are its
    ".", the comparison word when it overlaps one of `comparison_words`, else other. A token of
    the prompt text outside the question is a format token (the template's own text, the part that
    differs between formats); a token after the prompt text is an answer token.
    """
    q0 = text.find(question)
    if q0 < 0:
        raise ValueError(f"the question {question!r} is not in the prompt text {text!r}")
    q1 = q0 + len(question)
    num = [(q0 + s, q0 + e) for s, e in _number_spans(question, numbers)]
    words = [(q0 + s, q0 + e) for s, e in _word_spans(question, comparison_words)]
    roles = []
    for pos, (s, e) in enumerate(offsets):
        if pos == 0:
            roles.append(SINK_ROLE)
        elif e <= s:
            roles.append("other")  # a token with no characters (an added special token)
        elif s >= len(text):
            roles.append("answer")
        elif max(s, q0) < min(e, q1):
            covered = [text[i] for a, b in num for i in range(max(s, a), min(e, b))]
            if any(c.isdigit() for c in covered):
                roles.append("number")
            elif covered:
                roles.append("decimal_point")
            elif any(max(s, a) < min(e, b) for a, b in words):
                roles.append("comparison")
            else:
                roles.append("other")
        else:
            roles.append("format")
    return roles


def prompt_tokens(prompts: pl.DataFrame, config: dict, tokenizer) -> pl.DataFrame:
    """(prompt_id, position, format, pair_id, role, token) of every token of `prompts` but the sink.

    The offsets come from tokenizing the prompt as bugscope.data.prompts did (text + answer prefix +
    correct answer), checked to give the prompt table's input_ids.
    """
    from bugscope.data.prompts import render

    pcfg = config["prompts"]
    rows = {k: [] for k in ("prompt_id", "position", "format", "pair_id", "role", "token")}
    for r in prompts.iter_rows(named=True):
        fmt = pcfg["formats"][r["format"]]
        a, b = (r["correct"], r["wrong"]) if r["order"] == "correct_first" else (r["wrong"], r["correct"])
        question = pcfg["question"].replace("{a}", a).replace("{b}", b)
        special = bool(fmt.get("chat_template"))
        if special:
            render(fmt, question, tokenizer)  # the chat template's text is the prompt table's text
        enc = tokenizer(r["text"] + fmt["answer_prefix"] + r["correct"], add_special_tokens=not special,
                        return_offsets_mapping=True)
        ids = list(r["input_ids"])
        if enc["input_ids"][:len(ids)] != ids:
            raise ValueError(f"prompt {r['prompt_id']}: tokenizing its text again does not give its input_ids; the "
                             "prompt table was made with another tokenizer. Rerun build_prompts.")
        roles = token_roles(enc["offset_mapping"][:len(ids)], r["text"], question, (r["correct"], r["wrong"]))
        for pos, (tok, role) in enumerate(zip(ids, roles)):
            if role == SINK_ROLE:
                continue
            rows["prompt_id"].append(r["prompt_id"])
            rows["position"].append(pos)
            rows["format"].append(r["format"])
            rows["pair_id"].append(r["pair_id"])
            rows["role"].append(role)
            rows["token"].append(tokenizer.decode([tok]))
    return pl.DataFrame(rows, schema={"prompt_id": pl.Int32, "position": pl.Int32, "format": pl.String,
                                      "pair_id": pl.Int32, "role": pl.String, "token": pl.String})


# --- which features a page shows --------------------------------------------------------------------

SELECTION_SCHEMA = {"feature_id": pl.Int32, "selection": pl.String, "rank": pl.Int32}


def page_features(discriminative: pl.DataFrame, named: dict[str, list[int]], layer: int, *, top_n: int,
                  focus: bool) -> pl.DataFrame:
    """(feature_id, selection, rank) of one page layer: the named features (selection
    `named/<category>`, rank = index in its list) and, at a focus layer, the top `top_n` of each
    direction of each buggy-vs-correct ranking (`<comparison>/<direction>`, rank = its rank)."""
    rows = [{"feature_id": int(f), "selection": f"named/{cat}", "rank": i}
            for cat, ids in named.items() for i, f in enumerate(ids)]
    if focus and top_n:
        top = discriminative.filter(pl.col("layer") == layer, pl.col("comparison").is_in(list(RANKINGS)),
                                    pl.col("rank") < top_n)
        rows += [{"feature_id": int(r["feature_id"]), "selection": f"{r['comparison']}/{r['direction']}",
                  "rank": int(r["rank"])} for r in top.sort("comparison", "direction", "rank").iter_rows(named=True)]
    return pl.DataFrame(rows, schema=SELECTION_SCHEMA)


# --- top corpus contexts: a running top-k per feature -------------------------------------------------

class TopContexts:
    """The `n` highest activations of each of `feature_ids`, at most one per document (corpus
    sequence), over any number of `update` calls: memory holds n rows per feature plus one chunk.
    Ties go to the lower document id, then the lower position, so the result does not depend on
    how the stream is chunked."""

    def __init__(self, feature_ids: Iterable[int], n: int):
        self.features = np.unique(np.asarray(list(feature_ids), dtype=np.int64))
        self.n = n
        self.f = np.zeros(0, np.int64)
        self.d = np.zeros(0, np.int64)
        self.p = np.zeros(0, np.int64)
        self.a = np.zeros(0, np.float64)
        self.n_tokens = 0
        self.n_active = np.zeros(len(self.features), np.int64)

    def update(self, feature: np.ndarray, doc: np.ndarray, pos: np.ndarray, act: np.ndarray,
               n_tokens: int = 0) -> None:
        """Add one chunk's non-zero (feature, document, position, activation); `n_tokens`: the
        chunk's token count (for the firing rate)."""
        feature = np.asarray(feature, np.int64)
        keep = np.isin(feature, self.features) & (np.asarray(act) > 0)
        f, d, p, a = feature[keep], np.asarray(doc, np.int64)[keep], np.asarray(pos, np.int64)[keep], \
            np.asarray(act, np.float64)[keep]
        self.n_tokens += n_tokens
        self.n_active += np.bincount(np.searchsorted(self.features, f), minlength=len(self.features))
        f, d, p, a = (np.concatenate([x, y]) for x, y in ((self.f, f), (self.d, d), (self.p, p), (self.a, a)))
        # the best position of each (feature, document) ...
        o = np.lexsort((p, -a, d, f))
        f, d, p, a = f[o], d[o], p[o], a[o]
        first = np.ones(len(f), bool)
        first[1:] = (f[1:] != f[:-1]) | (d[1:] != d[:-1])
        f, d, p, a = f[first], d[first], p[first], a[first]
        # ... then the n best documents of each feature
        o = np.lexsort((p, d, -a, f))
        f, d, p, a = f[o], d[o], p[o], a[o]
        start = np.searchsorted(f, f, side="left")
        keep = np.arange(len(f)) - start < self.n
        self.f, self.d, self.p, self.a = f[keep], d[keep], p[keep], a[keep]

    def result(self) -> pl.DataFrame:
        """(feature_id, rank, corpus_id, position, activation), rank 0 = highest."""
        start = np.searchsorted(self.f, self.f, side="left")
        return pl.DataFrame({"feature_id": self.f.astype(np.int32), "rank": (np.arange(len(self.f)) - start).astype(np.int32),
                             "corpus_id": self.d.astype(np.int32), "position": self.p.astype(np.int32),
                             "activation": self.a.astype(np.float32)})

    def firing(self) -> pl.DataFrame:
        """(feature_id, corpus_firing_rate, n_corpus_tokens) over every token seen."""
        rate = self.n_active / self.n_tokens if self.n_tokens else np.full(len(self.features), np.nan)
        return pl.DataFrame({"feature_id": self.features.astype(np.int32), "corpus_firing_rate": rate,
                             "n_corpus_tokens": np.full(len(self.features), self.n_tokens, np.int64)})


def corpus_top_contexts(sae, activations_path, feature_ids: Iterable[int], *, n: int, exclude_ids: Iterable[int] = (),
                        batch_size: int = 4096) -> TopContexts:
    """Encode one layer's cached corpus activations with `sae`, one row group at a time, keeping
    the top `n` contexts of each of `feature_ids` (corpus sequences in `exclude_ids` are skipped)."""
    from bugscope.sae.activations import ActivationSource, iter_activations
    from bugscope.sae.encode import encode_sparse

    top = TopContexts(feature_ids, n)
    excluded = np.asarray(sorted(set(int(i) for i in exclude_ids)), dtype=np.int64)
    for ids, pos, x in iter_activations([ActivationSource(str(activations_path))]):
        keep = ~np.isin(ids, excluded)
        if not keep.all():
            ids, pos, x = ids[keep], pos[keep], x[np.nonzero(keep)[0]]
        if len(ids) == 0:
            continue
        r, f, v = encode_sparse(sae, x, batch_size=batch_size)
        r = r.numpy()
        top.update(f.numpy(), ids[r], pos[r], v.numpy(), n_tokens=len(ids))
    return top


def decode_contexts(top: pl.DataFrame, corpus: pl.DataFrame, tokenizer, window: int) -> pl.DataFrame:
    """`top` with the context of each row: `left` and `right` (up to `window` tokens either side,
    decoded) and `token` (the token the feature fires on), plus the sequence's `source`."""
    docs = {r["prompt_id"]: r for r in corpus.filter(pl.col("prompt_id").is_in(top["corpus_id"].unique().to_list()))
            .iter_rows(named=True)}
    left, token, right, source = [], [], [], []
    for r in top.iter_rows(named=True):
        doc = docs[r["corpus_id"]]
        ids, p = list(doc["input_ids"]), r["position"]
        left.append(tokenizer.decode(ids[max(0, p - window):p]))
        token.append(tokenizer.decode(ids[p:p + 1]))
        right.append(tokenizer.decode(ids[p + 1:p + 1 + window]))
        source.append(doc["source"])
    return top.with_columns(pl.Series("source", source, pl.String), pl.Series("left", left, pl.String),
                            pl.Series("token", token, pl.String), pl.Series("right", right, pl.String))


# --- activation per token role of the analysis prompts ------------------------------------------------

TOKEN_SCHEMA = {
    "layer": pl.Int32, "feature_id": pl.Int32, "selection": pl.String, "rank": pl.Int32, "pairs": pl.String,
    "format": pl.String, "level": pl.String, "role": pl.String, "token": pl.String, "n_tokens": pl.Int64,
    "n_prompts": pl.Int64, "n_pairs": pl.Int64, "mean_activation": pl.Float64, "mean_activation_low": pl.Float64,
    "mean_activation_high": pl.Float64, "firing_rate": pl.Float64, "firing_rate_low": pl.Float64,
    "firing_rate_high": pl.Float64, "activation_share": pl.Float64,
}


def _cluster_means(per_prompt: pl.DataFrame, keys: list[str], value: str, *, n_resamples: int, confidence: float,
                   seed: int) -> pl.DataFrame:
    """Per `keys`: the mean over prompts of `value` (one value per prompt) and its cluster-bootstrap
    CI over number pairs (pair_id)."""
    cols = per_prompt.select(keys).unique(maintain_order=True).sort(keys).with_row_index("_col")
    prompts = per_prompt.select("prompt_id", "pair_id").unique().sort("prompt_id").with_row_index("_row")
    long = per_prompt.join(cols, on=keys).join(prompts.select("prompt_id", "_row"), on="prompt_id")
    matrix = np.full((prompts.height, cols.height), np.nan)
    matrix[long["_row"].to_numpy(), long["_col"].to_numpy()] = long[value].to_numpy()
    mean, low, high = cluster_bootstrap_mean_ci_columns(matrix, prompts["pair_id"].to_numpy(),
                                                        n_resamples=n_resamples, confidence=confidence, seed=seed)
    return cols.drop("_col").with_columns(pl.Series(value, mean), pl.Series(f"{value}_low", low),
                                          pl.Series(f"{value}_high", high))


def token_table(acts: pl.DataFrame, tokens: pl.DataFrame, selections: pl.DataFrame, *, layer: int,
                n_resamples: int, confidence: float, seed: int) -> pl.DataFrame:
    """The feature_tokens rows of one layer.

    `acts`: (prompt_id, position, feature_id, activation), the non-zeros of the set's feature
    table; `tokens`: (prompt_id, position, format, pair_id, role, token) of the positions the cache
    holds; `selections`: (feature_id, selection, rank). Per feature, pair split (all pairs, or the
    held-out odd pair ids), format and role (level `role`, token "") or, on all pairs, role and
    token string (level `token`): the mean activation, over prompts, of each prompt's mean over
    those tokens, the firing rate (share of those tokens where it is > 0) likewise, both with
    percentile CIs that resample number pairs on the role rows (null on the token rows: many
    columns, and no claim reads them); `activation_share`: those tokens' share of the feature's summed
    activation over all the format's tokens (pooled); n_tokens, n_prompts, n_pairs.
    """
    features = selections.select("feature_id").unique()
    if features.height == 0 or tokens.height == 0:
        return pl.DataFrame(schema=TOKEN_SCHEMA)
    dense = (tokens.join(features, how="cross")
             .join(acts.select("prompt_id", "position", "feature_id", "activation"),
                   on=["prompt_id", "position", "feature_id"], how="left")
             .with_columns(pl.col("activation").fill_null(0.0).cast(pl.Float64))
             # Float sums depend on the order of their terms, and joins and group_by keep none: every
             # mean below sums rows in this order (maintain_order), so a rerun writes the same bits.
             .sort("prompt_id", "position", "feature_id"))
    out = []
    for split in PAIR_SPLITS:
        part = dense if split == "all" else dense.filter(~is_selection_pair(pl.col("pair_id")))
        if part.height == 0:
            continue
        totals = part.group_by("feature_id", "format", maintain_order=True).agg(pl.col("activation").sum().alias("_total"))
        levels = [("role", ["feature_id", "format", "role"])]
        if split == "all":  # per token string: all pairs, point estimates (the page lists them)
            levels.append(("token", ["feature_id", "format", "role", "token"]))
        for level, keys in levels:
            per_prompt = part.group_by(*keys, "prompt_id", "pair_id", maintain_order=True).agg(
                pl.col("activation").mean().alias("mean_activation"),
                (pl.col("activation") > 0).mean().alias("firing_rate"),
                pl.col("activation").sum().alias("_sum"), pl.len().alias("_n"))
            if level == "role":
                means = _cluster_means(per_prompt, keys, "mean_activation", n_resamples=n_resamples,
                                       confidence=confidence, seed=seed)
                rates = _cluster_means(per_prompt, keys, "firing_rate", n_resamples=n_resamples,
                                       confidence=confidence, seed=seed)
            else:
                means, rates = (per_prompt.group_by(keys, maintain_order=True).agg(pl.col(v).mean())
                                for v in ("mean_activation", "firing_rate"))
            counts = per_prompt.group_by(keys, maintain_order=True).agg(
                pl.col("_n").sum().alias("n_tokens"), pl.col("prompt_id").n_unique().alias("n_prompts"),
                pl.col("pair_id").n_unique().alias("n_pairs"), pl.col("_sum").sum().alias("_sum"))
            rows = (means.join(rates, on=keys).join(counts, on=keys).join(totals, on=["feature_id", "format"])
                    .with_columns(pl.when(pl.col("_total") > 0).then(pl.col("_sum") / pl.col("_total"))
                                  .otherwise(None).alias("activation_share"),
                                  pl.lit(split).alias("pairs"), pl.lit(level).alias("level")))
            if level == "role":
                rows = rows.with_columns(pl.lit("").alias("token"))
            out.append(rows.drop("_sum", "_total"))
    table = pl.concat(out, how="diagonal_relaxed").join(selections, on="feature_id")
    return (table.with_columns(pl.lit(layer).alias("layer"))
            .select(list(TOKEN_SCHEMA)).cast(TOKEN_SCHEMA)
            .sort("selection", "rank", "pairs", "format", "level", "role", "token"))


# --- the stage -----------------------------------------------------------------------------------

def neuronpedia_id(provenance: dict) -> tuple[str | None, str]:
    """(the Neuronpedia id of an SAE, or None with the reason): SAE-Lens's directory entry of its
    release and id; SAEs trained here have none."""
    from bugscope.sae.directory import release_saes

    release, sae_id = provenance.get("release"), provenance.get("sae_id")
    if provenance.get("source") == "train" or not release:
        return None, "this SAE was trained here (the demo SAEs), so Neuronpedia has no page for its features"
    try:
        found = release_saes(release).get(sae_id)
    except KeyError:
        found = None
    if not found:
        return None, f"SAE-Lens's directory gives no Neuronpedia id for {release} / {sae_id}"
    return found, ""


def page_layers(config: dict, focus: Sequence[int]) -> tuple[list[int], list[int]]:
    """(page layers, focus layers the set covers): the set's focus layers and its named layers."""
    covered = set(config["sae_set"]["layers"])
    named = {int(layer) for layer in config["sae_set"]["named"]}
    on_set = sorted(set(focus) & covered)
    return sorted(set(on_set) | (named & covered)), on_set


def run_pages(config: dict, tokenizer, *, prompts_path, corpus_path, discriminative_path, overlap,
              feature_paths: dict[int, str], corpus_paths: dict[int, str], sae_dirs: dict[int, str],
              device: str = "cpu") -> tuple[pl.DataFrame, pl.DataFrame, dict[str, str], dict]:
    """(feature_tokens, feature_contexts, {file name: HTML}, metadata) of one SAE set
    (`config["sae_set"]`, bugscope.config.with_sae_set); `overlap`: the primary set's overlap table
    (None: focus_layers is a list) for the focus layers."""
    from bugscope import tables
    from bugscope.data.prompts import BUG_PAIR_KIND
    from bugscope.features.named import named_feature_ids
    from bugscope.focus import resolve_focus_layers
    from bugscope.model.sites import hook_name
    from bugscope.sae.store import load_sae
    from bugscope.stats import derived_seed

    s, pcfg, pages_cfg, boot = config["sae_set"], config["prompts"], config["feature_pages"], config["bootstrap"]
    focus, focus_source = resolve_focus_layers(config, overlap)
    layers, focus_here = page_layers(config, focus)
    named = named_feature_ids(s["named"])
    prompts = tables.frame(tables.PROMPTS, config, prompts_path).filter(pl.col("pair_kind") == BUG_PAIR_KIND)
    formats = list(pcfg["formats"])
    discriminative = tables.frame(tables.DISCRIMINATIVE_FEATURES, config, discriminative_path)
    corpus = tables.frame(tables.CORPUS, config, corpus_path, columns=["prompt_id", "source", "input_ids", "n_tokens"])
    excluded = [] if pages_cfg["prompt_documents"] else corpus.filter(pl.col("source") == "prompts")["prompt_id"].to_list()
    sources = sorted(set(corpus.filter(~pl.col("prompt_id").is_in(excluded))["source"].to_list()))
    tokens = _cached_tokens(prompt_tokens(prompts, config, tokenizer), prompts, config["cache"]["positions"]) \
        if layers else None
    token_rows, context_rows, pages, provenance = [], [], {}, {}
    for layer in layers:
        hook = hook_name(layer, s["site"])
        selections = page_features(discriminative, named.get(layer, {}), layer, top_n=pages_cfg["top_n"],
                                   focus=layer in focus_here)
        feature_ids = selections["feature_id"].unique().sort().to_list()
        table, fmeta = tables.read(tables.FEATURES, config, feature_paths[layer])
        acts = pl.from_arrow(table).filter(pl.col("feature_id").is_in(feature_ids))
        d_sae = fmeta.get("d_sae")
        too_big = [f for f in feature_ids if d_sae is not None and f >= d_sae]
        if too_big:
            raise ValueError(f"SAE set {s['name']!r} names features {too_big} at layer {layer}, out of range for its "
                             f"SAE (d_sae={d_sae}): fix the set's named features (sae.sets[].named).")
        token_rows.append(token_table(acts, tokens, selections, layer=layer, n_resamples=boot["n_resamples"],
                                      confidence=boot["confidence"], seed=derived_seed(config["seed"], 13, layer)))
        sae, prov = load_sae(sae_dirs[layer], device=device)
        top = corpus_top_contexts(sae, corpus_paths[layer], feature_ids, n=pages_cfg["n_contexts"],
                                  exclude_ids=excluded, batch_size=config["sae"]["encode_batch_size"])
        del sae
        contexts = decode_contexts(top.result(), corpus, tokenizer, pages_cfg["context_tokens"]).with_columns(
            pl.lit(layer, pl.Int32).alias("layer"))
        context_rows.append(contexts)
        np_id, why = neuronpedia_id(prov)
        provenance[str(layer)] = {"hook_name": hook, "sae": {k: prov.get(k) for k in ("source", "release", "sae_id",
                                                                                         "architecture", "d_sae")},
                                  "neuronpedia_id": np_id, "n_features": len(feature_ids),
                                  "n_corpus_tokens": top.n_tokens}
        header = {
            "title": f"Feature pages: SAE set {s['name']}, layer {layer} ({hook})",
            "model": config["model"]["name"],
            "SAE": (("trained here" if prov.get("source") == "train" else
                     f"pretrained: {prov.get('release')} / {prov.get('sae_id')}")
                    + f" ({prov.get('architecture')}, d_sae={prov.get('d_sae')})"),
            "why this layer": ("a focus layer" if layer in focus_here else "a layer with named features")
                              + f" (focus layers {focus}, from {focus_source}; named layers {sorted(named)})",
            "features": (f"named features of the set at this layer, and the top {pages_cfg['top_n']} per direction of "
                         "the buggy-vs-correct rankings at a focus layer (buggy_vs_correct: all pairs; "
                         "buggy_vs_correct_heldout: ranked on the even pair ids); up = more active in the buggy "
                         f"format ({pcfg['buggy_format']}), down = in the correct format ({pcfg['correct_format']})"),
            "corpus contexts": (f"the {pages_cfg['n_contexts']} highest activations, at most one per corpus sequence, "
                                f"over {top.n_tokens} tokens of {', '.join(sources)}"
                                + ("" if pages_cfg["prompt_documents"] else " (the analysis prompts left out)")
                                + f"; {pages_cfg['context_tokens']} tokens either side"),
            "token roles": (f"the {pcfg['buggy_format']} and {pcfg['correct_format']} prompts of the "
                            f"{BUG_PAIR_KIND} pairs, at the positions cached (cache.positions: "
                            f"{config['cache']['positions']}"
                            + ("; 'aligned' holds the question, the shared answer tokens and the prompt's last token: "
                               "of the format tokens only that one, the ':' of 'A:' / 'Answer:'; cache.positions: all "
                               "holds every token)" if config["cache"]["positions"] == "aligned" else ")")
                            + ". Roles: number = a digit of the two numbers, decimal_point, comparison = the "
                            "comparison word, format = the template's own tokens around the question, answer = the "
                            "answer tokens after the prompt (the decision position is the last), other = the rest "
                            "of the question."),
            "Neuronpedia": f"pages at https://www.neuronpedia.org/{np_id}/<feature>" if np_id else why,
        }
        pages[f"layer_{layer}.html"] = render_page(
            layer=layer, header=header, features=selections, tokens=token_rows[-1], contexts=contexts,
            firing=top.firing(), formats=[f for f in formats if f in set(prompts["format"])], neuronpedia_id=np_id,
            no_neuronpedia_reason=why)
    notes = [f"SAE set {s['name']} ({s['site']}); focus layers {focus} (from {focus_source}); the set covers "
             f"{focus_here or 'none of them'}; named layers {sorted(named)}."]
    if not layers:
        notes.append("No page: the set covers no focus layer and names no feature.")
    pages["index.html"] = render_index(f"Feature pages: SAE set {s['name']}",
                                       {layer: f"layer_{layer}.html" for layer in layers}, notes)
    tokens_table = pl.concat(token_rows, how="vertical_relaxed") if token_rows else pl.DataFrame(schema=TOKEN_SCHEMA)
    context_table = (pl.concat(context_rows, how="vertical_relaxed") if context_rows else
                     pl.DataFrame(schema=CONTEXT_SCHEMA)).select(list(CONTEXT_SCHEMA)).cast(CONTEXT_SCHEMA)
    meta = {"focus_layers": focus, "focus_source": focus_source, "page_layers": layers,
            "cache_positions": config["cache"]["positions"], "confidence": boot["confidence"],
            "n_resamples": boot["n_resamples"], "bootstrap_unit": "pair_id", "pages": pages_cfg,
            "heldout_pairs": "pairs = heldout: the odd pair ids (buggy_vs_correct_heldout ranks on the even ones)",
            "layers": provenance}
    return tokens_table, context_table, pages, meta


CONTEXT_SCHEMA = {"layer": pl.Int32, "feature_id": pl.Int32, "rank": pl.Int32, "corpus_id": pl.Int32,
                  "source": pl.String, "position": pl.Int32, "activation": pl.Float32, "left": pl.String,
                  "token": pl.String, "right": pl.String}


def _cached_tokens(tokens: pl.DataFrame, prompts: pl.DataFrame, mode: str) -> pl.DataFrame:
    """The rows of `tokens` at the positions the prompt cache holds (bugscope.model.cache.positions_for)."""
    from bugscope.model.cache import positions_for

    rows = [(r["prompt_id"], p) for r in prompts.select("prompt_id", "input_ids", "decision_pos", "aligned_positions",
                                                          "prompt_last_pos").iter_rows(named=True)
            for p in positions_for(r, mode)]
    cached = pl.DataFrame(rows, schema={"prompt_id": pl.Int32, "position": pl.Int32}, orient="row")
    return tokens.join(cached, on=["prompt_id", "position"], how="semi")
