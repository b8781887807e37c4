"""HFGeneric: local datasets (save_to_disk) and json/jsonl/csv/parquet files."""

import json

import datasets
import pytest

from data_recipes.hf_generic import HFGeneric

ROWS = [
    {"lang": "deu", "text": "Hallo Welt", "en": "Hello world"},
    {"lang": "eng", "text": "Good day", "en": "Good day"},
    {"lang": "deu", "text": "Danke", "en": "Thanks"},
    {"lang": "ell", "text": "Καλημέρα", "en": "Good morning"},
    {"lang": "ell", "text": "", "en": "dropped"},
]


def _jsonl(path, rows=ROWS):
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def _check_mono(recipe):
    sources = {s.name: s for s in recipe.sources()}
    assert sorted(sources) == ["deu", "ell", "eng"]
    assert [r["text"] for r in sources["deu"].records] == ["Hallo Welt", "Danke"]
    assert [r["text"] for r in sources["ell"].records] == ["Καλημέρα"]
    assert sources["ell"].script == "Grek"
    return sources


def test_jsonl(tmp_path):
    path = _jsonl(tmp_path / "data.jsonl")
    _check_mono(HFGeneric(path, source_column="lang", text_column="text"))
    fp = HFGeneric(path, source_column="lang", text_column="text").fingerprint()
    assert fp["format"] == "json" and "data.jsonl" in fp["files"]


def test_csv_and_parquet(tmp_path):
    ds = datasets.Dataset.from_list(ROWS)
    ds.to_csv(str(tmp_path / "data.csv"))
    _check_mono(HFGeneric(tmp_path / "data.csv", source_column="lang", text_column="text"))
    pq = tmp_path / "pq"
    pq.mkdir()
    ds.to_parquet(str(pq / "part-0.parquet"))
    _check_mono(HFGeneric(pq, source_column="lang", text_column="text"))


def test_save_to_disk_parallel(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    recipe = HFGeneric(
        tmp_path / "saved",
        source_column="lang",
        text_column="text",
        target_column="en",
        languages=["deu", "ell"],
    )
    sources = {s.name: s for s in recipe.sources()}
    assert sorted(sources) == ["deu", "ell"]
    deu = sources["deu"]
    assert deu.kind == "parallel" and (deu.src_lang, deu.tgt_lang) == ("deu", "eng")
    assert deu.records[0] == {"src": "Hallo Welt", "tgt": "Hello world"}
    assert recipe.fingerprint()["format"] == "disk"


def test_pair_named_sources(tmp_path):
    rows = [{"pair": "swh-fra", "a": "Habari", "b": "Bonjour"}]
    path = _jsonl(tmp_path / "p.jsonl", rows)
    (src,) = HFGeneric(path, source_column="pair", text_column="a", target_column="b").sources()
    assert (src.name, src.src_lang, src.tgt_lang) == ("swh-fra", "swh", "fra")


def test_missing_column(tmp_path):
    path = _jsonl(tmp_path / "data.jsonl")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['sentence'\]"):
        list(HFGeneric(path, source_column="lang", text_column="sentence").sources())


def test_missing_path_and_empty_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        HFGeneric(tmp_path / "nope.jsonl", source_column="lang", text_column="text").fingerprint()
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        HFGeneric(tmp_path / "empty.jsonl", source_column="lang", text_column="text").fingerprint()


def test_zero_documents_in_a_source(tmp_path):
    path = _jsonl(
        tmp_path / "d.jsonl", [{"lang": "fra", "text": " "}, {"lang": "deu", "text": "Ja"}]
    )
    with pytest.raises(ValueError, match="'fra'.*zero documents"):
        list(HFGeneric(path, source_column="lang", text_column="text").sources())


def test_requested_language_absent(tmp_path):
    path = _jsonl(tmp_path / "data.jsonl")
    with pytest.raises(ValueError, match="swh"):
        list(HFGeneric(path, source_column="lang", text_column="text", languages=["swh"]).sources())


def test_a_broken_jsonl_row_is_named_by_file_and_line(tmp_path):
    """Issue 11: datasets says only "An error occurred while generating the dataset"."""
    path = _jsonl(tmp_path / "data.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    lines.insert(3, '{"lang": "deu", "text": "kaputt"')  # line 4: the closing brace is missing
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError) as error:
        list(HFGeneric(path, source_column="lang", text_column="text").sources())
    message = str(error.value)
    assert f"{path} line 4: invalid JSON" in message and '"kaputt"' in message
    assert "\n" not in message
