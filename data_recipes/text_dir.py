"""Directory of plain-text files, one per language: ``<path>/<lang>.txt``.

One document per line; blank lines are dropped. The file stem is the source name and the
language (e.g. ``/work/shared/data/tatoeba/mono/deu.txt`` -> source ``deu``). The extension
is matched without regard to case (``deu.TXT`` is read too); other files in the directory are
named in one warning line rather than skipped silently (hidden dot-files excepted).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_recipes.base import (
    SourceRecords,
    as_path,
    check_positive_int,
    guess_script,
    normalize_languages,
    read_lines,
    requested_language_files,
    require_dir,
    sha256_file,
    validate_source_name,
)

log = logging.getLogger(__name__)


class TextDir:
    """Mono sources from ``<path>/<lang>.txt`` files.

    Args:
        path: the directory: a local path or an fsspec URL (``s3://bucket/mono``, ``memory://...``).
        languages: optional list of languages to keep; each must have a file.
        max_documents_per_source: optional cap (first N non-blank lines).
        name: recipe name used in the cache directory name.
    """

    suffix = ".txt"

    def __init__(
        self,
        path: str | Path,
        languages: list[str] | None = None,
        max_documents_per_source: int | None = None,
        name: str = "text_dir",
    ) -> None:
        self.path = as_path(path)  # a local path or an fsspec URL
        self.languages = normalize_languages(languages)
        self.max_documents_per_source = check_positive_int(
            max_documents_per_source, "max_documents_per_source"
        )
        self.name = name
        self._warned = False  # the "ignoring files" warning, once per recipe

    def _files(self) -> list[tuple[str, Path]]:
        root = require_dir(self.path)
        entries = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
        texts = [p for p in entries if p.suffix.lower() == self.suffix]
        by_stem: dict[str, list[Path]] = {}
        for path in texts:
            by_stem.setdefault(path.stem, []).append(path)
        for stem, paths in by_stem.items():
            if len(paths) > 1:
                raise ValueError(f"data directory {str(root)!r} has {len(paths)} files for source {stem!r} "
                                 f"({', '.join(p.name for p in paths)}); keep one")
        if self.languages is None:
            if not texts:
                raise ValueError(f"data directory {str(root)!r} has no *{self.suffix} files "
                                 f"(found: {', '.join(p.name for p in entries[:10]) or 'nothing'})")
            others = [p.name for p in entries if p.suffix.lower() != self.suffix]
            if others and not self._warned:
                self._warned = True
                log.warning("data directory %s: ignoring %d file(s) without the %s extension: %s", root,
                            len(others), self.suffix, ", ".join(others))
            out = [(p.stem, p) for p in texts]
        else:
            out = requested_language_files(
                root, self.languages,
                lambda lang: by_stem[lang][0].name if lang in by_stem else f"{lang}{self.suffix}")
        for lang, path in out:
            try:
                validate_source_name(lang)
            except ValueError as err:
                raise ValueError(f"{str(path)!r}: {err}") from err
        return out

    def fingerprint(self) -> dict[str, Any]:
        return {
            "recipe": self.name,
            "module": "data_recipes.text_dir",
            "languages": self.languages,
            "max_documents_per_source": self.max_documents_per_source,
            "files": {path.name: sha256_file(path) for _, path in self._files()},
        }

    def sources(self) -> Iterator[SourceRecords]:
        for lang, path in self._files():
            docs = read_lines(path, limit=self.max_documents_per_source)
            yield SourceRecords(
                name=lang,
                kind="mono",
                records=[{"text": d} for d in docs],
                language=lang,
                script=guess_script(docs),
                attributes={"file": path.name},
            )
