"""Token windows: a pre-tokenized source cut into fixed-length training rows, nothing discarded.

A mono source's documents are framed as in document mode, ``<bos> ids <eos>``, and laid end
to end into one virtual stream of ``N = sum(len_d + 2)`` tokens (never materialised: it is
read from the token store's memory map). Window ``w`` holds stream positions
``[w L, w L + L + 1)`` clipped to the stream (``L = max_length``): ``L`` inputs and their
shifted targets, so consecutive windows share one token and every stream token but the first
is the target of exactly one window. Targets that would cross a document boundary (predicting
a ``<bos>`` from the previous document) are dropped, so one pass over a source's windows
trains every ``ids`` and ``<eos>`` token of every document exactly once: ``len_d + 1`` targets
per document, the same as a document-mode row of an untruncated document. The last window of
a source may be short.

Each window carries per-token segment ids (0 for the document the window starts in, 1 for
the next, ...), which the collator turns into document ids: attention stays within a document
and the cross-document target is masked, as packing does.
"""

from __future__ import annotations

import numpy as np

from pipeline.data.token_store import TokenStore


class TokenWindows:
    """One source's framed token stream in windows of ``max_length + 1`` tokens.

    Args:
        store: the source's `TokenStore`; column: its text column (mono: ``text``).
        max_length: inputs per window (L); a window holds L + 1 tokens.
        bos_id, eos_id: the framing ids of the tokenizer the store was built with.

    Attributes:
        num_windows: windows of one pass, ``ceil((N - 1) / L)`` (0 for an empty stream).
        num_targets: targets of one pass over every window, ``sum(len_d + 1)``.
    """

    def __init__(self, store: TokenStore, max_length: int, bos_id: int, eos_id: int, column: str = "text"):
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"loader.max_length must be a positive int for windows, got {max_length!r}")
        self.source = store.source
        self._store, self._column = store, column
        self.max_length = int(max_length)
        self.bos_id, self.eos_id = int(bos_id), int(eos_id)
        self._tokens = store.tokens(column)
        self._offsets = store.offsets(column)
        lengths = np.diff(self._offsets)
        # starts[d]: stream position of document d's <bos>; starts[D] = N.
        self._starts = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths + 2, out=self._starts[1:])
        self._lengths = lengths
        self.stream_length = int(self._starts[-1])
        self.num_windows = -(-(self.stream_length - 1) // self.max_length) if self.stream_length > 1 else 0
        self.num_targets = int(lengths.sum()) + int(lengths.size)

    def __len__(self) -> int:
        return self.num_windows

    def __reduce__(self):  # rebuilt from the store (which pickles as its path), not its arrays
        return (TokenWindows, (self._store, self.max_length, self.bos_id, self.eos_id, self._column))

    def _check(self, windows: np.ndarray) -> None:
        if windows.size and (windows.min() < 0 or windows.max() >= self.num_windows):
            bad = int(windows[(windows < 0) | (windows >= self.num_windows)][0])
            raise IndexError(f"window {bad} out of range for source {self.source!r} ({self.num_windows} windows)")

    def spans(self, windows) -> tuple[np.ndarray, np.ndarray]:
        """(first, stop) stream positions of each window, (K,) int64 each (stop - first <= L + 1)."""
        windows = np.asarray(windows, dtype=np.int64)
        self._check(windows)
        first = windows * self.max_length
        return first, np.minimum(first + self.max_length + 1, self.stream_length)

    def targets(self, windows) -> np.ndarray:
        """(K,) targets each window trains: label positions (first, stop) minus the document
        starts among them (a <bos> is never a target)."""
        first, stop = self.spans(windows)
        starts_within = (np.searchsorted(self._starts[:-1], stop, side="left")
                         - np.searchsorted(self._starts[:-1], first + 1, side="left"))
        return (stop - first - 1) - starts_within

    def read(self, windows) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per window: (ids (n,), segments (n,)) int64 with n = stop - first tokens; segment j
        counts the document starts after the window's first token up to position j.

        Vectorised over segments (the part of one document inside one window), not stream
        positions: two binary searches per window find its documents; a document's framed
        span ``[starts[d], starts[d + 1])`` holds ``<bos>`` then ``ids`` at token index
        ``position - 2 d - 1`` then ``<eos>``, so every token is one gather at a per-segment
        shift, and only the few ``<bos>``/``<eos>`` positions are set apart.
        """
        first, stop = self.spans(windows)
        if not first.size:
            return []
        starts = self._starts
        counts = stop - first
        # Documents holding each window's first and last position (starts[-1] = N > any position).
        low = np.searchsorted(starts, first, side="right") - 1
        high = np.searchsorted(starts, stop - 1, side="right") - 1
        per_window = high - low + 1
        window_of = np.repeat(np.arange(first.size), per_window)
        # Segment j of window k belongs to document low[k] + (j - the window's first segment).
        segment_doc = np.arange(window_of.size) - np.repeat(np.cumsum(per_window) - per_window - low, per_window)
        begin = np.maximum(starts[segment_doc], first[window_of])
        end = np.minimum(starts[segment_doc + 1], stop[window_of])
        length = end - begin
        out_start = np.cumsum(length) - length  # each segment's first output index
        total = int(counts.sum())
        # Stream position p of document d holds token index p - 2 d - 1 (its <bos> and <eos>
        # fall one outside the document's tokens: clipped here, overwritten below).
        index = np.repeat(begin - 2 * segment_doc - 1 - out_start, length) + np.arange(total)
        if self._tokens.size:
            ids = np.take(self._tokens, index, mode="clip").astype(np.int64)
        else:  # every document empty: only <bos> and <eos>, all set below
            ids = np.empty(total, dtype=np.int64)
        ids[out_start[begin == starts[segment_doc]]] = self.bos_id
        ids[(out_start + length - 1)[end == starts[segment_doc + 1]]] = self.eos_id
        segments = np.repeat(segment_doc - low[window_of], length)
        out = []
        cut = 0
        for count in counts.tolist():
            out.append((ids[cut:cut + count], segments[cut:cut + count]))
            cut += count
        return out
