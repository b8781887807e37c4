"""Token stores: ids equal the tokenizer's, offsets, flat views, dtypes, cache hits, corruption."""

import json
import logging
import random

import numpy as np
import pytest

from data_recipes.base import SourceRecords
from pipeline.data import token_store as ts
from pipeline.data.build_corpus import prepare_sources
from pipeline.data.token_stats import count_tokens
from pipeline.data.tokenizer import TokenizerConfig
from pipeline.data.train_tokenizer import train_tokenizer
from pipeline.storage.integrity import IntegrityError

SYLLABLES = {"eng": "th e a st ing er on re an", "deu": "sch ei en ch ung au er ge ie"}


class WordsRecipe:
    """Two mono sources of made-up words and one parallel source, seeded (some long documents)."""

    name = "words"

    def __init__(self, num_documents=400):
        self.num_documents = num_documents

    def fingerprint(self):
        return {"recipe": self.name, "num_documents": self.num_documents}

    def _texts(self, lang, seed):
        rng = random.Random(seed)
        parts = SYLLABLES[lang].split()
        return [" ".join("".join(rng.choices(parts, k=rng.randint(1, 4))) for _ in range(rng.randint(1, 60)))
                for _ in range(self.num_documents)]

    def sources(self):
        eng, deu = self._texts("eng", 0), self._texts("deu", 1)
        yield SourceRecords("deu", "mono", [{"text": t} for t in deu], "deu", "Latn")
        yield SourceRecords("deu-eng", "parallel", [{"src": d, "tgt": e} for d, e in zip(deu, eng, strict=True)],
                            "deu", "Latn", src_lang="deu", tgt_lang="eng")
        yield SourceRecords("eng", "mono", [{"text": t} for t in eng[:7]], "eng", "Latn")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    corpus = prepare_sources(WordsRecipe(), cache, progress=False)
    tokenizer = train_tokenizer(corpus, TokenizerConfig(vocab_size=300, sample_sentences=2000), cache)
    return corpus, tokenizer


def build(corpus, tokenizer, **options):
    options.setdefault("progress", False)
    return ts.build_token_stores(corpus, tokenizer.model_file, tokenizer.vocab_size, tokenizer.content_hash,
                                 **options)


@pytest.fixture(scope="module")
def stores(prepared):
    corpus, tokenizer = prepared
    return build(corpus, tokenizer, shard_documents=150)


def test_documents_are_the_tokenizer_ids(prepared, stores):
    corpus, tokenizer = prepared
    assert sorted(stores) == corpus.source_names
    for name, store in stores.items():
        assert store.num_documents == len(store) == corpus.num_documents(name)
        assert store.dtype == np.dtype("<u2")
        rows = corpus.dataset(name)[:]
        for column in store.columns:
            expected = tokenizer.encode(rows[column])
            assert [store.document(i, column).tolist() for i in range(len(store))] == expected
            assert store.document(-1, column).tolist() == expected[-1]
            flat = store.tokens(column)
            assert flat.tolist() == [t for ids in expected for t in ids]
            assert store.offsets(column).tolist() == np.cumsum([0] + [len(e) for e in expected]).tolist()
    assert stores["deu-eng"].columns == ("src", "tgt")
    assert stores["deu-eng"].document(3).tolist() == stores["deu-eng"].document(3, "src").tolist()
    with pytest.raises(IndexError, match="out of range"):
        stores["eng"].document(7)
    with pytest.raises(ValueError, match="columns"):
        stores["eng"].document(0, "src")


def test_totals_equal_the_token_counts(prepared, stores):
    corpus, tokenizer = prepared
    counts = count_tokens(corpus, tokenizer, progress=False)
    assert {name: store.total_tokens for name, store in stores.items()} == counts
    pair = stores["deu-eng"]
    assert pair.total_tokens == pair.num_tokens("src") + pair.num_tokens("tgt")


def test_views_are_memory_mapped_and_read_only(stores):
    store = stores["deu"]
    doc = store.document(10)
    assert isinstance(store.tokens(), np.memmap)
    assert np.shares_memory(doc, store.tokens())  # a view, not a copy
    with pytest.raises(ValueError):
        doc[:1] = 0


def test_layout_on_disk(prepared, stores):
    corpus, tokenizer = prepared
    root = corpus.path / f"token_stores-{tokenizer.content_hash[:16]}"
    assert sorted(p.name for p in (root / "deu-eng").iterdir()) == [
        "src.offsets", "src.tokens", "store.json", "tgt.offsets", "tgt.tokens"]
    meta = json.loads((root / "deu" / "store.json").read_text())
    assert meta["dtype"] == "<u2" and meta["corpus_hash"] == corpus.content_hash
    assert meta["tokenizer_hash"] == tokenizer.content_hash
    assert set(meta["checksums"]["files"]) == {"text.tokens", "text.offsets"}
    assert (root / "deu" / "text.tokens").stat().st_size == 2 * meta["num_tokens"]["text"]
    assert not (corpus.path / f"token_parts-{tokenizer.content_hash[:16]}").exists()  # parts removed
    assert not list(root.glob(".tmp-*"))


def test_token_dtype():
    assert ts.token_dtype(8000) == np.dtype("<u2")
    assert ts.token_dtype(65536) == np.dtype("<u2")
    assert ts.token_dtype(65537) == np.dtype("<u4")
    with pytest.raises(ValueError, match="vocab_size"):
        ts.token_dtype(0)


def test_uint32_when_the_vocabulary_is_large(prepared, stores, tmp_path):
    corpus, tokenizer = prepared
    big = ts.build_token_stores(corpus, tokenizer.model_file, 70_000, "f" * 64, progress=False)
    assert big["deu"].dtype == np.dtype("<u4")
    assert np.array_equal(big["deu"].tokens(), stores["deu"].tokens())


def test_second_build_is_a_cache_hit(prepared, stores, monkeypatch):
    corpus, tokenizer = prepared

    def refuse(*args, **kwargs):
        raise AssertionError("re-encoded a cached store")

    monkeypatch.setattr(ts, "encode_unit", refuse)
    again = build(corpus, tokenizer, shard_documents=150)
    assert {n: s.tokens().tolist() for n, s in again.items()} == {n: s.tokens().tolist() for n, s in stores.items()}
    opened = ts.open_token_stores(corpus, tokenizer.content_hash)
    assert sorted(opened) == corpus.source_names


def test_corrupted_store_is_detected_and_rebuilt(prepared, tmp_path, caplog):
    corpus, tokenizer = prepared
    fake_hash = "c" * 64  # its own stores folder: the module's stores stay intact
    stores = ts.build_token_stores(corpus, tokenizer.model_file, tokenizer.vocab_size, fake_hash, progress=False)
    path = stores["deu"].path / "text.tokens"
    good = path.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF  # same size, one byte changed
    path.write_bytes(bytes(bad))
    with pytest.raises(IntegrityError, match=str(path)):
        ts.TokenStore.open(path.parent)
    with pytest.raises(IntegrityError, match="text.tokens"):
        ts.open_token_stores(corpus, fake_hash)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.token_store"):
        rebuilt = ts.build_token_stores(corpus, tokenizer.model_file, tokenizer.vocab_size, fake_hash,
                                        progress=False)
    assert "rebuilding" in caplog.text and "text.tokens" in caplog.text
    assert path.read_bytes() == good and rebuilt["deu"].document(0).size > 0
    # truncated: named too
    path.write_bytes(good[:-2])
    with pytest.raises(IntegrityError, match="text.tokens"):
        ts.TokenStore.open(path.parent)
    (path.parent / "store.json").unlink()
    assert ts.open_token_stores(corpus, fake_hash) is None  # not published: absent, not an error


def test_store_of_another_corpus_is_refused(prepared, stores, tmp_path):
    corpus, tokenizer = prepared
    meta_path = stores["eng"].path / "store.json"
    meta = json.loads(meta_path.read_text())
    try:
        meta_path.write_text(json.dumps({**meta, "corpus_hash": "0" * 64}))
        with pytest.raises(ValueError, match="belongs to"):
            ts.open_token_stores(corpus, tokenizer.content_hash, verify=False)
    finally:
        meta_path.write_text(json.dumps(meta))


def test_units_cover_every_document(prepared):
    corpus, _ = prepared
    units = ts.plan_units(corpus, 150)
    for name in corpus.source_names:
        own = [u for u in units if u.source == name]
        assert own[0].start == 0 and own[-1].stop == corpus.num_documents(name)
        assert all(a.stop == b.start for a, b in zip(own, own[1:], strict=False))
    with pytest.raises(ValueError, match="shard_documents"):
        ts.plan_units(corpus, 0)


def test_publish_names_missing_shards(prepared):
    corpus, tokenizer = prepared
    with pytest.raises(ValueError, match=r"not encoded yet \(deu\[0:150\]"):
        ts.publish_stores(corpus, "d" * 64, tokenizer.vocab_size, shard_documents=150)
