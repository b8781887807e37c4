"""ParallelTSV: <xxx>-eng.tsv files with src<TAB>tgt lines."""

from pathlib import Path

import pytest

from data_recipes.parallel_tsv import ParallelTSV

TATOEBA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "tatoeba"


@pytest.fixture
def tsv_dir(tmp_path):
    (tmp_path / "deu-eng.tsv").write_text("Hallo.\tHello.\n\nDanke.\tThanks.\n", encoding="utf-8")
    (tmp_path / "ell-eng.tsv").write_text("Γεια.\tHi.\n", encoding="utf-8")
    (tmp_path / "README").write_text("not data", encoding="utf-8")
    return tmp_path


def test_reads_pairs(tsv_dir):
    sources = {s.name: s for s in ParallelTSV(tsv_dir).sources()}
    assert sorted(sources) == ["deu-eng", "ell-eng"]
    deu = sources["deu-eng"]
    assert deu.kind == "parallel" and (deu.src_lang, deu.tgt_lang, deu.language) == (
        "deu",
        "eng",
        "deu",
    )
    assert deu.records == [{"src": "Hallo.", "tgt": "Hello."}, {"src": "Danke.", "tgt": "Thanks."}]
    assert sources["ell-eng"].script == "Grek"


def test_malformed_line_names_file_and_line(tsv_dir):
    (tsv_dir / "fra-eng.tsv").write_text("Bonjour.\tHello.\nno tab here\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"fra-eng\.tsv' line 2"):
        list(ParallelTSV(tsv_dir).sources())


def test_empty_side_is_an_error(tsv_dir):
    (tsv_dir / "fra-eng.tsv").write_text("Bonjour.\t\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 1: empty"):
        list(ParallelTSV(tsv_dir, languages=["fra"]).sources())


def test_missing_dir_and_file(tsv_dir):
    with pytest.raises(ValueError, match="does not exist"):
        ParallelTSV(tsv_dir / "nope").fingerprint()
    with pytest.raises(ValueError, match=r"swh-eng\.tsv"):
        ParallelTSV(tsv_dir, languages=["swh"]).fingerprint()


def test_zero_documents(tsv_dir):
    (tsv_dir / "fra-eng.tsv").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="zero documents"):
        list(ParallelTSV(tsv_dir, languages=["fra"]).sources())


def test_tatoeba_subset():
    par = TATOEBA / "parallel"
    if not par.is_dir():
        pytest.skip(f"Tatoeba data not found at {par} (shared data folder absent)")
    recipe = ParallelTSV(par, languages=["deu", "tzl"], max_documents_per_source=300)
    sources = {s.name: s for s in recipe.sources()}
    assert sorted(sources) == ["deu-eng", "tzl-eng"]
    assert len(sources["deu-eng"].records) == 300
    assert all(r["src"] and r["tgt"] for r in sources["tzl-eng"].records)
