"""Prepared corpora, read side: Arrow datasets on disk plus a manifest, validated on load.

Layout of one prepared corpus::

    <cache_dir>/prepared/<recipe.name>-<content_hash[:16]>/
        manifest.json
        sources/<source name>/           # datasets.Dataset.save_to_disk
        token_counts-<tokenizer_hash[:16]>.json
        token_stores-<tokenizer_hash[:16]>/<source>/   # pre-tokenized ids (pipeline/data/token_store.py)

``content_hash`` is the sha256 of the canonical JSON of the recipe's fingerprint and
:data:`FORMAT_VERSION`. Corpora are written (and cached by that hash) by
:func:`pipeline.data.build_corpus.prepare_sources`; this module reads them, and stores the
token counts of a tokenizer beside them.

The manifest records a checksum (pipeline/storage/integrity.py, XXH3-128) of every file of every
source directory, taken when the corpus is built and verified when it is loaded: a file whose
bytes changed while its size did not is not a cache hit (the corpus is rebuilt, with a warning
naming the file). Corpora prepared before checksums existed still load, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from data_recipes.base import validate_source_name
from pipeline.storage.atomic import atomic_write_json
from pipeline.storage.integrity import verify_files

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SOURCES_DIR = "sources"
TMP_PREFIX = ".tmp-"
UNITS = ("documents", "characters", "tokens")
CHECKSUMS = "checksums"  # manifest key: {source name: {"algorithm", "files": {name: {size, digest}}}}
# How the JSON files beside prepared data (manifest, token counts, tokenizer metadata) are
# written with `atomic_write_json`: canonical (sorted, indented, UTF-8), and staged in a temp
# file named `TMP_PREFIX + <file name>...` (pass ``prefix=TMP_PREFIX + path.name``).
JSON_FORMAT: dict[str, Any] = {"suffix": "", "indent": 2, "sort_keys": True, "ensure_ascii": False}


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the input of every content hash."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_hash(fingerprint: dict[str, Any]) -> str:
    """sha256 of a recipe fingerprint together with :data:`FORMAT_VERSION`."""
    payload = canonical_json({"fingerprint": fingerprint, "format_version": FORMAT_VERSION})
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


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
    """A validated prepared corpus on disk. Build with :meth:`load` or
    :func:`pipeline.data.build_corpus.prepare_sources`.

    Datasets are memory-mapped and opened lazily on first :meth:`dataset` call.
    """

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self._datasets: dict[str, Any] = {}
        self._token_counts: dict[str, int] | None = None
        self._tokenizer_hash: str | None = None
        # {source: TokenStore} when `prepare.pretokenize` built them (pipeline.prepare sets it;
        # pipeline.data.token_store.open_token_stores opens them for a tokenizer hash).
        self.token_stores: dict[str, Any] | None = None

    # -- loading and validation -------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, tokenizer_hash: str | None = None, verify: bool = True) -> PreparedCorpus:
        """Load and validate a prepared corpus directory.

        Args:
            path: the corpus directory (``.../prepared/<name>-<hash16>``).
            tokenizer_hash: select the token counts of this tokenizer. None selects the only
                token-count file if exactly one exists.
            verify: check every source file against the checksums in the manifest (reads
                every byte once; disk-bound: the hash runs at several GB/s) and its row count.

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
            # Counting rows opens the source's Arrow files (~0.1 ms each, 1 s at 10^4 sources): a
            # check of verify's; without it `RowReader` checks a source when it first reads it.
            num_rows = _arrow_num_rows(source_dir) if verify else entry.get("num_documents")
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
        path = _tokens_file(self.path, tokenizer_hash)
        atomic_write_json(
            path,
            {"tokenizer_hash": tokenizer_hash, "content_hash": self.content_hash, "counts": clean},
            prefix=TMP_PREFIX + path.name,
            **JSON_FORMAT,
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
