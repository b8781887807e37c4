"""Token statistics of a prepared corpus under a tokenizer: totals per source and fertility."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from pipeline.data.corpus import PreparedCorpus
from pipeline.data.tokenizer import Tokenizer

ENCODE_BATCH = 1024  # texts per `Tokenizer.encode` call


def _text_batches(
    corpus: PreparedCorpus, name: str, indices: list[int] | None = None
) -> Iterator[list[str]]:
    ds = corpus.dataset(name)
    columns = ("src", "tgt") if corpus.kind(name) == "parallel" else ("text",)
    if indices is None:
        for batch in ds.iter(batch_size=ENCODE_BATCH):
            for column in columns:
                yield batch[column]
    else:
        for start in range(0, len(indices), ENCODE_BATCH):
            rows = ds[indices[start : start + ENCODE_BATCH]]
            for column in columns:
                yield rows[column]


def count_tokens(
    corpus: PreparedCorpus, tokenizer: Tokenizer, progress: bool = True
) -> dict[str, int]:
    """Total tokens per source (no bos/eos); parallel sources count src + tgt."""
    from tqdm.auto import tqdm

    counts: dict[str, int] = {}
    names = corpus.source_names
    for name in tqdm(names, desc="count tokens", unit="source", disable=not progress):
        counts[name] = sum(
            len(ids) for texts in _text_batches(corpus, name) for ids in tokenizer.encode(texts)
        )
    return counts


def fertility(
    corpus: PreparedCorpus, tokenizer: Tokenizer, max_documents: int = 2000, seed: int = 0
) -> dict[str, float]:
    """Tokens per character per source, over the whole source or a seeded sample of docs."""
    rng = np.random.default_rng(seed)
    out: dict[str, float] = {}
    for name in corpus.source_names:
        n = corpus.num_documents(name)
        indices = (
            None
            if n <= max_documents
            else np.sort(rng.choice(n, max_documents, replace=False)).tolist()
        )
        tokens = chars = 0
        for texts in _text_batches(corpus, name, indices):
            tokens += sum(len(ids) for ids in tokenizer.encode(texts))
            chars += sum(len(t) for t in texts)
        out[name] = tokens / chars if chars else float("nan")
    return out
