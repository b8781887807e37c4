"""The recipe contract and small helpers shared by the recipes.

A recipe is a plain object (built by Hydra from ``_target_``) that turns raw files into named
sources. It does not write anything: :func:`pipeline.data.build_corpus.prepare_sources` stores
what it yields as Arrow datasets plus a manifest, cached by a hash of :meth:`Recipe.fingerprint`.

Record schema:

* ``kind="mono"``: each record is ``{"text": str}``.
* ``kind="parallel"``: each record is ``{"src": str, "tgt": str}``; the source carries
  ``src_lang`` and ``tgt_lang``.
* ``kind="image_text"``: each record is ``{"text": caption, "image": bytes, "attributes":
  [0/1] * m, "labels": [0/1] * c}``; ``image`` is raw uint8 RGB pixels (H x W x 3, row-major,
  size in the source's ``attributes["image_size"]``) or ``b""`` in records-only mode. The
  source's ``attributes`` name them: ``attribute_names`` (m), ``label_names`` (c).
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import IO, Any, Literal, Protocol, runtime_checkable

Kind = Literal["mono", "parallel", "image_text"]
KINDS: tuple[str, ...] = ("mono", "parallel", "image_text")
# Non-text columns of image-text records (stored as binary / int8 lists, not strings).
IMAGE_TEXT_EXTRA_COLUMNS: tuple[str, ...] = ("image", "attributes", "labels")

# Source names become directory names and metric suffixes (``data/prob/lang=deu``), so keep
# them to a portable alphabet.
_SOURCE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass
class SourceRecords:
    """One named source produced by a recipe.

    Attributes:
        name: unique source name, e.g. ``"deu"`` or ``"deu-eng"``.
        kind: ``"mono"`` (records ``{"text"}``) or ``"parallel"`` (records ``{"src", "tgt"}``).
        records: a list or an iterator of record dicts.
        language: the source's language code (for parallel sources, the non-English side).
        script: ISO 15924 script code (``"Latn"``) when known.
        attributes: JSON-serialisable per-source metadata copied into the manifest.
        src_lang: source-side language (parallel only).
        tgt_lang: target-side language (parallel only).
    """

    name: str
    kind: Kind
    records: Iterable[dict[str, str]]
    language: str
    script: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    src_lang: str | None = None
    tgt_lang: str | None = None

    def __post_init__(self) -> None:
        validate_source_name(self.name)
        if self.kind not in KINDS:
            raise ValueError(
                f"source {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}"
            )
        if self.kind == "parallel" and (not self.src_lang or not self.tgt_lang):
            raise ValueError(f"parallel source {self.name!r} needs src_lang and tgt_lang")
        if self.kind != "parallel" and (self.src_lang or self.tgt_lang):
            raise ValueError(f"{self.kind} source {self.name!r} must not set src_lang/tgt_lang")
        if self.kind == "image_text":
            for key in ("attribute_names", "label_names"):
                names = self.attributes.get(key)
                if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                    raise ValueError(
                        f"image_text source {self.name!r}: attributes[{key!r}] must be a list of "
                        f"names, got {names!r}"
                    )

    @property
    def columns(self) -> tuple[str, ...]:
        """The record keys this kind requires."""
        return columns_for(self.kind)


@runtime_checkable
class Recipe(Protocol):
    """What :func:`pipeline.data.build_corpus.prepare_sources` needs from a recipe."""

    name: str

    def fingerprint(self) -> dict[str, Any]:
        """Everything that determines the output: name, options, input file hashes."""
        ...

    def sources(self) -> Iterator[SourceRecords]:
        """Yield the sources in a deterministic order."""
        ...


def columns_for(kind: str) -> tuple[str, ...]:
    """Text record keys for a source kind (image_text adds IMAGE_TEXT_EXTRA_COLUMNS)."""
    if kind in ("mono", "image_text"):
        return ("text",)
    if kind == "parallel":
        return ("src", "tgt")
    raise ValueError(f"unknown source kind {kind!r}; expected one of {KINDS}")


def validate_source_name(name: str) -> str:
    """Raise ValueError unless ``name`` is usable as a directory and metric name."""
    if not isinstance(name, str) or not _SOURCE_NAME_RE.match(name):
        raise ValueError(
            f"invalid source name {name!r}: use letters, digits, '_', '-', '.' "
            "and start with a letter or digit"
        )
    return name


# -- inputs by URL ---------------------------------------------------------------------------
# A recipe's `path` may be a local path or an fsspec URL (``s3://bucket/corpus``,
# ``gs://...``, ``file:///data/corpus``, ``memory://corpus``): `as_path` turns a URL into an
# `FsPath`, which has the few pathlib methods the recipes use, so one code path reads both.
# Local paths stay `pathlib.Path` (same fingerprints and behaviour as before). The protocol's
# fsspec implementation must be installed (s3fs, gcsfs, ...); `file` and `memory` come with
# fsspec itself.
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def is_url(path: Any) -> bool:
    """True for ``<protocol>://...`` strings (fsspec URLs)."""
    return isinstance(path, str) and bool(_URL_RE.match(path))


class FsPath:
    """A file or folder on an fsspec file system, with the pathlib methods recipes use.

    ``str()`` gives the URL, so error messages name what the user typed.
    """

    def __init__(self, url: str | None = None, *, fs: Any = None, path: str | None = None) -> None:
        if fs is None:
            import fsspec

            try:
                fs, path = fsspec.core.url_to_fs(url)
            except (ImportError, ValueError) as err:  # unknown protocol or its package missing
                raise ValueError(f"cannot open {url!r}: {err}") from err
        self.fs = fs
        self.path = str(path).rstrip("/") or "/"

    def _child(self, path: str) -> FsPath:
        return FsPath(fs=self.fs, path=path)

    @property
    def url(self) -> str:
        return str(self.fs.unstrip_protocol(self.path))

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"FsPath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FsPath) and (self.url, self.path) == (other.url, other.path)

    def __hash__(self) -> int:
        return hash(self.url)

    def __lt__(self, other: FsPath) -> bool:
        return self.path < other.path

    def __truediv__(self, name: str) -> FsPath:
        return self._child(posixpath.join(self.path, str(name)))

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def stem(self) -> str:
        return PurePosixPath(self.path).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.path).suffix

    @property
    def parent(self) -> FsPath:
        return self._child(posixpath.dirname(self.path) or "/")

    def exists(self) -> bool:
        return bool(self.fs.exists(self.path))

    def is_file(self) -> bool:
        return bool(self.fs.isfile(self.path))

    def is_dir(self) -> bool:
        return bool(self.fs.isdir(self.path))

    def iterdir(self) -> Iterator[FsPath]:
        for entry in sorted(self.fs.ls(self.path, detail=False)):
            if str(entry).rstrip("/") != self.path:
                yield self._child(str(entry))

    def glob(self, pattern: str) -> Iterator[FsPath]:
        for entry in sorted(self.fs.glob(posixpath.join(self.path, pattern))):
            yield self._child(str(entry))

    def rglob(self, pattern: str) -> Iterator[FsPath]:
        """Every file below (fsspec's ``find``); only ``"*"`` is supported."""
        if pattern != "*":
            raise ValueError(f"FsPath.rglob supports only '*', got {pattern!r}")
        for entry in sorted(self.fs.find(self.path)):
            yield self._child(str(entry))

    def relative_to(self, other: FsPath) -> PurePosixPath:
        return PurePosixPath(self.path).relative_to(other.path)

    def stat(self) -> SimpleNamespace:
        return SimpleNamespace(st_size=int(self.fs.size(self.path)))

    def open(self, mode: str = "r", encoding: str | None = None) -> IO:
        if "b" in mode:
            return self.fs.open(self.path, mode)
        return self.fs.open(self.path, mode, encoding=encoding or "utf-8")

    def read_bytes(self) -> bytes:
        with self.open("rb") as handle:
            return handle.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def local_path(self) -> Path | None:
        """The plain path when the file system is the local one (``file://``), else None."""
        from fsspec.implementations.local import LocalFileSystem

        return Path(self.path) if isinstance(self.fs, LocalFileSystem) else None

    def download(self, target: Path) -> Path:
        """Copy this file (or folder, recursively) to the local `target`; returns `target`."""
        if self.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            for entry in self.rglob("*"):
                local = target / entry.relative_to(self)
                local.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(entry.path, str(local))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(self.path, str(target))
        return target


def as_path(path: str | Path | FsPath) -> Path | FsPath:
    """`FsPath` for an fsspec URL (or an FsPath), `pathlib.Path` for anything else."""
    if isinstance(path, FsPath):
        return path
    return FsPath(path) if is_url(path) else Path(path)


def sha256_file(path: str | Path | FsPath, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (a local path or an fsspec URL)."""
    digest = hashlib.sha256()
    with as_path(path).open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def require_dir(path: str | Path | FsPath, what: str = "data directory") -> Path | FsPath:
    """Return ``path`` as a Path (or an FsPath for a URL), or raise ValueError if it is not an
    existing directory."""
    path = as_path(path)
    if not path.exists():
        raise ValueError(f"{what} {str(path)!r} does not exist")
    if not path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is not a directory")
    return path


def requested_language_files(root: Path, languages: list[str], file_name) -> list[tuple[str, Path]]:
    """[(language, root / file_name(language))] for requested languages; a missing file is an
    error naming the language and the path."""
    out = []
    for lang in languages:
        path = root / file_name(lang)
        if not path.is_file():
            raise ValueError(f"language {lang!r} requested but source file {str(path)!r} is missing")
        out.append((lang, path))
    return out


def require_file(path: str | Path | FsPath, what: str = "source file") -> Path | FsPath:
    """Return ``path`` as a Path (or an FsPath for a URL), or raise ValueError if it is missing
    or empty."""
    path = as_path(path)
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise ValueError(f"{what} {str(path)!r} is empty")
    return path


def read_lines(path: str | Path | FsPath, limit: int | None = None) -> list[str]:
    """Read a UTF-8 text file as one document per line, dropping blank lines.

    Raises:
        ValueError: the file is missing, empty, not UTF-8, or has no non-blank line.
    """
    path = require_file(path)
    docs: list[str] = []
    try:
        with path.open("r", encoding="utf-8") as handle:
            for line in handle:
                text = line.rstrip("\r\n").strip()
                if text:
                    docs.append(text)
                    if limit is not None and len(docs) >= limit:
                        break
    except UnicodeDecodeError as err:
        raise ValueError(f"source file {str(path)!r} is not valid UTF-8: {err}") from err
    if not docs:
        raise ValueError(f"source file {str(path)!r} has zero documents (only blank lines)")
    return docs


def check_positive_int(value: Any, key: str) -> int | None:
    """Validate an optional positive integer option."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{key} must be a positive integer or null, got {value!r}")
    return value


def normalize_languages(
    languages: Iterable[str] | None, key: str = "languages"
) -> list[str] | None:
    """Validate an optional list of language codes; returns a sorted de-duplicated list."""
    if languages is None:
        return None
    if isinstance(languages, str):
        raise ValueError(f"{key} must be a list of language codes, got the string {languages!r}")
    out = sorted({str(lang) for lang in languages})
    if not out:
        raise ValueError(f"{key} is an empty list; use null to keep every language")
    return out


# Unicode character-name prefixes to ISO 15924 codes, for guessing a source's script.
_SCRIPT_BY_NAME_PREFIX = {
    "LATIN": "Latn",
    "CYRILLIC": "Cyrl",
    "ARABIC": "Arab",
    "DEVANAGARI": "Deva",
    "CJK": "Hani",
    "HIRAGANA": "Jpan",
    "KATAKANA": "Jpan",
    "HANGUL": "Hang",
    "THAI": "Thai",
    "GREEK": "Grek",
    "HEBREW": "Hebr",
    "GEORGIAN": "Geor",
    "ARMENIAN": "Armn",
    "ETHIOPIC": "Ethi",
    "BENGALI": "Beng",
    "TAMIL": "Taml",
    "TELUGU": "Telu",
    "MALAYALAM": "Mlym",
    "KHMER": "Khmr",
    "GUJARATI": "Gujr",
    "GURMUKHI": "Guru",
    "KANNADA": "Knda",
    "ORIYA": "Orya",
    "SINHALA": "Sinh",
    "LAO": "Laoo",
    "MYANMAR": "Mymr",
    "TIBETAN": "Tibt",
    "MONGOLIAN": "Mong",
    "SYRIAC": "Syrc",
    "THAANA": "Thaa",
    "TIFINAGH": "Tfng",
    "CHEROKEE": "Cher",
    "YI": "Yiii",
}


def guess_script(texts: Iterable[str], max_chars: int = 20000) -> str | None:
    """Most frequent script (ISO 15924) among the letters of ``texts``; None if no letters."""
    counts: Counter[str] = Counter()
    seen = 0
    for text in texts:
        for char in text:
            if not char.isalpha():
                continue
            name = unicodedata.name(char, "")
            prefix = name.split(" ", 1)[0]
            counts[_SCRIPT_BY_NAME_PREFIX.get(prefix, prefix.title() or "Zyyy")] += 1
            seen += 1
        if seen >= max_chars:
            break
    if not counts:
        return None
    # Sort for a deterministic winner on ties.
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
