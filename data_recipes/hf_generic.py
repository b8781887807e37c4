"""Generic recipe over Hugging Face ``datasets`` read from local files (never the hub).

Input is either a dataset saved with ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``
(``format: disk``) or local ``json``/``jsonl``/``parquet``/``csv`` files read with
``datasets.load_dataset(<builder>, data_files=...)``. Rows are grouped into sources by the
value of ``source_column`` (a language code such as ``deu``, or a pair such as ``deu-eng``).

* mono: ``text_column`` holds the text.
* parallel: set ``target_column``; ``text_column`` is the source side. For a source value
  ``xxx-yyy`` the languages are parsed from it; otherwise ``src_lang`` is the value and
  ``tgt_lang`` is the ``target_language`` option.

Rows with an empty text (or target) are dropped; a source left with zero rows is an error.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_recipes.base import (
    SourceRecords,
    as_path,
    check_positive_int,
    guess_script,
    normalize_languages,
    sha256_file,
    validate_source_name,
)

FORMATS = ("auto", "disk", "json", "parquet", "csv")
_SUFFIX_TO_BUILDER = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
_PAIR_RE = re.compile(r"^([A-Za-z0-9_]+)-([A-Za-z0-9_]+)$")


def locate_json_error(files: list[Path]) -> str | None:
    """The first malformed row of JSON / JSON-lines files: ``<file> line <n>: <error>``.

    A file that parses as one JSON document (an array or object) is fine as a whole; otherwise
    every non-blank line must be one JSON object.
    """
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            line = path.read_bytes()[: err.start].count(b"\n") + 1
            return f"{path} line {line}: not UTF-8 ({err.reason})"
        except OSError as err:
            return f"{path}: {err}"
        if path.suffix.lower() == ".json":
            try:
                json.loads(text)
                continue
            except json.JSONDecodeError:
                pass  # maybe JSON lines in a .json file: check line by line
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                snippet = line.strip()
                snippet = snippet if len(snippet) <= 80 else snippet[:77] + "..."
                return f"{path} line {number}: invalid JSON ({err.msg} at column {err.colno}): {snippet}"
            if not isinstance(row, dict):
                return f"{path} line {number}: expected a JSON object per line, got {type(row).__name__}"
    return None


def _innermost(error: BaseException) -> str:
    """The deepest cause's message, prefixed by the outer one when they differ."""
    inner = error
    while inner.__cause__ is not None or inner.__context__ is not None:
        inner = inner.__cause__ or inner.__context__
    return str(error) if inner is error else f"{error} ({type(inner).__name__}: {inner})"


class HFGeneric:
    """Sources from a local ``datasets`` dataset or data files.

    Args:
        path: a ``save_to_disk`` directory, a data file, or a directory of data files; a
            local path or an fsspec URL (``s3://...``, ``memory://...``; copied to a temp
            folder to be read).
        source_column: column whose value names the source (language or pair).
        text_column: column with the text (the source side for parallel data).
        target_column: optional column with the target side; makes every source parallel.
        target_language: ``tgt_lang`` for parallel sources whose name is not ``xxx-yyy``.
        format: ``auto`` (from the path), ``disk``, ``json``, ``parquet`` or ``csv``.
        split: split to read (``load_dataset`` calls local files ``train``).
        languages: optional list of source values to keep; each must occur.
        max_documents_per_source: optional cap (first N rows of each source).
        name: recipe name used in the cache directory name.
    """

    def __init__(
        self,
        path: str | Path,
        source_column: str,
        text_column: str,
        target_column: str | None = None,
        target_language: str = "eng",
        format: str = "auto",
        split: str = "train",
        languages: list[str] | None = None,
        max_documents_per_source: int | None = None,
        name: str = "hf_generic",
    ) -> None:
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        for key, value in (("source_column", source_column), ("text_column", text_column)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{key} must be a non-empty column name, got {value!r}")
        self.path = as_path(path)  # a local path or an fsspec URL
        self.source_column = source_column
        self.text_column = text_column
        self.target_column = target_column
        self.target_language = target_language
        self.format = format
        self.split = split
        self.languages = normalize_languages(languages)
        self.max_documents_per_source = check_positive_int(
            max_documents_per_source, "max_documents_per_source"
        )
        self.name = name

    # -- inputs ---------------------------------------------------------------------------
    def _resolve(self) -> tuple[str, list[Path]]:
        """(builder, input files) for this path; ``disk`` lists the saved dataset's files."""
        path = self.path
        if not path.exists():
            raise ValueError(f"dataset path {str(path)!r} does not exist")
        fmt = self.format
        if fmt == "auto":
            if path.is_dir() and (
                (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
            ):
                fmt = "disk"
            elif path.is_file():
                fmt = _SUFFIX_TO_BUILDER.get(path.suffix.lower(), "")
                if not fmt:
                    raise ValueError(
                        f"cannot infer the format of {str(path)!r} from its suffix; "
                        f"set format to one of {FORMATS[1:]}"
                    )
            else:
                builders = {
                    _SUFFIX_TO_BUILDER[p.suffix.lower()]
                    for p in path.iterdir()
                    if p.is_file() and p.suffix.lower() in _SUFFIX_TO_BUILDER
                }
                if len(builders) != 1:
                    raise ValueError(
                        f"directory {str(path)!r} must hold data files of exactly one format "
                        f"(json/jsonl/parquet/csv) or a save_to_disk dataset; found {sorted(builders)}"
                    )
                fmt = builders.pop()
        if fmt == "disk":
            if not path.is_dir():
                raise ValueError(f"format 'disk' needs a save_to_disk directory, got {str(path)!r}")
            files = sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            files = [path]
        else:
            suffixes = [s for s, b in _SUFFIX_TO_BUILDER.items() if b == fmt]
            files = sorted(
                p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes
            )
        if not files:
            raise ValueError(f"dataset path {str(path)!r} has no {fmt} data files")
        for file in files:
            if fmt != "disk" and file.stat().st_size == 0:
                raise ValueError(f"data file {str(file)!r} is empty")
        return fmt, files

    def fingerprint(self) -> dict[str, Any]:
        fmt, files = self._resolve()
        root = self.path if self.path.is_dir() else self.path.parent
        return {
            "recipe": self.name,
            "module": "data_recipes.hf_generic",
            "format": fmt,
            "split": self.split,
            "source_column": self.source_column,
            "text_column": self.text_column,
            "target_column": self.target_column,
            "target_language": self.target_language,
            "languages": self.languages,
            "max_documents_per_source": self.max_documents_per_source,
            "files": {str(f.relative_to(root)): sha256_file(f) for f in files},
        }

    def _local_inputs(self, fmt: str, files: list, target: Path) -> tuple[Path, list[Path]]:
        """(dataset path, data files) on the local disk: as given, or for a URL on another
        file system copied below `target` (a temp folder: datasets reads local files)."""
        if isinstance(self.path, Path):
            return self.path, files
        local = self.path.local_path()
        if local is not None:
            return local, [f.local_path() for f in files]
        if fmt == "disk":
            return self.path.download(target / self.path.name), []
        root = self.path if self.path.is_dir() else self.path.parent
        return target, [f.download(target / f.relative_to(root)) for f in files]

    def _columns(self) -> dict[str, list[Any]]:
        import datasets

        fmt, files = self._resolve()
        wanted = [self.source_column, self.text_column]
        if self.target_column:
            wanted.append(self.target_column)
        # load_dataset writes Arrow files to a cache; keep that cache private and temporary
        # so nothing lands in ~/.cache/huggingface and nothing outlives this call.
        with tempfile.TemporaryDirectory(prefix="mixpipe-hf-") as tmp:
            local_path, local_files = self._local_inputs(fmt, files, Path(tmp) / "input")
            try:
                if fmt == "disk":
                    ds = datasets.load_from_disk(str(local_path))
                    if isinstance(ds, datasets.DatasetDict):
                        if self.split not in ds:
                            raise ValueError(
                                f"{str(self.path)!r} has no split {self.split!r}; "
                                f"splits: {sorted(ds)}"
                            )
                        ds = ds[self.split]
                else:
                    ds = datasets.load_dataset(
                        fmt,
                        data_files=[str(f) for f in local_files],
                        split=self.split,
                        cache_dir=tmp,
                    )
            except ValueError:
                raise
            except Exception as err:  # datasets raises many types for unreadable files
                # datasets says only "An error occurred while generating the dataset": find
                # the row it choked on and name the file and line instead.
                located = locate_json_error(files) if fmt == "json" else None
                if located:
                    raise ValueError(f"cannot read dataset at {str(self.path)!r}: {located}") from err
                raise ValueError(f"cannot read dataset at {str(self.path)!r}: {_innermost(err)}") from err
            missing = [c for c in wanted if c not in ds.column_names]
            if missing:
                raise ValueError(
                    f"dataset {str(self.path)!r} is missing column(s) {missing}; "
                    f"available: {ds.column_names}"
                )
            return ds.select_columns(wanted).to_dict()

    def sources(self) -> Iterator[SourceRecords]:
        columns = self._columns()
        groups: dict[str, list[dict[str, str]]] = {}
        seen_sources: set[str] = set()
        parallel = bool(self.target_column)
        for i, source in enumerate(columns[self.source_column]):
            if source is None or str(source) == "":
                raise ValueError(
                    f"dataset {str(self.path)!r} row {i}: empty {self.source_column!r} value"
                )
            source = str(source)
            seen_sources.add(source)
            if self.languages is not None and source not in self.languages:
                continue
            records = groups.setdefault(source, [])
            if self.max_documents_per_source and len(records) >= self.max_documents_per_source:
                continue
            text = columns[self.text_column][i]
            text = "" if text is None else str(text).strip()
            if parallel:
                target = columns[self.target_column][i]
                target = "" if target is None else str(target).strip()
                if text and target:
                    records.append({"src": text, "tgt": target})
            elif text:
                records.append({"text": text})
        if self.languages is not None:
            absent = [lang for lang in self.languages if lang not in seen_sources]
            if absent:
                raise ValueError(
                    f"language(s) {absent} requested but column {self.source_column!r} of "
                    f"{str(self.path)!r} has no such value"
                )
        if not groups:
            raise ValueError(f"dataset {str(self.path)!r} has zero rows")
        for source in sorted(groups):
            records = groups[source]
            if not records:
                raise ValueError(
                    f"source {source!r} in {str(self.path)!r} has zero documents "
                    f"(every {self.text_column!r} value is empty)"
                )
            try:
                validate_source_name(source)
            except ValueError as err:
                raise ValueError(
                    f"{str(self.path)!r} column {self.source_column!r}: {err}"
                ) from err
            attrs = {"dataset": self.path.name}
            if parallel:
                match = _PAIR_RE.match(source)
                src_lang, tgt_lang = (
                    (match.group(1), match.group(2)) if match else (source, self.target_language)
                )
                yield SourceRecords(
                    name=source,
                    kind="parallel",
                    records=records,
                    language=src_lang,
                    script=guess_script(r["src"] for r in records),
                    attributes=attrs,
                    src_lang=src_lang,
                    tgt_lang=tgt_lang,
                )
            else:
                yield SourceRecords(
                    name=source,
                    kind="mono",
                    records=records,
                    language=source,
                    script=guess_script(r["text"] for r in records),
                    attributes=attrs,
                )
