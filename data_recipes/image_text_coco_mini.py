"""COCO-mini image-text records (``../shared/data/coco_mini``): real images, a noisy attribute.

Input (see ``../shared/data/README.md``): ``records.jsonl`` with one COCO-2017 image per line
(``captions`` (5, English), ``objects`` {category: count}, ``gender_from_captions`` in
male | female | mixed | none, ``thumb`` a 128-px thumbnail path or null) and ``thumbs/``.

Per record:

* attributes (m = 2, overlapping): ``male`` and ``female`` from ``gender_from_captions``
  (a keyword heuristic over the captions, i.e. a *perceived* attribute): male -> (1, 0),
  female -> (0, 1), mixed -> (1, 1), none -> (0, 0).
* labels: the ``num_labels`` most frequent object categories (by images, ties by name);
  label r is 1 when the image contains that category.
* caption: the first caption (``captions: first``) or one record per caption (``all``).

Modes: by default only records with a thumbnail are kept (images resized to
``image_size``); ``records_only: true`` keeps every record with ``image = b""`` (for the data
statistics and M4 on all 159 records; training needs images and refuses them).

Licences: COCO annotations CC BY 4.0; thumbnails only of CC BY 2.0 / CC BY-SA 2.0 images
(per-record ``license``, ``license_url`` kept in the manifest's source attributes).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_recipes.base import SourceRecords, require_dir, require_file, sha256_file
from data_recipes.image_text_base import check_image_size, to_rgb_bytes

GENDER_TO_ATTRIBUTES = {"male": (1, 0), "female": (0, 1), "mixed": (1, 1), "none": (0, 0)}
ATTRIBUTE_NAMES = ["male", "female"]
ATTRIBUTE_PROMPTS = [["a photo", "a photo of a man"], ["a photo", "a photo of a woman"]]
CAPTIONS = ("first", "all")


class ImageTextCocoMini:
    """Recipe for ``coco_mini`` (see the module docstring).

    Args:
        path: the coco_mini directory.
        image_size: image edge in pixels after the centre crop and resize.
        num_labels: object categories used as labels (most frequent first).
        records_only: keep every record without images instead of only those with thumbnails.
        captions: ``first`` (one record per image) or ``all`` (one per caption).
        name: recipe name used in the cache directory name.
    """

    def __init__(self, path: str | Path = "../shared/data/coco_mini", image_size: int = 32,
                 num_labels: int = 20, records_only: bool = False, captions: str = "first",
                 name: str = "coco_mini") -> None:
        self.path = Path(path)
        self.image_size = check_image_size(image_size)
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"num_labels must be a positive integer, got {num_labels!r}")
        self.num_labels = num_labels
        self.records_only = bool(records_only)
        if captions not in CAPTIONS:
            raise ValueError(f"captions must be one of {CAPTIONS}, got {captions!r}")
        self.captions = captions
        self.name = name

    def _records_file(self) -> Path:
        require_dir(self.path, "coco_mini directory")
        return require_file(self.path / "records.jsonl", "coco_mini records file")

    def _read(self) -> list[dict[str, Any]]:
        path = self._records_file()
        records = []
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{str(path)!r} line {number}: not valid JSON: {err}") from err
                for key in ("image_id", "captions", "objects", "gender_from_captions"):
                    if key not in record:
                        raise ValueError(f"{str(path)!r} line {number}: missing attribute column {key!r}")
                gender = record["gender_from_captions"]
                if gender not in GENDER_TO_ATTRIBUTES:
                    raise ValueError(f"{str(path)!r} line {number}: gender_from_captions must be one of "
                                     f"{sorted(GENDER_TO_ATTRIBUTES)}, got {gender!r}")
                if not record["captions"] or not all(isinstance(c, str) and c.strip() for c in record["captions"]):
                    raise ValueError(f"{str(path)!r} line {number}: captions must be non-empty strings")
                record["_line"] = number
                records.append(record)
        if not records:
            raise ValueError(f"{str(path)!r} has zero records")
        return records

    def label_names(self, records: list[dict[str, Any]]) -> list[str]:
        counts = Counter(category for r in records for category in r["objects"])
        return [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: self.num_labels]]

    def _selected(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return records if self.records_only else [r for r in records if r.get("thumb")]

    def fingerprint(self) -> dict[str, Any]:
        records_file = self._records_file()
        files = {"records.jsonl": sha256_file(records_file)}
        if not self.records_only:
            for record in self._selected(self._read()):
                thumb = self.path / record["thumb"]
                if not thumb.is_file():
                    raise ValueError(f"{str(records_file)!r} line {record['_line']}: thumbnail "
                                     f"{str(thumb)!r} does not exist")
                files[record["thumb"]] = sha256_file(thumb)
        return {"recipe": self.name, "module": "data_recipes.image_text_coco_mini",
                "image_size": self.image_size, "num_labels": self.num_labels,
                "records_only": self.records_only, "captions": self.captions, "files": files}

    def sources(self) -> Iterator[SourceRecords]:
        records = self._read()
        labels = self.label_names(records)  # from every record: the same labels in both modes
        selected = self._selected(records)
        if not selected:
            raise ValueError(f"{str(self.path)!r} has no record with a thumbnail; use records_only: true")

        def rows() -> Iterator[dict[str, Any]]:
            for record in selected:
                image = b"" if self.records_only else to_rgb_bytes(
                    record["thumb"], self.image_size, f"coco_mini line {record['_line']}", self.path)
                attributes = list(GENDER_TO_ATTRIBUTES[record["gender_from_captions"]])
                label_vector = [int(name in record["objects"]) for name in labels]
                texts = record["captions"][:1] if self.captions == "first" else record["captions"]
                for text in texts:
                    yield {"text": " ".join(text.split()), "image": image, "attributes": attributes,
                           "labels": label_vector}

        yield SourceRecords(
            name="coco-eng", kind="image_text", records=rows(), language="eng", script="Latn",
            attributes={"attribute_names": list(ATTRIBUTE_NAMES), "label_names": labels,
                        "label_prompts": [f"a photo of a {name}" for name in labels],
                        "attribute_prompts": [list(p) for p in ATTRIBUTE_PROMPTS],
                        "image_size": [self.image_size, self.image_size], "role": "train",
                        "has_images": not self.records_only, "origin": "coco_mini",
                        "attribute_source": "gender_from_captions (caption keyword heuristic)",
                        "licenses": sorted({r.get("license", "") for r in selected} - {""})})
