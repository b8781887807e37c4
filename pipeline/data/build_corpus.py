"""Prepared corpora, write side: materialise a recipe's sources as Arrow datasets plus a manifest.

:func:`prepare_sources` writes ``<cache_dir>/prepared/<recipe.name>-<content_hash[:16]>/``
(layout and manifest in :mod:`pipeline.data.corpus`, which reads it). The same inputs always
land in the same directory, so a second :func:`prepare_sources` is a cache hit. A corpus
directory appears only complete: it is built in a hidden temp directory beside the target and
renamed into place; the manifest, with a checksum of every source file, is written last.

Temp directories are named ``.tmp-<target>-pid<pid>@<host>-<random>``; one whose process is
gone (killed during preparation) is removed by the next :func:`prepare_sources` on that host.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_recipes.base import (
    IMAGE_TEXT_EXTRA_COLUMNS,
    Recipe,
    SourceRecords,
    columns_for,
    validate_source_name,
)
from pipeline.data.corpus import (
    CHECKSUMS,
    FORMAT_VERSION,
    JSON_FORMAT,
    MANIFEST,
    SOURCES_DIR,
    TMP_PREFIX,
    PreparedCorpus,
    canonical_json,
    content_hash,
)
from pipeline.storage.atomic import atomic_write_json, discard_dir, publish_dir, reraise_disk_full
from pipeline.storage.integrity import checksum_files, files_under

log = logging.getLogger(__name__)

STALE_UNOWNED_SECONDS = 24 * 3600  # temp dirs without an owner pid (older code) count as stale after this


def _check_binary_vector(source: SourceRecords, i: int, column: str, value: Any, size: int) -> list[int]:
    """A record's attribute/label vector: exactly `size` values, each 0 or 1."""
    names = source.attributes["attribute_names" if column == "attributes" else "label_names"]
    if not isinstance(value, (list, tuple)) or len(value) != size:
        raise ValueError(
            f"source {source.name!r} record {i}: column {column!r} must be a list of {size} "
            f"values (one per name in {names}), got {value!r}"
        )
    out = []
    for name, v in zip(names, value, strict=True):
        if isinstance(v, bool) or v not in (0, 1):
            raise ValueError(
                f"source {source.name!r} record {i}: {column[:-1]} {name!r} must be 0 or 1 "
                f"(binary), got {v!r}"
            )
        out.append(int(v))
    return out


def _save_source(source: SourceRecords, target: Path) -> dict[str, Any]:
    """Materialise one source's records to ``target`` and return its manifest entry."""
    import datasets

    columns = columns_for(source.kind)
    extras = IMAGE_TEXT_EXTRA_COLUMNS if source.kind == "image_text" else ()
    data: dict[str, list[Any]] = {c: [] for c in (*columns, *extras)}
    sizes = {}
    if extras:
        sizes = {"attributes": len(source.attributes["attribute_names"]),
                 "labels": len(source.attributes["label_names"])}
    num_characters = 0
    for i, record in enumerate(source.records):
        if not isinstance(record, dict):
            raise ValueError(f"source {source.name!r} record {i}: expected a dict, got {record!r}")
        for column in columns:
            value = record.get(column)
            if not isinstance(value, str) or not value:
                raise ValueError(
                    f"source {source.name!r} record {i}: column {column!r} must be a non-empty "
                    f"string, got {value!r}"
                )
            data[column].append(value)
            num_characters += len(value)
        for column in extras:
            if column not in record:
                raise ValueError(f"source {source.name!r} record {i}: missing column {column!r}")
            value = record[column]
            if column == "image":
                if not isinstance(value, (bytes, bytearray)):
                    raise ValueError(
                        f"source {source.name!r} record {i}: column 'image' must be bytes (raw "
                        f"RGB pixels, or b'' for records only), got {type(value).__name__}"
                    )
                data[column].append(bytes(value))
            else:
                data[column].append(_check_binary_vector(source, i, column, value, sizes[column]))
    num_documents = len(data[columns[0]])
    if num_documents == 0:
        raise ValueError(f"source {source.name!r} has zero documents")
    features = {c: datasets.Value("string") for c in columns}
    if extras:
        features.update(image=datasets.Value("binary"),
                        attributes=datasets.Sequence(datasets.Value("int8")),
                        labels=datasets.Sequence(datasets.Value("int8")))
    with _quiet_datasets():
        datasets.Dataset.from_dict(data, features=datasets.Features(features)).save_to_disk(str(target))
    entry: dict[str, Any] = {
        "name": source.name,
        "kind": source.kind,
        "language": source.language,
        "script": source.script,
        "num_documents": num_documents,
        "num_characters": num_characters,
        "attributes": source.attributes,
    }
    if source.kind == "parallel":
        entry["src_lang"] = source.src_lang
        entry["tgt_lang"] = source.tgt_lang
    try:
        canonical_json(entry)
    except TypeError as err:
        raise ValueError(
            f"source {source.name!r}: attributes are not JSON-serialisable: {err}"
        ) from err
    return entry


def _build(
    recipe: Recipe, fingerprint: dict[str, Any], digest: str, tmp: Path, progress: bool
) -> None:
    from tqdm.auto import tqdm

    sources: dict[str, Any] = {}
    checksums: dict[str, Any] = {}
    bar = tqdm(desc=f"prepare {recipe.name}", unit="source", disable=not progress)
    try:
        for source in recipe.sources():
            if not isinstance(source, SourceRecords):
                raise ValueError(
                    f"recipe {recipe.name!r} yielded {type(source).__name__}, expected SourceRecords"
                )
            if source.name in sources:
                raise ValueError(f"recipe {recipe.name!r} yielded source {source.name!r} twice")
            bar.set_postfix_str(source.name)
            source_dir = tmp / SOURCES_DIR / source.name
            sources[source.name] = _save_source(source, source_dir)
            checksums[source.name] = checksum_files(source_dir, files_under(source_dir))
            bar.update(1)
    finally:
        bar.close()
    if not sources:
        raise ValueError(f"recipe {recipe.name!r} yielded no sources")
    manifest = {
        "format_version": FORMAT_VERSION,
        "recipe": recipe.name,
        "content_hash": digest,
        "fingerprint": fingerprint,
        "sources": {name: sources[name] for name in sorted(sources)},
        CHECKSUMS: {name: checksums[name] for name in sorted(checksums)},
    }
    # The manifest goes last: a directory with a manifest has all its sources.
    atomic_write_json(tmp / MANIFEST, manifest, prefix=TMP_PREFIX + MANIFEST, **JSON_FORMAT)


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence datasets' per-call progress bars; our own bar counts sources."""
    from datasets.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def corpus_dir(recipe: Recipe, cache_dir: str | Path) -> tuple[Path, str, dict[str, Any]]:
    """(target directory, content hash, fingerprint) of a recipe, without building it."""
    fingerprint = recipe.fingerprint()
    try:
        digest = content_hash(fingerprint)
    except TypeError as err:
        raise ValueError(
            f"recipe {recipe.name!r}: fingerprint is not JSON-serialisable: {err}"
        ) from err
    validate_source_name(recipe.name)
    return Path(cache_dir) / "prepared" / f"{recipe.name}-{digest[:16]}", digest, fingerprint


def prepare_sources(recipe: Recipe, cache_dir: str | Path, progress: bool = True) -> PreparedCorpus:
    """Prepare (or load from cache) every source of ``recipe``.

    Args:
        recipe: an object following :class:`data_recipes.base.Recipe`.
        cache_dir: cache root; output goes to ``<cache_dir>/prepared/<name>-<hash16>/``.
        progress: show a tqdm bar while building.

    Returns:
        The validated :class:`PreparedCorpus`.
    """
    target, digest, fingerprint = corpus_dir(recipe, cache_dir)
    if target.exists():
        try:
            corpus = PreparedCorpus.load(target)
            log.info("prepared sources: cache hit %s", target)
            return corpus
        except ValueError as err:
            log.warning("prepared sources at %s are invalid (%s); rebuilding", target, err)
            _discard(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(target.parent)
    tmp = make_temp_dir(target.parent, target.name)
    began = time.perf_counter()
    try:
        with reraise_disk_full(tmp):
            _build(recipe, fingerprint, digest, tmp, progress)
        written = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        publish_dir(tmp, target)  # another process may have finished the same corpus first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = max(time.perf_counter() - began, 1e-9)
    log.info("prepared sources: built %s in %.1f s (%.1f MB written, %.2f MB/s)", target, seconds, written / 1e6,
             written / 1e6 / seconds)
    return PreparedCorpus.load(target, verify=False)  # checksummed from these very files just now


# -- temp directories that outlive a killed process -----------------------------------------
_OWNED_TEMP = re.compile(r"-pid(?P<pid>\d+)@(?P<host>.+)-[^-]+$")


def make_temp_dir(parent: Path, name: str) -> Path:
    """A hidden temp directory ``.tmp-<name>-pid<pid>@<host>-<random>`` in `parent`: the
    owner's pid and host let a later start tell a killed build's leftovers from a live one."""
    host = socket.gethostname().replace("/", "_").replace("-", "_") or "localhost"
    return Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{name}-pid{os.getpid()}@{host}-", dir=parent))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return True
    return True


def remove_stale_temp_dirs(parent: Path) -> list[Path]:
    """Remove ``.tmp-*`` directories in `parent` that no live process owns; returns them.

    Owned (``-pid<pid>@<host>-``) on this host: stale when that pid is gone. On another host
    (a shared file system): left alone, its owner may be alive there. Without an owner (names
    from older code, and `discard_dir` trash): stale when untouched for a day.
    """
    parent = Path(parent)
    if not parent.is_dir():
        return []
    host = socket.gethostname().replace("/", "_").replace("-", "_") or "localhost"
    removed = []
    for path in parent.glob(f"{TMP_PREFIX}*"):
        if not path.is_dir() or path.is_symlink():
            continue
        match = _OWNED_TEMP.search(path.name)
        if match:
            stale = match.group("host") == host and not _pid_alive(int(match.group("pid")))
        else:
            try:
                stale = time.time() - path.stat().st_mtime > STALE_UNOWNED_SECONDS
            except OSError:
                continue
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                removed.append(path)
    if removed:
        log.warning("removed %d temp folder(s) left by killed preparations: %s", len(removed),
                    ", ".join(p.name for p in removed))
    return removed


def _discard(path: Path) -> None:
    """Move an invalid directory out of the way atomically, then delete it."""
    discard_dir(path, TMP_PREFIX)
