"""Generic image-text recipe over Hugging Face ``datasets`` read from local files (never the hub).

Input as `data_recipes.hf_generic.HFGeneric` (a ``save_to_disk`` directory or local
json/jsonl/parquet/csv files). Columns:

* ``image_column``: a ``datasets.Image`` feature, encoded image bytes, a ``{"bytes", "path"}``
  dict or a file path (relative to the data directory); null for records-only sources.
* ``caption_column``: the caption text.
* ``attribute_columns`` (m >= 1) and ``label_columns`` (c >= 0): binary (0/1 or bool).
* ``language_column`` (optional): one source per value (a caption language such as ``deu``),
  so languages mix through the mixing stages like text sources; else one source ``language``.

Sources are named ``img-<language>``. Missing columns, non-binary attribute or label values
and empty captions raise ValueError naming the column, row and value.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_recipes.base import SourceRecords, guess_script, validate_source_name
from data_recipes.hf_generic import HFGeneric
from data_recipes.image_text_base import binary_value, check_image_size, to_rgb_bytes


def _names(value: Any, key: str, allow_empty: bool) -> list[str]:
    if isinstance(value, str) or value is None:
        raise ValueError(f"{key} must be a list of column names, got {value!r}")
    names = [str(v) for v in value]
    if not names and not allow_empty:
        raise ValueError(f"{key} is empty: M4 and the bias metrics need at least one sensitive attribute column")
    if len(set(names)) != len(names):
        raise ValueError(f"{key} lists a column twice: {names}")
    return names


class ImageTextHF(HFGeneric):
    """Image-text sources from a local ``datasets`` dataset or data files.

    Args:
        path, format, split: as `HFGeneric`.
        image_column: column with the image (null: records only, ``image = b""``).
        caption_column: column with the caption.
        attribute_columns, label_columns: binary columns (attributes s, labels y).
        language_column: optional column naming each row's caption language.
        language: the language when there is no language column.
        image_size: image edge in pixels after the centre crop and resize.
        label_prompts: optional zero-shot prompt per label (default ``"a photo of a {label}"``).
        attribute_prompts: optional ``[absent, present]`` prompt pair per attribute.
        max_rows_per_source: optional cap (first N rows of each source).
        name: recipe name used in the cache directory name.
    """

    def __init__(self, path: str | Path, caption_column: str, attribute_columns: list[str],
                 label_columns: list[str] | None = None, image_column: str | None = "image",
                 language_column: str | None = None, language: str = "eng", format: str = "auto",
                 split: str = "train", image_size: int = 32, label_prompts: list[str] | None = None,
                 attribute_prompts: list[list[str]] | None = None, max_rows_per_source: int | None = None,
                 name: str = "image_text_hf") -> None:
        super().__init__(path, source_column=language_column or caption_column, text_column=caption_column,
                         format=format, split=split, max_documents_per_source=max_rows_per_source, name=name)
        self.caption_column = caption_column
        self.image_column = image_column
        self.language_column = language_column
        self.language = language
        self.attribute_columns = _names(attribute_columns, "attribute_columns", allow_empty=False)
        self.label_columns = _names(label_columns or [], "label_columns", allow_empty=True)
        self.image_size = check_image_size(image_size)
        for key, prompts, count in (("label_prompts", label_prompts, len(self.label_columns)),
                                    ("attribute_prompts", attribute_prompts, len(self.attribute_columns))):
            if prompts is not None and len(prompts) != count:
                raise ValueError(f"{key} must have one entry per column ({count}), got {len(prompts)}")
        if attribute_prompts is not None and not all(len(p) == 2 for p in attribute_prompts):
            raise ValueError("attribute_prompts entries must be [absent prompt, present prompt] pairs")
        self.label_prompts = list(label_prompts) if label_prompts else [f"a photo of a {c}" for c in self.label_columns]
        self.attribute_prompts = [list(p) for p in attribute_prompts] if attribute_prompts else None

    def fingerprint(self) -> dict[str, Any]:
        base = super().fingerprint()
        base.update(module="data_recipes.image_text_hf", image_column=self.image_column,
                    caption_column=self.caption_column, attribute_columns=self.attribute_columns,
                    label_columns=self.label_columns, language_column=self.language_column,
                    language=self.language, image_size=self.image_size, label_prompts=self.label_prompts,
                    attribute_prompts=self.attribute_prompts)
        return base

    def _table(self):
        import datasets

        fmt, files = self._resolve()
        wanted = [self.caption_column, *self.attribute_columns, *self.label_columns]
        wanted += [c for c in (self.image_column, self.language_column) if c]
        with tempfile.TemporaryDirectory(prefix="mixpipe-hf-") as tmp:
            try:
                if fmt == "disk":
                    ds = datasets.load_from_disk(str(self.path))
                    if isinstance(ds, datasets.DatasetDict):
                        if self.split not in ds:
                            raise ValueError(f"{str(self.path)!r} has no split {self.split!r}; splits: {sorted(ds)}")
                        ds = ds[self.split]
                else:
                    ds = datasets.load_dataset(fmt, data_files=[str(f) for f in files], split=self.split,
                                               cache_dir=tmp)
            except ValueError:
                raise
            except Exception as err:  # datasets raises many types for unreadable files
                raise ValueError(f"cannot read dataset at {str(self.path)!r}: {err}") from err
            missing = [c for c in wanted if c not in ds.column_names]
            if missing:
                raise ValueError(f"dataset {str(self.path)!r} is missing column(s) {missing}; "
                                 f"available: {ds.column_names}")
            ds = ds.select_columns(list(dict.fromkeys(wanted)))
            if self.image_column and isinstance(ds.features[self.image_column], datasets.Image):
                ds = ds.cast_column(self.image_column, datasets.Image(decode=False))  # bytes/path dicts
            return ds.to_dict()

    def sources(self) -> Iterator[SourceRecords]:
        columns = self._table()
        base_dir = self.path if self.path.is_dir() else self.path.parent
        groups: dict[str, list[dict[str, Any]]] = {}
        for i, caption in enumerate(columns[self.caption_column]):
            where = f"dataset {str(self.path)!r} row {i}"
            lang = str(columns[self.language_column][i]) if self.language_column else self.language
            rows = groups.setdefault(lang, [])
            if self.max_documents_per_source and len(rows) >= self.max_documents_per_source:
                continue
            text = "" if caption is None else " ".join(str(caption).split())
            if not text:
                raise ValueError(f"{where}: empty caption in column {self.caption_column!r}")
            image = (to_rgb_bytes(columns[self.image_column][i], self.image_size, where, base_dir)
                     if self.image_column else b"")
            rows.append({
                "text": text, "image": image,
                "attributes": [binary_value(columns[c][i], c, where) for c in self.attribute_columns],
                "labels": [binary_value(columns[c][i], c, where) for c in self.label_columns],
            })
        if not groups:
            raise ValueError(f"dataset {str(self.path)!r} has zero rows")
        for lang in sorted(groups):
            name = f"img-{lang}"
            try:
                validate_source_name(name)
            except ValueError as err:
                raise ValueError(f"{str(self.path)!r} column {self.language_column!r}: {err}") from err
            attributes = {"attribute_names": list(self.attribute_columns), "label_names": list(self.label_columns),
                          "label_prompts": list(self.label_prompts),
                          "image_size": [self.image_size, self.image_size], "role": "train",
                          "has_images": bool(self.image_column), "dataset": self.path.name}
            if self.attribute_prompts:
                attributes["attribute_prompts"] = self.attribute_prompts
            yield SourceRecords(name=name, kind="image_text", records=groups[lang], language=lang,
                                script=guess_script(r["text"] for r in groups[lang]), attributes=attributes)
