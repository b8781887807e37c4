"""Prepared sources: Arrow datasets on disk plus a manifest, cached by a content hash.

Layout of one prepared corpus::

    <cache_dir>/prepared/<recipe.name>-<content_hash[:16]>/
        manifest.json
        sources/<source name>/           # datasets.Dataset.save_to_disk
        token_counts-<tokenizer_hash[:16]>.json

``content_hash`` is the sha256 of the canonical JSON of the recipe's fingerprint and
:data:`FORMAT_VERSION`; the same inputs always land in the same directory, so a second
:func:`prepare_sources` is a cache hit. A corpus directory appears only complete: it is built
in a hidden temp directory beside the target and renamed into place.

The manifest records a checksum (pipeline/storage/integrity.py, XXH3-128) of every file of every
source directory, taken when the corpus is built and verified when it is loaded: a file whose
bytes changed while its size did not is not a cache hit (the corpus is rebuilt, with a warning
naming the file). Corpora prepared before checksums existed still load, with a warning.

Temp directories are named ``.tmp-<target>-pid<pid>@<host>-<random>``; one whose process is
gone (killed during preparation) is removed by the next :func:`prepare_sources` on that host.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
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
from pipeline.storage.atomic import atomic_write_json, discard_dir, publish_dir, reraise_disk_full
from pipeline.storage.integrity import checksum_files, files_under, verify_files

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SOURCES_DIR = "sources"
TMP_PREFIX = ".tmp-"
UNITS = ("documents", "characters", "tokens")
CHECKSUMS = "checksums"  # manifest key: {source name: {"algorithm", "files": {name: {size, digest}}}}
STALE_UNOWNED_SECONDS = 24 * 3600  # temp dirs without an owner pid (older code) count as stale after this


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the input of every content hash."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_hash(fingerprint: dict[str, Any]) -> str:
    """sha256 of a recipe fingerprint together with :data:`FORMAT_VERSION`."""
    payload = canonical_json({"fingerprint": fingerprint, "format_version": FORMAT_VERSION})
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Canonical (sorted, indented, UTF-8) JSON, published atomically."""
    atomic_write_json(path, obj, prefix=TMP_PREFIX + Path(path).name, suffix="", indent=2, sort_keys=True,
                      ensure_ascii=False)


def _read_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError as err:
        raise ValueError(f"{what} {str(path)!r} is missing") from err
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {str(path)!r} is unreadable or not valid JSON: {err}") from err


def _arrow_num_rows(source_dir: Path) -> int:
    """Row count of a save_to_disk directory, read from the Arrow files without loading rows."""
    import pyarrow as pa

    state = _read_json(source_dir / "state.json", "dataset state file")
    files = state.get("_data_files") if isinstance(state, dict) else None
    if not files:
        raise ValueError(
            f"dataset state file {str(source_dir / 'state.json')!r} lists no data files"
        )
    total = 0
    for entry in files:
        path = source_dir / entry["filename"]
        try:
            with pa.memory_map(str(path), "r") as mm:
                reader = pa.ipc.open_stream(mm)
                total += sum(batch.num_rows for batch in reader)
        except (OSError, pa.ArrowInvalid) as err:
            raise ValueError(f"Arrow file {str(path)!r} is missing or unreadable: {err}") from err
    return total


def _tokens_file(corpus_dir: Path, tokenizer_hash: str) -> Path:
    return corpus_dir / f"token_counts-{tokenizer_hash[:16]}.json"


class PreparedCorpus:
    """A validated prepared corpus on disk. Build with :meth:`load` or :func:`prepare_sources`.

    Datasets are memory-mapped and opened lazily on first :meth:`dataset` call.
    """

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self._datasets: dict[str, Any] = {}
        self._token_counts: dict[str, int] | None = None
        self._tokenizer_hash: str | None = None

    # -- loading and validation -------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, tokenizer_hash: str | None = None, verify: bool = True) -> PreparedCorpus:
        """Load and validate a prepared corpus directory.

        Args:
            path: the corpus directory (``.../prepared/<name>-<hash16>``).
            tokenizer_hash: select the token counts of this tokenizer. None selects the only
                token-count file if exactly one exists.
            verify: check every source file against the checksums in the manifest (reads
                every byte once; disk-bound: the hash runs at several GB/s).

        Raises:
            ValueError: naming the path, if the manifest is missing or unparsable, the format
                version differs, the hash in the manifest does not match the directory name,
                a source directory is missing or unreadable, a row count disagrees with
                the manifest, or (IntegrityError) a file's checksum differs from the one
                recorded when it was prepared.
        """
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"prepared corpus {str(path)!r} does not exist")
        manifest = _read_json(path / MANIFEST, "manifest")
        if not isinstance(manifest, dict):
            raise ValueError(f"manifest {str(path / MANIFEST)!r} is not a JSON object")
        for key in ("format_version", "content_hash", "recipe", "sources"):
            if key not in manifest:
                raise ValueError(f"manifest {str(path / MANIFEST)!r} lacks key {key!r}")
        if manifest["format_version"] != FORMAT_VERSION:
            raise ValueError(
                f"prepared corpus {str(path)!r} has format_version {manifest['format_version']!r}, "
                f"this code reads {FORMAT_VERSION}; prepare it again"
            )
        digest = str(manifest["content_hash"])
        expected_name = f"{manifest['recipe']}-{digest[:16]}"
        if path.name != expected_name:
            raise ValueError(
                f"prepared corpus {str(path)!r}: manifest content_hash {digest[:16]}... "
                f"does not match the directory name (expected {expected_name!r})"
            )
        if "fingerprint" in manifest and content_hash(manifest["fingerprint"]) != digest:
            raise ValueError(
                f"prepared corpus {str(path)!r}: manifest content_hash does not match its "
                "fingerprint (tampered manifest)"
            )
        sources = manifest["sources"]
        if not isinstance(sources, dict) or not sources:
            raise ValueError(f"manifest {str(path / MANIFEST)!r} has no sources")
        checksums = manifest.get(CHECKSUMS)
        if verify and checksums is None:
            log.warning("prepared corpus %s has no checksums (prepared before they existed); its files are "
                        "not verified: delete it to prepare it again with checksums", path)
        for name, entry in sources.items():
            validate_source_name(name)
            source_dir = path / SOURCES_DIR / name
            if not source_dir.is_dir():
                raise ValueError(f"source {name!r}: directory {str(source_dir)!r} is missing")
            num_rows = _arrow_num_rows(source_dir)
            if num_rows != entry.get("num_documents"):
                raise ValueError(
                    f"source {name!r} in {str(source_dir)!r} has {num_rows} rows but the "
                    f"manifest says num_documents={entry.get('num_documents')!r}"
                )
            if verify and checksums is not None:
                if not isinstance(checksums, dict) or name not in checksums:
                    raise ValueError(f"manifest {str(path / MANIFEST)!r} has no checksums for source {name!r}")
                verify_files(source_dir, checksums[name], f"prepared source {name!r}")
        corpus = cls(path, manifest)
        corpus._select_token_counts(tokenizer_hash)
        return corpus

    # -- metadata -----------------------------------------------------------------------------
    @property
    def content_hash(self) -> str:
        return str(self.manifest["content_hash"])

    @property
    def recipe_name(self) -> str:
        return str(self.manifest["recipe"])

    @property
    def source_names(self) -> list[str]:
        return sorted(self.manifest["sources"])

    def _entry(self, name: str) -> dict[str, Any]:
        try:
            return self.manifest["sources"][name]
        except KeyError:
            raise ValueError(
                f"unknown source {name!r} in {str(self.path)!r}; sources: {self.source_names}"
            ) from None

    def source_info(self, name: str) -> dict[str, Any]:
        """The manifest entry of a source (name, kind, language, script, sizes, ...)."""
        return dict(self._entry(name))

    def kind(self, name: str) -> str:
        return str(self._entry(name)["kind"])

    def language(self, name: str) -> str:
        return str(self._entry(name)["language"])

    def languages(self) -> list[str]:
        """Every language in the corpus, including both sides of parallel sources."""
        langs: set[str] = set()
        for name in self.source_names:
            entry = self._entry(name)
            langs.add(entry["language"])
            for key in ("src_lang", "tgt_lang"):
                if entry.get(key):
                    langs.add(entry[key])
        return sorted(langs)

    def num_documents(self, name: str) -> int:
        return int(self._entry(name)["num_documents"])

    def num_characters(self, name: str) -> int:
        return int(self._entry(name)["num_characters"])

    def dataset(self, name: str):
        """The source's ``datasets.Dataset`` (memory-mapped; random access by index)."""
        if name not in self._datasets:
            import datasets

            entry = self._entry(name)
            source_dir = self.path / SOURCES_DIR / name
            try:
                ds = datasets.load_from_disk(str(source_dir))
            except Exception as err:  # datasets raises FileNotFoundError, ArrowInvalid, ...
                raise ValueError(
                    f"source {name!r}: cannot load {str(source_dir)!r}: {err}"
                ) from err
            if len(ds) != entry["num_documents"]:
                raise ValueError(
                    f"source {name!r} in {str(source_dir)!r} has {len(ds)} rows but the manifest "
                    f"says num_documents={entry['num_documents']}"
                )
            self._datasets[name] = ds
        return self._datasets[name]

    # -- sizes and token counts -----------------------------------------------------------
    def sizes(self, unit: str = "documents") -> dict[str, int]:
        """Size of every source in ``documents``, ``characters`` or ``tokens``.

        Raises:
            ValueError: unknown unit, or ``tokens`` without token counts attached.
        """
        if unit == "documents":
            return {n: self.num_documents(n) for n in self.source_names}
        if unit == "characters":
            return {n: self.num_characters(n) for n in self.source_names}
        if unit == "tokens":
            if self._token_counts is None:
                raise ValueError(
                    f"corpus {str(self.path)!r} has no token counts attached; run "
                    "`python -m pipeline.prepare` (or pipeline.prepare.prepare(cfg)) with a "
                    "tokenizer first, or load with the tokenizer's hash"
                )
            return dict(self._token_counts)
        raise ValueError(f"unknown size unit {unit!r}; expected one of {UNITS}")

    @property
    def token_counts(self) -> dict[str, int] | None:
        """Tokens per source for the attached tokenizer, or None."""
        return None if self._token_counts is None else dict(self._token_counts)

    @property
    def tokenizer_hash(self) -> str | None:
        """Hash of the tokenizer whose counts are attached, or None."""
        return self._tokenizer_hash

    def attach_token_counts(self, counts: dict[str, int], tokenizer_hash: str) -> None:
        """Validate, store (atomically, ``token_counts-<hash16>.json``) and select counts."""
        if not isinstance(tokenizer_hash, str) or len(tokenizer_hash) < 16:
            raise ValueError(f"tokenizer_hash must be a hex digest, got {tokenizer_hash!r}")
        names = set(self.source_names)
        if set(counts) != names:
            raise ValueError(
                f"token counts must cover exactly the sources of {str(self.path)!r}: "
                f"missing {sorted(names - set(counts))}, unknown {sorted(set(counts) - names)}"
            )
        clean: dict[str, int] = {}
        for name, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"token count of source {name!r} must be an int >= 0, got {value!r}"
                )
            clean[name] = int(value)
        write_json_atomic(
            _tokens_file(self.path, tokenizer_hash),
            {"tokenizer_hash": tokenizer_hash, "content_hash": self.content_hash, "counts": clean},
        )
        self._token_counts = clean
        self._tokenizer_hash = tokenizer_hash

    def load_token_counts(self, tokenizer_hash: str) -> dict[str, int] | None:
        """Select and return the stored counts of ``tokenizer_hash``; None if absent."""
        path = _tokens_file(self.path, tokenizer_hash)
        if not path.exists():
            return None
        data = _read_json(path, "token counts file")
        counts = data.get("counts") if isinstance(data, dict) else None
        if (
            not isinstance(counts, dict)
            or data.get("tokenizer_hash") != tokenizer_hash
            or set(counts) != set(self.source_names)
        ):
            raise ValueError(
                f"token counts file {str(path)!r} does not match this corpus or tokenizer; "
                "delete it and count again"
            )
        self._token_counts = {k: int(v) for k, v in counts.items()}
        self._tokenizer_hash = tokenizer_hash
        return dict(self._token_counts)

    def _select_token_counts(self, tokenizer_hash: str | None) -> None:
        if tokenizer_hash is not None:
            if self.load_token_counts(tokenizer_hash) is None:
                raise ValueError(
                    f"corpus {str(self.path)!r} has no token counts for tokenizer "
                    f"{tokenizer_hash[:16]}"
                )
            return
        files = sorted(self.path.glob("token_counts-*.json"))
        if len(files) == 1:
            data = _read_json(files[0], "token counts file")
            if isinstance(data, dict) and isinstance(data.get("tokenizer_hash"), str):
                self.load_token_counts(data["tokenizer_hash"])

    def __repr__(self) -> str:
        return (
            f"PreparedCorpus({str(self.path)!r}, recipe={self.recipe_name!r}, "
            f"sources={len(self.source_names)})"
        )


# -- building -------------------------------------------------------------------------------
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
    write_json_atomic(tmp / MANIFEST, manifest)


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
    try:
        with reraise_disk_full(tmp):
            _build(recipe, fingerprint, digest, tmp, progress)
        publish_dir(tmp, target)  # another process may have finished the same corpus first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("prepared sources: built %s", target)
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
