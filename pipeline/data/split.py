"""Per-source train/validation split with no stored index.

Source i's rows are put in a seeded pseudo-random order (a keyed permutation); its first
v_i positions are validation and the rest training. Training example j of source i is row
perm_i(v_i + j) and validation example j is row perm_i(j), so both sides are random
access, disjoint, and identical on every rank and every run with the same seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from pipeline.sampling.permutation import hash_key, permute

_SPLIT_TAG = 0x5EED5


class SourceSplit:
    """Args:
        num_documents: {source: rows in the prepared source}.
        val_documents: validation rows per source (at most `val_fraction` of a source, and
            at least one row for sources with at least 2 rows).
        val_fraction: cap on the validation share of any source.
        seed: split seed (kept separate from the sampler seed so changing one does not move
            the other).
    """

    def __init__(self, num_documents: Mapping[str, int], val_documents: int = 32,
                 val_fraction: float = 0.1, seed: int = 0):
        if val_documents < 0:
            raise ValueError(f"val_documents must be >= 0, got {val_documents}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.sources = list(num_documents)
        self.seed = int(seed)
        self.total = {name: int(n) for name, n in num_documents.items()}
        self.val = {}
        for name, n in self.total.items():
            wanted = min(val_documents, int(n * val_fraction))
            self.val[name] = max(wanted, 1 if val_documents > 0 and n >= 2 else 0)
        self.train = {name: self.total[name] - self.val[name] for name in self.sources}

    def _rows(self, name: str, positions: np.ndarray) -> np.ndarray:
        key = hash_key(self.seed, _SPLIT_TAG, self.sources.index(name))
        return permute(np.asarray(positions, dtype=np.int64), self.total[name], key)

    def rows_many(self, names: Sequence[str], source_ids: np.ndarray, indices: np.ndarray,
                  part: str = "train") -> np.ndarray:
        """Rows of many (source, index) pairs in one vectorised call.

        Args:
            names: source names that `source_ids` index (the sampler's order).
            source_ids, indices: (K,) int64; indices count within `part` of each source.
            part: "train" or "val".
        """
        source_ids = np.asarray(source_ids, dtype=np.int64)
        indices = np.asarray(indices, dtype=np.int64)
        table = self.train if part == "train" else self.val
        limits = np.array([table[n] for n in names], dtype=np.int64)[source_ids]
        if indices.size and ((indices < 0).any() or (indices >= limits).any()):
            bad = int(np.flatnonzero((indices < 0) | (indices >= limits))[0])
            raise ValueError(f"{part} index {int(indices[bad])} out of range for source "
                             f"{names[int(source_ids[bad])]!r} ({int(limits[bad])} rows)")
        order = np.array([self.sources.index(n) for n in names], dtype=np.int64)[source_ids]
        offsets = np.array([self.val[n] for n in names], dtype=np.int64)[source_ids] if part == "train" else 0
        totals = np.array([self.total[n] for n in names], dtype=np.int64)[source_ids]
        return permute(indices + offsets, totals, hash_key(self.seed, _SPLIT_TAG, order))

    def train_rows(self, name: str, indices) -> np.ndarray:
        """Rows of training examples `indices` (each in [0, train[name]))."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.train[name]):
            raise ValueError(f"training index out of range for source {name!r} ({self.train[name]} rows)")
        return self._rows(name, self.val[name] + indices)

    def val_rows(self, name: str, indices=None) -> np.ndarray:
        """Rows of validation examples (all of them by default)."""
        indices = np.arange(self.val[name]) if indices is None else np.asarray(indices, dtype=np.int64)
        return self._rows(name, indices)
