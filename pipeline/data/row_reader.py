"""Batched row reads across many prepared sources: one Arrow take per source kind.

Reading a micro-batch source by source costs one `Dataset.__getitem__` per source
(~100 us each); with 100+ sources that, not the data, dominated the loader. All sources of
a kind share a schema, so they are concatenated once into one memory-mapped view (no
copy) and a micro-batch becomes a single take of global row numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class RowReader:
    """Args:
        corpus: a `PreparedCorpus`.
        sources: source names; `read` takes indices into this list.
    """

    def __init__(self, corpus, sources: Sequence[str]):
        self.corpus = corpus
        self.sources = list(sources)
        self.kinds = [corpus.kind(name) for name in self.sources]
        self._views: dict[str, Any] = {}
        sizes = np.array([corpus.num_documents(name) for name in self.sources], dtype=np.int64)
        self.sizes = sizes
        self.offsets = np.zeros(len(self.sources), dtype=np.int64)
        for kind in set(self.kinds):
            members = [i for i, k in enumerate(self.kinds) if k == kind]
            starts = np.concatenate([[0], np.cumsum(sizes[members])[:-1]])
            self.offsets[members] = starts

    def _view(self, kind: str):
        if kind not in self._views:
            import datasets

            members = [self.corpus.dataset(name) for name, k in zip(self.sources, self.kinds, strict=True) if k == kind]
            self._views[kind] = members[0] if len(members) == 1 else datasets.concatenate_datasets(members)
        return self._views[kind]

    def read_columns(self, source_ids: np.ndarray, rows: np.ndarray) -> dict[str, list[Any]]:
        """{column: values in input order} for (source_ids (K,), rows (K,)); all rows must be
        of one kind (one schema)."""
        source_ids = np.asarray(source_ids, dtype=np.int64)
        rows = np.asarray(rows, dtype=np.int64)
        self._check(source_ids, rows)
        kinds = {self.kinds[i] for i in np.unique(source_ids).tolist()}
        if len(kinds) > 1:
            raise ValueError(f"read_columns needs rows of one kind, got {sorted(kinds)}")
        if not len(rows):
            return {}
        return self._view(kinds.pop())[(self.offsets[source_ids] + rows).tolist()]

    def read(self, source_ids: np.ndarray, rows: np.ndarray) -> list[dict[str, Any]]:
        """Rows (dicts of column values) for (source_ids (K,), rows (K,)), in input order."""
        source_ids = np.asarray(source_ids, dtype=np.int64)
        rows = np.asarray(rows, dtype=np.int64)
        self._check(source_ids, rows)
        out: list[dict[str, Any] | None] = [None] * len(rows)
        kinds = np.array(self.kinds, dtype=object)[source_ids] if len(rows) else np.array([])
        for kind in set(kinds.tolist()):
            positions = np.flatnonzero(kinds == kind)
            columns = self.read_columns(source_ids[positions], rows[positions])
            for j, position in enumerate(positions.tolist()):
                out[position] = {name: values[j] for name, values in columns.items()}
        return out  # type: ignore[return-value]

    def _check(self, source_ids: np.ndarray, rows: np.ndarray) -> None:
        if rows.size and ((rows < 0).any() or (rows >= self.sizes[source_ids]).any()):
            bad = int(np.flatnonzero((rows < 0) | (rows >= self.sizes[source_ids]))[0])
            name = self.sources[int(source_ids[bad])]
            raise ValueError(f"row {int(rows[bad])} out of range for source {name!r} "
                             f"({int(self.sizes[source_ids[bad]])} rows)")

    def __getstate__(self):  # views re-open lazily in dataloader workers
        state = dict(self.__dict__)
        state["_views"] = {}
        return state
