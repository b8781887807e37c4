"""TextDir: one file per language, one document per line."""

from pathlib import Path

import pytest

from data_recipes.text_dir import TextDir

TATOEBA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "tatoeba"


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def corpus_dir(tmp_path):
    _write(tmp_path / "eng.txt", "Hello.\n\n  \nGood morning.\nThank you.\n")
    _write(tmp_path / "deu.txt", "Hallo.\nGuten Morgen.\n")
    _write(tmp_path / "rus.txt", "Привет.\n")
    _write(tmp_path / "notes.md", "ignored")
    return tmp_path


def test_reads_sources_dropping_blank_lines(corpus_dir):
    sources = {s.name: s for s in TextDir(corpus_dir).sources()}
    assert sorted(sources) == ["deu", "eng", "rus"]
    assert [r["text"] for r in sources["eng"].records] == ["Hello.", "Good morning.", "Thank you."]
    assert sources["rus"].script == "Cyrl" and sources["eng"].script == "Latn"
    assert all(s.kind == "mono" and s.language == s.name for s in sources.values())


def test_languages_and_cap(corpus_dir):
    recipe = TextDir(corpus_dir, languages=["eng", "deu"], max_documents_per_source=2)
    sources = {s.name: s for s in recipe.sources()}
    assert sorted(sources) == ["deu", "eng"]
    assert len(sources["eng"].records) == 2


def test_fingerprint_tracks_content(corpus_dir):
    before = TextDir(corpus_dir).fingerprint()
    assert TextDir(corpus_dir).fingerprint() == before
    _write(corpus_dir / "deu.txt", "Hallo!\n")
    assert TextDir(corpus_dir).fingerprint() != before


def test_missing_dir(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        list(TextDir(tmp_path / "nope").sources())


def test_missing_requested_language(corpus_dir):
    with pytest.raises(ValueError, match="fra.txt"):
        TextDir(corpus_dir, languages=["fra"]).fingerprint()


def test_empty_file(corpus_dir):
    _write(corpus_dir / "fra.txt", "")
    with pytest.raises(ValueError, match=r"fra\.txt.*empty"):
        list(TextDir(corpus_dir).sources())


def test_zero_documents(corpus_dir):
    _write(corpus_dir / "fra.txt", "\n   \n\n")
    with pytest.raises(ValueError, match=r"fra\.txt.*zero documents"):
        list(TextDir(corpus_dir).sources())


def test_bad_options(corpus_dir):
    with pytest.raises(ValueError, match="max_documents_per_source"):
        TextDir(corpus_dir, max_documents_per_source=0)
    with pytest.raises(ValueError, match="languages"):
        TextDir(corpus_dir, languages="eng")


def test_tatoeba_subset():
    mono = TATOEBA / "mono"
    if not mono.is_dir():
        pytest.skip(f"Tatoeba data not found at {mono} (shared data folder absent)")
    recipe = TextDir(mono, languages=["amh", "deu", "eng"], max_documents_per_source=500)
    sources = {s.name: s for s in recipe.sources()}
    assert sorted(sources) == ["amh", "deu", "eng"]
    assert sources["amh"].script == "Ethi"
    assert len(sources["deu"].records) == 500
    assert len(sources["amh"].records) == 168  # the whole file: fewer lines than the cap


def test_upper_case_extension_is_read_and_other_files_are_named(corpus_dir, caplog):
    """Issue 11: `deu.TXT` used to be dropped without a word; other files are now reported."""
    import logging

    (corpus_dir / "deu.txt").rename(corpus_dir / "deu.TXT")
    _write(corpus_dir / "fra.text", "Bonjour.\n")
    recipe = TextDir(corpus_dir)
    with caplog.at_level(logging.WARNING, logger="data_recipes.text_dir"):
        sources = {s.name: s for s in recipe.sources()}
        recipe.fingerprint()
    assert sorted(sources) == ["deu", "eng", "rus"]
    assert [r["text"] for r in sources["deu"].records] == ["Hallo.", "Guten Morgen."]
    [line] = [r.getMessage() for r in caplog.records]  # one line, once
    assert "ignoring 2 file(s)" in line and "fra.text" in line and "notes.md" in line
    assert TextDir(corpus_dir, languages=["deu"]).fingerprint()["files"] == {"deu.TXT": recipe.fingerprint()["files"]["deu.TXT"]}


def test_two_files_for_one_source_are_an_error(corpus_dir):
    _write(corpus_dir / "deu.TXT", "Hallo.\n")
    with pytest.raises(ValueError, match=r"2 files for source 'deu' \(deu\.TXT, deu\.txt\)"):
        TextDir(corpus_dir).fingerprint()
