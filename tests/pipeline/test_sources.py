"""Prepared sources: layout, manifest, cache hits, atomic writes, load validation."""

import json
import os
import shutil

import datasets
import pytest

from data_recipes.base import SourceRecords
from data_recipes.text_dir import TextDir
from pipeline.data.build_corpus import prepare_sources
from pipeline.data.corpus import (
    FORMAT_VERSION,
    MANIFEST,
    PreparedCorpus,
    content_hash,
)


class ListRecipe:
    """A tiny in-memory recipe that counts how often it is asked for sources."""

    def __init__(self, name="tiny", extra=None):
        self.name = name
        self.calls = 0
        self.extra = extra or {}

    def fingerprint(self):
        return {"recipe": self.name, "version": 1, **self.extra}

    def sources(self):
        self.calls += 1
        yield SourceRecords("eng", "mono", [{"text": "hello"}, {"text": "good day"}], "eng", "Latn")
        yield SourceRecords(
            "deu", "mono", iter([{"text": "hallo"}]), "deu", "Latn", attributes={"group": "a"}
        )
        yield SourceRecords(
            "deu-eng",
            "parallel",
            [{"src": "hallo", "tgt": "hello"}] * 3,
            "deu",
            "Latn",
            src_lang="deu",
            tgt_lang="eng",
        )


@pytest.fixture
def corpus(tmp_path):
    return prepare_sources(ListRecipe(), tmp_path, progress=False)


def test_layout_and_manifest(corpus, tmp_path):
    digest = content_hash(ListRecipe().fingerprint())
    assert corpus.path == tmp_path / "prepared" / f"tiny-{digest[:16]}"
    assert corpus.content_hash == digest
    assert corpus.source_names == ["deu", "deu-eng", "eng"]
    manifest = json.loads((corpus.path / MANIFEST).read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["recipe"] == "tiny" and manifest["fingerprint"] == ListRecipe().fingerprint()
    par = manifest["sources"]["deu-eng"]
    assert par["kind"] == "parallel" and (par["src_lang"], par["tgt_lang"]) == ("deu", "eng")
    assert par["num_documents"] == 3 and par["num_characters"] == 3 * len("hallohello")
    assert manifest["sources"]["deu"]["attributes"] == {"group": "a"}
    assert corpus.sizes("documents") == {"deu": 1, "deu-eng": 3, "eng": 2}
    assert corpus.sizes("characters")["eng"] == len("hello") + len("good day")
    assert corpus.kind("deu-eng") == "parallel" and corpus.kind("eng") == "mono"
    assert corpus.languages() == ["deu", "eng"]
    assert not [p for p in (tmp_path / "prepared").iterdir() if p.name.startswith(".tmp-")]


def test_dataset_random_access(corpus):
    ds = corpus.dataset("eng")
    assert isinstance(ds, datasets.Dataset)
    assert ds[1] == {"text": "good day"}
    assert corpus.dataset("eng") is ds  # cached
    assert corpus.dataset("deu-eng")[2] == {"src": "hallo", "tgt": "hello"}
    with pytest.raises(ValueError, match="unknown source 'fra'"):
        corpus.dataset("fra")


def test_token_sizes_need_counts(corpus):
    with pytest.raises(ValueError, match="no token counts.*tokenizer"):
        corpus.sizes("tokens")
    with pytest.raises(ValueError, match="unknown size unit"):
        corpus.sizes("bytes")
    counts = {"deu": 2, "deu-eng": 9, "eng": 4}
    corpus.attach_token_counts(counts, "ab" * 32)
    assert corpus.sizes("tokens") == counts
    assert (corpus.path / f"token_counts-{'ab' * 8}.json").is_file()
    reloaded = PreparedCorpus.load(corpus.path)
    assert reloaded.token_counts == counts and reloaded.tokenizer_hash == "ab" * 32
    with pytest.raises(ValueError, match="missing \\['eng'\\]"):
        corpus.attach_token_counts({"deu": 1, "deu-eng": 1}, "cd" * 32)
    with pytest.raises(ValueError, match="int >= 0"):
        corpus.attach_token_counts({"deu": 1, "deu-eng": 1, "eng": -1}, "cd" * 32)


def test_second_prepare_is_a_cache_hit(tmp_path):
    recipe = ListRecipe()
    first = prepare_sources(recipe, tmp_path, progress=False)
    mtime = os.stat(first.path / MANIFEST).st_mtime_ns
    second = prepare_sources(recipe, tmp_path, progress=False)
    assert recipe.calls == 1
    assert second.path == first.path
    assert os.stat(second.path / MANIFEST).st_mtime_ns == mtime


def test_changed_input_file_gives_new_hash(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "eng.txt").write_text("one\ntwo\n", encoding="utf-8")
    first = prepare_sources(TextDir(data), tmp_path / "cache", progress=False)
    (data / "eng.txt").write_text("one\ntwo\nthree\n", encoding="utf-8")
    second = prepare_sources(TextDir(data), tmp_path / "cache", progress=False)
    assert second.content_hash != first.content_hash and second.path != first.path
    assert second.num_documents("eng") == 3 and first.num_documents("eng") == 2


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    real_save = datasets.Dataset.save_to_disk
    calls = {"n": 0}

    def flaky_save(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", flaky_save)
    with pytest.raises(OSError, match="simulated"):
        prepare_sources(ListRecipe(), tmp_path, progress=False)
    assert calls["n"] == 2
    assert list((tmp_path / "prepared").iterdir()) == []  # no target, no temp dir
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", real_save)
    corpus = prepare_sources(ListRecipe(), tmp_path, progress=False)
    assert corpus.num_documents("deu-eng") == 3


def test_invalid_cached_corpus_is_rebuilt(corpus, tmp_path):
    (corpus.path / MANIFEST).write_text("{not json", encoding="utf-8")
    recipe = ListRecipe()
    again = prepare_sources(recipe, tmp_path, progress=False)
    assert recipe.calls == 1 and again.path == corpus.path
    assert again.num_documents("eng") == 2


def _edit_manifest(path, edit):
    manifest = json.loads((path / MANIFEST).read_text())
    edit(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")


def test_load_rejects_corrupt_manifest(corpus):
    (corpus.path / MANIFEST).write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=f"manifest '{corpus.path / MANIFEST}'.*not valid JSON"):
        PreparedCorpus.load(corpus.path)
    (corpus.path / MANIFEST).unlink()
    with pytest.raises(ValueError, match="manifest .* is missing"):
        PreparedCorpus.load(corpus.path)


def test_load_rejects_row_count_mismatch(corpus):
    _edit_manifest(corpus.path, lambda m: m["sources"]["eng"].update(num_documents=5))
    with pytest.raises(ValueError, match="source 'eng'.*2 rows.*num_documents=5"):
        PreparedCorpus.load(corpus.path)


def test_load_rejects_tampered_hash(corpus):
    _edit_manifest(corpus.path, lambda m: m.update(content_hash="0" * 64))
    with pytest.raises(ValueError, match="does not match the directory name"):
        PreparedCorpus.load(corpus.path)


def test_load_rejects_tampered_fingerprint(corpus):
    _edit_manifest(corpus.path, lambda m: m["fingerprint"].update(version=2))
    with pytest.raises(ValueError, match="tampered"):
        PreparedCorpus.load(corpus.path)


def test_load_rejects_format_version(corpus):
    _edit_manifest(corpus.path, lambda m: m.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(ValueError, match="format_version"):
        PreparedCorpus.load(corpus.path)


def test_load_rejects_missing_or_unreadable_source(corpus):
    arrow = next((corpus.path / "sources" / "deu").glob("*.arrow"))
    arrow.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="deu.*unreadable"):
        PreparedCorpus.load(corpus.path)
    shutil.rmtree(corpus.path / "sources" / "deu")
    with pytest.raises(ValueError, match="source 'deu'.*missing"):
        PreparedCorpus.load(corpus.path)


def test_load_missing_dir(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        PreparedCorpus.load(tmp_path / "nope")


class BadRecipe(ListRecipe):
    def __init__(self, bad):
        super().__init__(name="bad")
        self.bad = bad

    def sources(self):
        yield from self.bad()


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: [SourceRecords("eng", "mono", [], "eng")], "'eng' has zero documents"),
        (lambda: [SourceRecords("eng", "mono", [{"txt": "x"}], "eng")], "record 0: column 'text'"),
        (
            lambda: [SourceRecords("eng", "mono", [{"text": "a"}], "eng")] * 2,
            "source 'eng' twice",
        ),
        (lambda: [], "yielded no sources"),
    ],
)
def test_bad_recipe_output(tmp_path, make, match):
    with pytest.raises(ValueError, match=match):
        prepare_sources(BadRecipe(make), tmp_path, progress=False)
    assert not any((tmp_path / "prepared").iterdir())


def test_source_records_validation():
    with pytest.raises(ValueError, match="invalid source name"):
        SourceRecords("../evil", "mono", [], "eng")
    with pytest.raises(ValueError, match="kind"):
        SourceRecords("x", "image", [], "eng")
    with pytest.raises(ValueError, match="src_lang and tgt_lang"):
        SourceRecords("x", "parallel", [], "eng")
