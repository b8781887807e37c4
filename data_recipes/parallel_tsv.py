"""Directory of tab-separated parallel files: ``<path>/<xxx>-<yyy>.tsv``.

Each line is ``src<TAB>tgt`` (e.g. ``/work/shared/data/tatoeba/parallel/deu-eng.tsv`` holds
German<TAB>English). The source is named after the file stem (``deu-eng``); its language is the
``xxx`` side. Blank lines are skipped; any other line without exactly one tab, or with an
empty side, is an error naming the file and line number.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_recipes.base import (
    FsPath,
    SourceRecords,
    as_path,
    check_positive_int,
    guess_script,
    normalize_languages,
    requested_language_files,
    require_dir,
    require_file,
    sha256_file,
)

_PAIR_RE = re.compile(r"^([A-Za-z0-9_]+)-([A-Za-z0-9_]+)$")


def read_tsv_pairs(path: str | Path | FsPath, limit: int | None = None) -> list[dict[str, str]]:
    """Read ``src<TAB>tgt`` lines.

    Raises:
        ValueError: missing or empty file, non-UTF-8 text, a malformed line (with its number),
            or no pairs at all.
    """
    path = require_file(path)
    records: list[dict[str, str]] = []
    try:
        with path.open("r", encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, start=1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                parts = line.split("\t")
                if len(parts) != 2:
                    raise ValueError(
                        f"{str(path)!r} line {lineno}: expected 'src<TAB>tgt' (2 fields), "
                        f"got {len(parts)} field(s): {line[:80]!r}"
                    )
                src, tgt = parts[0].strip(), parts[1].strip()
                if not src or not tgt:
                    raise ValueError(
                        f"{str(path)!r} line {lineno}: empty src or tgt: {line[:80]!r}"
                    )
                records.append({"src": src, "tgt": tgt})
                if limit is not None and len(records) >= limit:
                    break
    except UnicodeDecodeError as err:
        raise ValueError(f"source file {str(path)!r} is not valid UTF-8: {err}") from err
    if not records:
        raise ValueError(f"source file {str(path)!r} has zero documents (only blank lines)")
    return records


class ParallelTSV:
    """Parallel sources from ``<path>/<xxx>-<tgt_lang>.tsv`` files.

    Args:
        path: the directory: a local path or an fsspec URL (``s3://bucket/parallel``, ``memory://...``).
        languages: optional list of ``xxx`` codes to keep; each must have a file.
        tgt_lang: the target side every file pairs with (default ``eng``).
        max_documents_per_source: optional cap (first N pairs).
        name: recipe name used in the cache directory name.
    """

    def __init__(
        self,
        path: str | Path,
        languages: list[str] | None = None,
        tgt_lang: str = "eng",
        max_documents_per_source: int | None = None,
        name: str = "parallel_tsv",
    ) -> None:
        self.path = as_path(path)  # a local path or an fsspec URL
        self.languages = normalize_languages(languages)
        self.tgt_lang = str(tgt_lang)
        self.max_documents_per_source = check_positive_int(
            max_documents_per_source, "max_documents_per_source"
        )
        self.name = name

    def _files(self) -> list[tuple[str, Path]]:
        root = require_dir(self.path)
        if self.languages is None:
            out = []
            for path in sorted(root.glob(f"*-{self.tgt_lang}.tsv")):
                match = _PAIR_RE.match(path.stem)
                if not match:
                    raise ValueError(f"cannot parse a language pair from file name {str(path)!r}")
                out.append((match.group(1), path))
            if not out:
                raise ValueError(f"data directory {str(root)!r} has no *-{self.tgt_lang}.tsv files")
            return out
        return requested_language_files(root, self.languages, lambda lang: f"{lang}-{self.tgt_lang}.tsv")

    def fingerprint(self) -> dict[str, Any]:
        return {
            "recipe": self.name,
            "module": "data_recipes.parallel_tsv",
            "languages": self.languages,
            "tgt_lang": self.tgt_lang,
            "max_documents_per_source": self.max_documents_per_source,
            "files": {path.name: sha256_file(path) for _, path in self._files()},
        }

    def sources(self) -> Iterator[SourceRecords]:
        for lang, path in self._files():
            records = read_tsv_pairs(path, limit=self.max_documents_per_source)
            yield SourceRecords(
                name=f"{lang}-{self.tgt_lang}",
                kind="parallel",
                records=records,
                language=lang,
                script=guess_script(r["src"] for r in records),
                attributes={"file": path.name},
                src_lang=lang,
                tgt_lang=self.tgt_lang,
            )
