"""Recipes read fsspec URLs: the in-memory file system (as object storage would be) and file://."""

import json
import uuid

import fsspec
import pytest

from data_recipes.base import FsPath, as_path, is_url, read_lines, sha256_file
from data_recipes.hf_generic import HFGeneric
from data_recipes.parallel_tsv import ParallelTSV
from data_recipes.text_dir import TextDir
from pipeline.data.build_corpus import prepare_sources

MONO = {"eng.txt": "Hello.\n\n  \nGood morning.\n", "deu.txt": "Hallo.\r\nGrüß dich.\n", "rus.txt": "Привет.\n"}
PARALLEL = {"deu-eng.tsv": "Hallo\tHello\n\nDanke\tThanks\n", "swh-eng.tsv": "Habari\tHello\n"}
ROWS = [{"lang": "eng", "text": "hi"}, {"lang": "deu", "text": "hallo"}, {"lang": "eng", "text": "good day"}]


@pytest.fixture
def memory_root():
    """A fresh folder of the process-wide in-memory file system, removed afterwards."""
    fs = fsspec.filesystem("memory")
    root = f"/mixpipe-test-{uuid.uuid4().hex[:8]}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _write_all(fs, root, files):
    for name, text in files.items():
        fs.pipe(f"{root}/{name}", text.encode("utf-8"))


def _records(recipe):
    return {s.name: (s.kind, list(s.records), s.script) for s in recipe.sources()}


def test_is_url_and_as_path(tmp_path):
    assert is_url("s3://bucket/x") and is_url("memory://a") and is_url("file:///tmp")
    assert not is_url("/tmp/x") and not is_url("relative/dir") and not is_url(tmp_path)
    assert isinstance(as_path("memory://a/b"), FsPath)
    assert as_path(str(tmp_path)) == tmp_path


def test_text_dir_from_memory(memory_root, tmp_path):
    fs, root = memory_root
    _write_all(fs, f"{root}/mono", {**MONO, "notes.md": "ignored"})
    for name, text in MONO.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    remote, local = TextDir(f"memory://{root}/mono"), TextDir(tmp_path)
    assert _records(remote) == _records(local)
    assert _records(remote)["eng"][1] == [{"text": "Hello."}, {"text": "Good morning."}]
    # same bytes, same fingerprint: the same content is one cache entry wherever it lives
    assert remote.fingerprint() == local.fingerprint()
    chosen = TextDir(f"memory://{root}/mono", languages=["deu"], max_documents_per_source=1)
    assert _records(chosen) == {"deu": ("mono", [{"text": "Hallo."}], "Latn")}


def test_parallel_tsv_from_memory_and_its_errors_name_the_url(memory_root):
    fs, root = memory_root
    _write_all(fs, f"{root}/par", PARALLEL)
    records = _records(ParallelTSV(f"memory://{root}/par"))
    assert records["deu-eng"][1] == [{"src": "Hallo", "tgt": "Hello"}, {"src": "Danke", "tgt": "Thanks"}]
    assert sorted(records) == ["deu-eng", "swh-eng"]
    fs.pipe(f"{root}/bad/deu-eng.tsv", b"Hallo\tHello\nno tab here\n")
    with pytest.raises(ValueError, match=rf"memory://{root}/bad/deu-eng.tsv' line 2"):
        list(ParallelTSV(f"memory://{root}/bad").sources())
    with pytest.raises(ValueError, match=rf"language 'fra' requested but source file 'memory://{root}/par/fra-eng"):
        ParallelTSV(f"memory://{root}/par", languages=["fra"]).fingerprint()
    with pytest.raises(ValueError, match="does not exist"):
        TextDir(f"memory://{root}/nothing-here").fingerprint()


def test_hf_generic_from_memory_files_and_saved_dataset(memory_root, tmp_path):
    import datasets

    fs, root = memory_root
    fs.pipe(f"{root}/hf/rows.jsonl", "".join(json.dumps(r) + "\n" for r in ROWS).encode())
    expected = {"deu": [{"text": "hallo"}], "eng": [{"text": "hi"}, {"text": "good day"}]}
    for path in (f"memory://{root}/hf", f"memory://{root}/hf/rows.jsonl"):
        recipe = HFGeneric(path, source_column="lang", text_column="text")
        assert {k: v[1] for k, v in _records(recipe).items()} == expected
        assert recipe.fingerprint()["files"] == {"rows.jsonl": sha256_file(f"memory://{root}/hf/rows.jsonl")}
    # a save_to_disk dataset in object storage
    local = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(local))
    for file in local.rglob("*"):
        if file.is_file():
            fs.pipe(f"{root}/saved/{file.relative_to(local).as_posix()}", file.read_bytes())
    recipe = HFGeneric(f"memory://{root}/saved", source_column="lang", text_column="text")
    assert recipe.fingerprint()["format"] == "disk"
    assert {k: v[1] for k, v in _records(recipe).items()} == expected
    fs.pipe(f"{root}/broken/rows.jsonl", b'{"lang": "eng", "text": "ok"}\n{"lang": oops}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl line 2: invalid JSON"):
        list(HFGeneric(f"memory://{root}/broken", source_column="lang", text_column="text").sources())


def test_file_urls_read_like_local_paths(tmp_path):
    (tmp_path / "mono").mkdir()
    (tmp_path / "par").mkdir()
    for name, text in MONO.items():
        (tmp_path / "mono" / name).write_text(text, encoding="utf-8")
    for name, text in PARALLEL.items():
        (tmp_path / "par" / name).write_text(text, encoding="utf-8")
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    pairs = [(TextDir(f"file://{tmp_path}/mono"), TextDir(tmp_path / "mono")),
             (ParallelTSV(f"file://{tmp_path}/par"), ParallelTSV(tmp_path / "par")),
             (HFGeneric(f"file://{tmp_path}/rows.jsonl", source_column="lang", text_column="text"),
              HFGeneric(tmp_path / "rows.jsonl", source_column="lang", text_column="text"))]
    for by_url, by_path in pairs:
        assert _records(by_url) == _records(by_path)
        assert by_url.fingerprint() == by_path.fingerprint()
    assert read_lines(f"file://{tmp_path}/mono/eng.txt") == ["Hello.", "Good morning."]


def test_prepare_sources_from_a_url(memory_root, tmp_path):
    fs, root = memory_root
    _write_all(fs, f"{root}/mono", MONO)
    corpus = prepare_sources(TextDir(f"memory://{root}/mono"), tmp_path, progress=False)
    assert corpus.source_names == ["deu", "eng", "rus"]
    assert corpus.dataset("deu")["text"] == ["Hallo.", "Grüß dich."]
    assert corpus.source_info("eng")["attributes"] == {"file": "eng.txt"}
