"""Tokenizer: language tags, byte fallback, caching, token counts, fertility."""

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pipeline.data.train_tokenizer as train_mod
from data_recipes.embedded_cldr import EmbeddedCLDR
from pipeline.data.build_corpus import prepare_sources
from pipeline.data.token_stats import count_tokens, fertility
from pipeline.data.tokenizer import Tokenizer, TokenizerConfig
from pipeline.data.train_tokenizer import sampling_probs, split_long, train_tokenizer

SMALL = TokenizerConfig(vocab_size=700, sample_sentences=4000, seed=1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def corpus(cache):
    # Small alphabets (Latin, Greek, Cyrillic, Georgian) so a 700-piece vocab trains in ~1 s.
    recipe = EmbeddedCLDR(locales=["de", "el", "ru", "ka", "gv"])
    return prepare_sources(recipe, cache, progress=False)


@pytest.fixture(scope="module")
def tok(corpus, cache):
    return train_tokenizer(corpus, SMALL, cache)


def test_special_ids_and_layout(tok, cache):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 700
    assert (tok.path / "spm.model").is_file() and tok.path.parent == cache / "tokenizers"
    assert tok.path.name == tok.content_hash[:16]


def test_language_tags_are_single_pieces(tok, corpus):
    assert tok.languages == corpus.languages() == ["deu", "ell", "eng", "glv", "kat", "rus"]
    for lang in tok.languages:
        tag = tok.lang_tag(lang)
        assert tag == f"<2{lang}>"
        ids = tok.encode([f"{tag}Hallo {tag} Welt"])[0]
        assert ids.count(tok.lang_tag_id(lang)) == 2
        assert tok.lang_tag_id(lang) not in (tok.unk_id, tok.pad_id)
    with pytest.raises(ValueError, match="'fra' has no tag"):
        tok.lang_tag_id("fra")


def test_byte_fallback_has_no_unk(tok):
    text = "snow \U0001f600 \u2603 \u0b95"  # emoji, snowman, Tamil letter: none in training data
    (ids,) = tok.encode([text])
    assert tok.unk_id not in ids
    assert tok.decode(ids) == text
    assert tok.decode([ids, ids]) == [text, text]


def test_encode_requires_a_list(tok):
    with pytest.raises(ValueError, match="list of strings"):
        tok.encode("hello")


def test_cache_hit(tok, corpus, cache, monkeypatch):
    mtime = os.stat(tok.path / "spm.model").st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("retrained on a cache hit")

    monkeypatch.setattr(train_mod, "_train_model", boom)
    again = train_tokenizer(corpus, SMALL, cache)
    assert again.path == tok.path and again.content_hash == tok.content_hash
    assert os.stat(again.path / "spm.model").st_mtime_ns == mtime
    loaded = Tokenizer.load(tok.path)
    assert loaded.encode(["Guten Tag"]) == tok.encode(["Guten Tag"])
    bare = Tokenizer.load(tok.path / "spm.model")
    assert bare.languages == tok.languages


def test_config_change_changes_hash(corpus, cache):
    cfg = TokenizerConfig(vocab_size=600, sample_sentences=2000, seed=1, model_type="bpe")
    other = train_tokenizer(corpus, cfg, cache)
    assert other.content_hash != train_tokenizer(corpus, SMALL, cache).content_hash
    assert other.vocab_size == 600


def test_count_tokens_matches_encode(tok, corpus):
    counts = count_tokens(corpus, tok, progress=False)
    assert sorted(counts) == corpus.source_names
    for name in ("glv", "ell-eng"):
        ds = corpus.dataset(name)
        cols = ("src", "tgt") if corpus.kind(name) == "parallel" else ("text",)
        expected = sum(len(ids) for c in cols for ids in tok.encode(ds[c]))
        assert counts[name] == expected
    corpus.attach_token_counts(counts, tok.content_hash)
    assert corpus.sizes("tokens") == counts


def test_fertility_for_every_source(tok, corpus):
    fert = fertility(corpus, tok)
    assert sorted(fert) == corpus.source_names
    assert all(0.05 < v < 2.0 for v in fert.values()), fert
    # Sampling path: fewer docs than the source has, still deterministic.
    assert fertility(corpus, tok, max_documents=50) == fertility(corpus, tok, max_documents=50)


def test_sampling_probs_flatten_the_tail():
    probs = sampling_probs({"big": 10000, "small": 10}, temperature=3.33)
    assert probs["small"] > 10 / 10010
    assert np.isclose(sum(probs.values()), 1.0)
    assert sampling_probs({"a": 9, "b": 1}, 1.0) == pytest.approx({"a": 0.9, "b": 0.1})
    # Empty sources are left out of the draw; a corpus of only empty sources cannot be sampled.
    assert sampling_probs({"b": 4, "a": 0}, 2.0) == {"b": 1.0}
    with pytest.raises(ValueError, match="all empty"):
        sampling_probs({"a": 0}, 2.0)


def test_vocab_too_large_is_a_clear_error(corpus, tmp_path):
    cfg = TokenizerConfig(vocab_size=50000, sample_sentences=500)
    # Too high for the corpus: the hint says to lower it, and to what (issue 11).
    with pytest.raises(ValueError, match=r"vocab_size=50000[\s\S]*too high[\s\S]*"
                                         r"Lower tokenizer\.vocab_size to <= \d+, or give the tokenizer more text"):
        train_tokenizer(corpus, cfg, tmp_path)
    leftovers = (
        list((tmp_path / "tokenizers").glob("*")) if (tmp_path / "tokenizers").exists() else []
    )
    assert leftovers == []


def test_bad_config():
    with pytest.raises(ValueError, match="model_type"):
        TokenizerConfig(model_type="wordpiece")
    with pytest.raises(ValueError, match="temperature"):
        TokenizerConfig(temperature=0)
    with pytest.raises(ValueError, match="temperature"):
        TokenizerConfig(temperature=float("inf"))


def test_vocab_too_small_says_raise_it():
    """Fewer pieces than characters to cover: the hint says raise vocab_size (not lower it)."""
    sentences = ["abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789"] * 20
    cfg = TokenizerConfig(vocab_size=20, sample_sentences=20, character_coverage=1.0, byte_fallback=False)
    with pytest.raises(ValueError, match=r"smaller than required_chars[\s\S]*Raise tokenizer\.vocab_size to >= \d+") as error:
        train_mod._train_model(sentences, ["eng"], cfg)
    assert "Lower" not in str(error.value)


@settings(max_examples=200, deadline=None)
@given(words=st.lists(st.sampled_from(["a", "bb", "ççç", "日本語", "x" * 50, "ü" * 30, "日本語" * 40]), max_size=120),
       max_bytes=st.integers(1, 300))
def test_long_training_documents_are_cut_into_sentences_the_trainer_keeps(words, max_bytes):
    """SentencePiece's trainer skips sentences over max_sentence_length bytes, so a corpus of long
    documents would train on nothing: they are cut (at spaces, else between characters)."""
    text = " ".join(words)
    pieces = split_long(text, max_bytes)
    assert all(len(piece.encode("utf-8")) <= max(max_bytes, 3) for piece in pieces)  # 3: one CJK character
    assert "".join(pieces).replace(" ", "") == text.replace(" ", "")
    if len(text.encode("utf-8")) <= max_bytes:
        assert pieces == [text]
