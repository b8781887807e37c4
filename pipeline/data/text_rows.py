"""Rows from prepared sources: token ids, targets, per-token loss weights and source ids.

Mono rows are ``<bos> text <eos>`` and every next token is a target. Parallel rows are
decoder-only translation, ``<2tgt> source-text <eos> target-text <eos>``, with targets
only on the target side (GNMT's target-language tag). In window mode (``loader.unit=window``)
a mono source's examples are its token windows (`pipeline.data.windows`): their per-token
``segments`` become document ids, and targets across a document boundary are dropped.

Items are (source_id, example_index, step) triples from the sampler. `step >= 0` weights
targets by the plan's loss weight at that step (times the example's factor when the plan
has ``example_weights``, M4 weights mode); `VALIDATION_STEP` weights them 1;
`PADDING_STEP` marks filler rows (no targets) that keep ranks in lock-step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from pipeline.data.row_reader import RowReader
from pipeline.data.split import SourceSplit
from pipeline.data.windows import TokenWindows

IGNORE_INDEX = -100
DIRECTIONS = ("both", "to_eng", "from_eng")
VALIDATION_STEP = -1
PADDING_STEP = -2


def num_targets(example: dict[str, Any], max_length: int) -> int:
    """Target tokens the collator will keep for an example (inputs are truncated to max_length)."""
    kept = min(len(example["ids"]) - 1, max_length)
    if "segments" in example:  # a window: no target across a document boundary
        segments = example["segments"]
        return int((segments[1:kept + 1] == segments[:kept]).sum()) if kept > 0 else 0
    return max(0, kept - example["target_from"] + 1)


class MixtureDataset(Dataset):
    """Map-style dataset over (source_id, example_index, step) triples.

    Args:
        corpus, tokenizer: a `PreparedCorpus` and its `Tokenizer`.
        sources: source names; a triple's source_id indexes this list.
        split: the per-source train/validation split; `part` picks the side.
        max_length: tokens per row (after the input/target shift).
        direction: translation direction: both (by example parity), to_eng, from_eng.
        windows: window mode: {source: its `TokenWindows`} for the mono sources; their
            indices (and the split's rows) are window numbers. None: document mode.
    """

    def __init__(self, corpus, tokenizer, sources: Sequence[str], split: SourceSplit,
                 part: str = "train", max_length: int = 128, direction: str = "both",
                 windows: Mapping[str, TokenWindows] | None = None):
        if direction not in DIRECTIONS:
            raise ValueError(f"translation direction must be one of {DIRECTIONS}, got {direction!r}")
        if part not in ("train", "val"):
            raise ValueError(f"part must be 'train' or 'val', got {part!r}")
        if max_length < 4:
            raise ValueError(f"max_length must be >= 4 tokens, got {max_length}")
        self.corpus, self.tokenizer, self.split = corpus, tokenizer, split
        self.sources = list(sources)
        self.reader = RowReader(corpus, self.sources)
        # (src_lang, tgt_lang) per parallel source, None for mono sources.
        self.languages = [(corpus.source_info(n)["src_lang"], corpus.source_info(n)["tgt_lang"])
                          if corpus.kind(n) == "parallel" else None for n in self.sources]
        self.part = part
        self.max_length = int(max_length)
        self.direction = direction
        self.windows = [(windows or {}).get(name) for name in self.sources]
        # Pre-tokenized sources (prepare.pretokenize): ids come from the token stores instead
        # of sentencepiece at every draw; the same ids (the stores hold the plain encoding).
        stores = getattr(corpus, "token_stores", None) or {}
        self.stores = ([stores[n] for n in self.sources]
                       if all(n in stores and stores[n].tokenizer_hash == tokenizer.content_hash
                              for n in self.sources) else None)
        for name, window in zip(self.sources, self.windows, strict=True):
            if window is not None and window.max_length != self.max_length:
                raise ValueError(f"windows of source {name!r} are {window.max_length} tokens, rows {self.max_length}")

    def build(self, items: Sequence[tuple[int, int, int]]) -> list[dict[str, Any]]:
        """Examples for the items: one vectorised split mapping, then windows, or token-store
        reads, or one Arrow take per kind and one tokenizer call per column."""
        if not items:
            return []
        source_ids = np.fromiter((item[0] for item in items), dtype=np.int64, count=len(items))
        indices = np.fromiter((item[1] for item in items), dtype=np.int64, count=len(items))
        rows = self.split.rows_many(self.sources, source_ids, indices, self.part)
        examples: list[dict[str, Any] | None] = [None] * len(items)
        windowed = np.array([self.windows[s] is not None for s in source_ids.tolist()], dtype=bool)
        for s in np.unique(source_ids[windowed]).tolist():
            where = np.flatnonzero(source_ids == s)
            for p, (ids, segments) in zip(where.tolist(), self.windows[s].read(rows[where]), strict=True):
                examples[p] = {"ids": ids, "target_from": 1, "segments": segments}
        documents = np.flatnonzero(~windowed).tolist()
        ids = self._ids_reader(source_ids, rows, documents)
        mono = [p for p in documents if self.reader.kinds[source_ids[p]] != "parallel"]
        pairs = [p for p in documents if self.reader.kinds[source_ids[p]] == "parallel"]
        if mono:
            for p, example in zip(mono, self._language_model(ids("text", mono)), strict=True):
                examples[p] = example
        if pairs:
            made = self._translation(ids("src", pairs), ids("tgt", pairs),
                                     [self.languages[int(source_ids[p])] for p in pairs],
                                     [int(indices[p]) for p in pairs])
            for p, example in zip(pairs, made, strict=True):
                examples[p] = example
        for p, (source_id, index, step) in enumerate(items):
            examples[p].update(source_id=int(source_id), index=int(index), step=int(step))
        return examples  # type: ignore[return-value]

    def _ids_reader(self, source_ids: np.ndarray, rows: np.ndarray, positions: list[int]):
        """A function (column, positions) -> token ids (no bos/eos) of those items' rows: read
        from the token stores when every source has one, else one Arrow take and encoded."""
        if self.stores is not None:
            stores = self.stores
            return lambda column, at: [stores[source_ids[p]].document(int(rows[p]), column).tolist() for p in at]
        chosen = np.asarray(positions, dtype=np.int64)
        records = dict(zip(positions, self.reader.read(source_ids[chosen], rows[chosen]), strict=True)) if positions else {}
        return lambda column, at: self.tokenizer.encode([records[p][column] for p in at])

    def __getitems__(self, items) -> list[dict[str, Any]]:
        examples = self._take_built(items) or self.build(items)
        step_items = getattr(items, "step_items", None)
        if step_items is not None and examples:
            # First micro-batch of a step: count the targets of the rank's whole step. In the
            # main process the step's other rows are built now and kept for their turn (one
            # split mapping and one read per step: measured 2x faster than counting first). A
            # dataloader worker gets only some of the step's micro-batches, so it counts windows
            # and pre-tokenized mono rows from their lengths, and builds only what it must.
            rest = list(step_items[len(items):])
            counted = self.count_targets(rest) if get_worker_info() is not None else None
            if counted is None:
                others = self.build(rest)
                self._built = (rest, others)
                counted = sum(num_targets(e, self.max_length) for e in others if e["step"] != PADDING_STEP)
            examples[0]["step_target_tokens"] = counted + sum(
                num_targets(e, self.max_length) for e in examples if e["step"] != PADDING_STEP)
        return examples

    def count_targets(self, items: Sequence[tuple[int, int, int]]) -> int | None:
        """Targets the collator will keep for `items` (padding rows excluded), from lengths
        only, or None when a row must be built to know (translation, or on-the-fly text)."""
        kept = [item for item in items if item[2] != PADDING_STEP]
        if not kept:
            return 0
        source_ids = np.fromiter((item[0] for item in kept), dtype=np.int64, count=len(kept))
        indices = np.fromiter((item[1] for item in kept), dtype=np.int64, count=len(kept))
        countable = [self.windows[s] is not None or (self.stores is not None and self.reader.kinds[s] == "mono")
                     for s in np.unique(source_ids).tolist()]
        if not all(countable):
            return None
        rows = self.split.rows_many(self.sources, source_ids, indices, self.part)
        total = 0
        for s in np.unique(source_ids).tolist():
            mine = rows[source_ids == s]
            if self.windows[s] is not None:
                total += int(self.windows[s].targets(mine).sum())
            else:  # <bos> ids[:max_length - 1] <eos>: min(len + 1, max_length) targets
                offsets = self.stores[s].offsets("text")
                lengths = offsets[mine + 1] - offsets[mine]
                total += int(np.minimum(lengths + 1, self.max_length).sum())
        return total

    def _take_built(self, items) -> list[dict[str, Any]] | None:
        """The examples built for `items` by the step's first micro-batch, if they are next."""
        rest, others = getattr(self, "_built", ((), ()))
        count = len(items)
        if not count or [tuple(item) for item in rest[:count]] != [tuple(item) for item in items]:
            return None
        self._built = (rest[count:], others[count:])
        return others[:count]

    def __getitem__(self, item: tuple[int, int, int]) -> dict[str, Any]:
        return self.build([item])[0]

    def __len__(self) -> int:
        table = self.split.train if self.part == "train" else self.split.val
        return sum(table[name] for name in self.sources)

    def _language_model(self, encoded: list[list[int]]) -> list[dict[str, Any]]:
        tok = self.tokenizer
        return [{"ids": [tok.bos_id, *ids[: self.max_length - 1], tok.eos_id], "target_from": 1} for ids in encoded]

    def _translation(self, sources: list[list[int]], targets: list[list[int]], languages: list[tuple[str, str]],
                     indices: list[int]) -> list[dict[str, Any]]:
        """Rows of encoded pairs (source and target side ids, no bos/eos)."""
        tok = self.tokenizer
        out = []
        encoded = zip(sources, targets, languages, indices, strict=True)
        for a, b, (src_lang, tgt_lang), index in encoded:
            # Direction per example is fixed by its index, so reruns see the same task.
            reverse = self.direction == "from_eng" or (self.direction == "both" and index % 2 == 1)
            (x, _), (y, y_lang) = ((b, tgt_lang), (a, src_lang)) if reverse else ((a, src_lang), (b, tgt_lang))
            budget = self.max_length - 2
            x = x[: max(1, budget // 2)]
            y = y[: max(1, budget - len(x) - 1)]
            ids = [tok.lang_tag_id(y_lang), *x, tok.eos_id, *y, tok.eos_id]
            out.append({"ids": ids, "target_from": len(x) + 2, "prompt_length": len(x) + 2,
                        "target_language": y_lang})
        return out


def plan_loss_weight(example: dict[str, Any], loss_weights, cache: dict[int, Any], example_weights=None) -> float:
    """The plan's loss weight of the example at its step: the source's weight times, when
    the plan has ``example_weights`` for the source, the example's own factor (indexed by
    the example's training index); 0 for padding rows, 1 for validation rows.

    Args:
        loss_weights: step -> (S,) weights; example_weights: None, or step -> per source id
            a (documents,) array of factors or None. Both memoised per step in `cache`.
    """
    step = example["step"]
    if step == PADDING_STEP:
        return 0.0
    if step == VALIDATION_STEP:
        return 1.0
    if step not in cache:
        cache[step] = (loss_weights(step), example_weights(step) if example_weights is not None else None)
    weights, factors = cache[step]
    weight = float(weights[example["source_id"]])
    factor = None if factors is None else factors[example["source_id"]]
    return weight if factor is None else weight * float(factor[example["index"]])


class MixtureCollator:
    """Pads (or packs) examples into tensors and attaches per-token loss weights.

    Args:
        loss_weights: callable step -> (S,) loss weights of the plan at that step.
        example_weights: optional callable step -> per source id the plan's
            ``example_weights`` array or None (`MixtureSampler.example_weights`): each
            example's factor is multiplied into its tokens' weight.
    """

    def __init__(self, loss_weights, pad_id: int, max_length: int, pack: bool = False, example_weights=None):
        self.loss_weights, self.pad_id, self.max_length, self.pack = loss_weights, pad_id, max_length, pack
        self.example_weights = example_weights

    def _weight(self, example: dict[str, Any], cache: dict[int, Any]) -> float:
        return plan_loss_weight(example, self.loss_weights, cache, self.example_weights)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        cache: dict[int, Any] = {}
        rows = self._packed_rows(examples) if self.pack else [[e] for e in examples]
        longest = max(len(e["ids"]) for e in examples) - 1
        length = self.max_length if self.pack else min(self.max_length, longest)
        batch = len(rows)
        # Filled in numpy and converted once: per-example torch slicing and small-tensor
        # creation cost ~30 us an example, ~1 ms of a demo step (scripts/bench_train.py).
        input_ids = np.full((batch, length), self.pad_id, dtype=np.int64)
        labels = np.full((batch, length), IGNORE_INDEX, dtype=np.int64)
        token_weights = np.zeros((batch, length), dtype=np.float32)
        token_sources = np.full((batch, length), -1, dtype=np.int64)
        document_ids = np.full((batch, length), -1, dtype=np.int64)
        for r, row in enumerate(rows):
            cursor = 0
            for d, example in enumerate(row):
                ids = example["ids"]
                n = min(len(ids) - 1, length - cursor)
                if n <= 0:
                    break
                end = cursor + n
                input_ids[r, cursor:end] = ids[:n]
                # Input position j predicts ids[j + 1]; targets are j + 1 >= target_from.
                first = cursor + min(max(example["target_from"] - 1, 0), n)
                if example["step"] != PADDING_STEP and first < end:
                    labels[r, first:end] = ids[first - cursor + 1:n + 1]
                    token_weights[r, first:end] = self._weight(example, cache)
                token_sources[r, cursor:end] = example["source_id"]
                document_ids[r, cursor:end] = d
                segments = example.get("segments")
                if segments is not None:  # a window: its documents, no target across a boundary
                    document_ids[r, cursor:end] = d + segments[:n]
                    crossing = np.flatnonzero(segments[1:n + 1] != segments[:n]) + cursor
                    labels[r, crossing] = IGNORE_INDEX
                    token_weights[r, crossing] = 0.0
                cursor = end
        input_ids, labels, token_weights, token_sources, document_ids = map(
            torch.from_numpy, (input_ids, labels, token_weights, token_sources, document_ids))
        step_targets = examples[0].get("step_target_tokens", -1)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "token_weights": token_weights,
            "token_source_ids": token_sources,
            "document_ids": document_ids,
            "attention_mask": (document_ids >= 0).long(),
            "source_ids": torch.tensor([row[0]["source_id"] for row in rows]),
            "example_index": torch.tensor([row[0].get("index", -1) for row in rows]),
            "step": torch.tensor([row[0]["step"] for row in rows]),
            "num_target_tokens": (labels != IGNORE_INDEX).sum(),
            # The rank's targets over the whole step on its first micro-batch, else -1.
            "step_target_tokens": torch.tensor(step_targets),
        }

    def _packed_rows(self, examples: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        """First-fit packing of whole examples into rows of max_length input tokens."""
        rows: list[list[dict[str, Any]]] = []
        free: list[int] = []
        for example in sorted(examples, key=lambda e: -len(e["ids"])):
            need = min(len(example["ids"]) - 1, self.max_length)
            slot = next((i for i, space in enumerate(free) if space >= need), None)
            if slot is None:
                rows.append([example])
                free.append(self.max_length - need)
            else:
                rows[slot].append(example)
                free[slot] -= need
        return rows
