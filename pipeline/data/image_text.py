"""Image-text examples: prepared ``image_text`` sources -> the mixture sampler -> batches.

Image-text sources (one per caption language) go through the same mixing stages, sampler,
per-source split and resumable stream as text (`pipeline.data.datamodule`); only the rows differ.
A batch carries:

* ``images`` (B, 3, H, W) float32 in [-1, 1]; ``input_ids`` (B, T) ``<bos> caption <eos>``
  right-padded, ``eos_positions`` (B,) the index of each row's last real token;
* ``attributes`` (B, m) and ``labels`` (B, c) as 0/1 floats;
* ``source_ids`` (B,); ``weights`` (B,): the plan's loss weight of the row's source at its
  step times the row's factor in the plan's ``example_weights`` (M4 ``mode=weights``; 1
  otherwise), 1 for validation rows and 0 for padding rows;
* ``is_reference`` (B,): rows of a ``role=reference`` source (bias evaluation only).

Reference sources (``attributes.role == "reference"`` in the manifest) never enter training;
validation reads every row of them after the held-out rows of the training sources.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.data.datamodule import MixtureDataModule
from pipeline.data.row_reader import RowReader
from pipeline.data.split import SourceSplit
from pipeline.data.text_rows import VALIDATION_STEP, plan_loss_weight

REFERENCE_ROLE = "reference"


def image_text_info(corpus, names: Sequence[str]) -> dict[str, Any]:
    """Shared metadata of image-text sources: attribute/label names, image size, prompts.

    Raises:
        ValueError: a source is not ``image_text``, or the sources disagree on names or size.
    """
    info: dict[str, Any] | None = None
    for name in names:
        if corpus.kind(name) != "image_text":
            raise ValueError(f"source {name!r} is {corpus.kind(name)!r}, not image_text; "
                             "set sources.kinds=[image_text] for a multimodal run")
        attrs = corpus.source_info(name).get("attributes", {})
        mine = {key: attrs.get(key) for key in ("attribute_names", "label_names", "image_size",
                                                 "label_prompts", "attribute_prompts")}
        if info is None:
            info = mine
        elif {k: mine[k] for k in ("attribute_names", "label_names", "image_size")} != \
                {k: info[k] for k in ("attribute_names", "label_names", "image_size")}:
            raise ValueError(f"image_text source {name!r} disagrees with {names[0]!r} on attribute "
                             f"names, label names or image size: {mine} vs {info}")
    if info is None:
        raise ValueError("no image_text sources given")
    return info


def reference_sources(corpus) -> list[str]:
    """Names of the corpus's ``role=reference`` image-text sources."""
    return [n for n in corpus.source_names if corpus.kind(n) == "image_text"
            and corpus.source_info(n).get("attributes", {}).get("role") == REFERENCE_ROLE]


def decode_images(blobs: Sequence[bytes], size: Sequence[int], where: str = "") -> torch.Tensor:
    """Raw RGB bytes -> (B, 3, H, W) float32 in [-1, 1]."""
    h, w = int(size[0]), int(size[1])
    expected = h * w * 3
    for i, blob in enumerate(blobs):
        if len(blob) != expected:
            state = "no image (records-only source)" if not blob else f"{len(blob)} bytes"
            raise ValueError(f"{where}row {i}: image has {state}, expected {h}x{w}x3 = {expected} "
                             "bytes; training needs images")
    array = np.frombuffer(b"".join(blobs), dtype=np.uint8).reshape(len(blobs), h, w, 3)
    return torch.from_numpy(array.copy()).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


class ImageTextDataset(Dataset):
    """Map-style dataset over (source_id, example_index, step) triples of image-text sources.

    Args:
        corpus, tokenizer: a `PreparedCorpus` and its `Tokenizer`.
        sources: training sources (source_id indexes them); `reference` follow them, so
            source_id >= len(sources) reads reference row `example_index` directly.
        split: the per-source split; `part` picks the side for training sources.
        max_length: caption tokens per row including bos/eos.
    """

    def __init__(self, corpus, tokenizer, sources: Sequence[str], split: SourceSplit,
                 part: str = "train", max_length: int = 32, reference: Sequence[str] = ()):
        if part not in ("train", "val"):
            raise ValueError(f"part must be 'train' or 'val', got {part!r}")
        if max_length < 4:
            raise ValueError(f"max_length must be >= 4 tokens, got {max_length}")
        self.sources, self.reference = list(sources), list(reference)
        self.info = image_text_info(corpus, self.sources + self.reference)
        self.corpus, self.tokenizer, self.split, self.part = corpus, tokenizer, split, part
        self.reader = RowReader(corpus, self.sources + self.reference)
        self.max_length = int(max_length)

    def build(self, items: Sequence[tuple[int, int, int]]) -> list[dict[str, Any]]:
        if not items:
            return []
        source_ids = np.fromiter((it[0] for it in items), dtype=np.int64, count=len(items))
        indices = np.fromiter((it[1] for it in items), dtype=np.int64, count=len(items))
        num = len(self.sources)
        rows = indices.copy()
        own = source_ids < num
        if own.any():
            rows[own] = self.split.rows_many(self.sources, source_ids[own], indices[own], self.part)
        records = self.reader.read(source_ids, rows)
        encoded = self.tokenizer.encode([r["text"] for r in records])
        tok = self.tokenizer
        examples = []
        for (source_id, index, step), record, ids in zip(items, records, encoded, strict=True):
            examples.append({
                "ids": [tok.bos_id, *ids[: self.max_length - 2], tok.eos_id], "image": record["image"],
                "attributes": record["attributes"], "labels": record["labels"],
                "source_id": int(source_id), "index": int(index), "step": int(step),
                "is_reference": source_id >= num,
            })
        return examples

    def __getitems__(self, items) -> list[dict[str, Any]]:
        return self.build(items)

    def __getitem__(self, item: tuple[int, int, int]) -> dict[str, Any]:
        return self.build([item])[0]

    def __len__(self) -> int:
        table = self.split.train if self.part == "train" else self.split.val
        return sum(table[name] for name in self.sources)


class ImageTextCollator:
    """Examples -> tensors (see the module docstring).

    Args:
        loss_weights: callable step -> (S,) plan loss weights (None for validation).
        pad_id: padding token id; image_size: (H, W).
        example_weights: optional callable step -> per source id the plan's
            ``example_weights`` array or None (`MixtureSampler.example_weights`).
    """

    def __init__(self, loss_weights, pad_id: int, image_size: Sequence[int], example_weights=None):
        self.loss_weights, self.pad_id, self.image_size = loss_weights, pad_id, tuple(image_size)
        self.example_weights = example_weights

    def _weight(self, example: dict[str, Any], cache: dict[int, Any]) -> float:
        return plan_loss_weight(example, self.loss_weights, cache, self.example_weights)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        cache: dict[int, Any] = {}
        length = max(len(e["ids"]) for e in examples)
        input_ids = torch.full((len(examples), length), self.pad_id, dtype=torch.long)
        for r, e in enumerate(examples):
            input_ids[r, : len(e["ids"])] = torch.tensor(e["ids"])
        return {
            "images": decode_images([e["image"] for e in examples], self.image_size),
            "input_ids": input_ids,
            "eos_positions": torch.tensor([len(e["ids"]) - 1 for e in examples]),
            "attributes": torch.tensor([e["attributes"] for e in examples], dtype=torch.float32),
            "labels": torch.tensor([e["labels"] for e in examples], dtype=torch.float32),
            "source_ids": torch.tensor([e["source_id"] for e in examples]),
            "example_index": torch.tensor([e["index"] for e in examples]),
            "step": torch.tensor([e["step"] for e in examples]),
            "weights": torch.tensor([self._weight(e, cache) for e in examples], dtype=torch.float32),
            "is_reference": torch.tensor([e["is_reference"] for e in examples]),
        }


class ImageTextDataModule(MixtureDataModule):
    """`MixtureDataModule` whose rows are image-text pairs (same sampler, split, resume).

    Args:
        reference: ``role=reference`` sources evaluated (every row) after validation rows.
        Others as `MixtureDataModule` (max_length counts caption tokens). The sampler's plan
        carries M4 (``balance=m4``): ``example_keep`` (drawn by the sampler) or
        ``example_weights`` (applied by the collator).
    """

    def __init__(self, corpus, tokenizer, sampler, split: SourceSplit, micro_batch_size: int | None,
                 max_length: int = 32, num_workers: int = 0, reference: Sequence[str] = ()):
        super().__init__(corpus, tokenizer, sampler, split, micro_batch_size, max(4, max_length),
                         num_workers=num_workers)
        self.reference = list(reference)
        self.train_set = ImageTextDataset(corpus, tokenizer, self.sources, split, "train", max_length,
                                          self.reference)
        self.val_set = ImageTextDataset(corpus, tokenizer, self.sources, split, "val", max_length,
                                        self.reference)
        self.info = self.train_set.info
        size = self.info["image_size"]
        self.collate = ImageTextCollator(lambda step: sampler.plan_at(step).loss_weights,
                                         tokenizer.pad_id, size, example_weights=sampler.example_weights)
        self.val_collate = ImageTextCollator(lambda step: None, tokenizer.pad_id, size)

    def validation_items(self) -> list[tuple[int, int, int]]:
        """Held-out rows of the training sources, then every reference row (source ids
        after the training sources'); `val_items` shards and pads them by rank."""
        offset = len(self.sources)
        return super().validation_items() + [
            (offset + r, j, VALIDATION_STEP) for r, name in enumerate(self.reference)
            for j in range(self.corpus.num_documents(name))]

