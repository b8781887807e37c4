"""Which source fills each position of the global sample stream.

Both allocators are closed-form in the stream position: the number of draws any source
received before position k is computed without replaying the stream, so resuming at step
10^6 costs milliseconds, and positions can be generated in any order (any rank, any
worker) with identical results.

`ExactAllocator` (deterministic, Megatron-style error minimisation)
    Sources are the leaves of a Huffman tree built on their mean probabilities. Every
    internal node v splits the stream of its own samples between its two children a and b:
    child a's count after v's first n samples is ``floor(tau_a(n) + 1/2)``, where tau_a(n)
    is a's target share of those n samples (piecewise linear when the plan changes).
    Because tau_a rises by at most 1 per sample, both children's counts are non-decreasing
    and sum to n, so the rule defines a valid stream, and the count at any position is a
    descent of the tree. The deviation of a source from its cumulative target has a proven
    bound (`error_bound`; for a constant plan 1/2 * (1 + sum over ancestors v below the
    root of p_source / p_v)), which the Huffman tree keeps small. It is not always below
    one sample: on 100 long-tailed sources the worst prefix was measured at 1.07 samples,
    against 1.09 for Megatron's sequential greedy on the same kind of mixture.

`StochasticAllocator` (seeded multinomial)
    Each plan segment draws its per-source counts from Multinomial(samples, probs) with
    a generator keyed by (seed, segment) and lays them out in a seeded random order. That
    is exactly i.i.d. categorical draws (a multinomial sample in uniformly random order),
    so every step's composition is Multinomial(batch, probs); cumulative counts at a
    segment boundary are a sum of per-segment draws, with no per-step replay.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from pipeline.schedule import MixtureSchedule


@dataclass
class _Node:
    """Internal tree node: children indices (leaves are 0..S-1) and per-segment shares."""

    left: int
    right: int
    share_left: np.ndarray  # (M+1,) fraction of this node's samples that go to `left`


class ExactAllocator:
    def __init__(self, schedule: MixtureSchedule, global_batch_size: int):
        self.schedule = schedule
        self.batch = int(global_batch_size)
        self.num_sources = len(schedule.sources)
        # Segment boundaries in sample positions; the last segment is unbounded.
        self.segment_starts = schedule.boundaries * self.batch
        self._build_tree(schedule.mean_probs())
        self._count_at_boundaries()

    # -- tree ------------------------------------------------------------------------
    def _build_tree(self, weights: np.ndarray) -> None:
        num = self.num_sources
        heap = [(float(w), i, i) for i, w in enumerate(weights)]
        heapq.heapify(heap)
        self.nodes: dict[int, _Node] = {}
        self.parent = np.full(2 * num - 1, -1, dtype=np.int64)
        mass = [self.schedule.probs[:, i] for i in range(num)]  # (M+1,) per node
        next_id = num
        while len(heap) > 1:
            weight_a, _, a = heapq.heappop(heap)
            weight_b, _, b = heapq.heappop(heap)
            total = mass[a] + mass[b]
            with np.errstate(invalid="ignore", divide="ignore"):
                share = np.where(total > 0, mass[a] / np.where(total > 0, total, 1.0), 0.5)
            self.nodes[next_id] = _Node(a, b, np.minimum(share, 1.0))
            self.parent[a] = self.parent[b] = next_id
            mass.append(total)
            heapq.heappush(heap, (weight_a + weight_b, next_id, next_id))
            next_id += 1
        self.root = heap[0][2]
        self.node_mass = mass

    def _count_at_boundaries(self) -> None:
        """counts[v]: (M+1,) samples node v holds at each segment start; bases for tau."""
        self.counts: dict[int, np.ndarray] = {self.root: self.segment_starts.astype(np.int64)}
        self.bases: dict[int, np.ndarray] = {}
        for node_id in sorted(self.nodes, reverse=True):  # parents have larger ids
            node = self.nodes[node_id]
            parent_counts = self.counts[node_id]
            base = np.zeros(len(parent_counts), dtype=np.float64)
            for m in range(len(parent_counts) - 1):
                base[m + 1] = base[m] + node.share_left[m] * float(parent_counts[m + 1] - parent_counts[m])
            self.bases[node_id] = base
            left = np.floor(base + 0.5).astype(np.int64)
            self.counts[node.left] = left
            self.counts[node.right] = parent_counts - left

    def _left_count(self, node_id: int, n: np.ndarray) -> np.ndarray:
        """Samples the left child holds after the node's first n samples (vectorised)."""
        node = self.nodes[node_id]
        parent_counts = self.counts[node_id]
        segment = np.searchsorted(parent_counts, n, side="right") - 1
        tau = self.bases[node_id][segment] + node.share_left[segment] * (n - parent_counts[segment])
        return np.floor(tau + 0.5).astype(np.int64)

    # -- queries ---------------------------------------------------------------------
    def counts_at(self, position: int) -> np.ndarray:
        """(S,) draws of each source among stream positions [0, position)."""
        held = {self.root: np.array([position], dtype=np.int64)}
        for node_id in sorted(self.nodes, reverse=True):
            node = self.nodes[node_id]
            left = self._left_count(node_id, held[node_id])
            held[node.left] = left
            held[node.right] = held[node_id] - left
        return np.array([held[i][0] for i in range(self.num_sources)], dtype=np.int64)

    def allocate(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Sources and per-source draw numbers of positions [start, stop).

        Returns:
            source: (stop-start,) int64 source index per position.
            draw: (stop-start,) int64, how many draws that source had before this one.
        """
        length = stop - start
        source = np.empty(length, dtype=np.int64)
        draw = np.empty(length, dtype=np.int64)
        # Work list: (node, first sample number of the node in the window, positions).
        work = [(self.root, start, np.arange(length, dtype=np.int64))]
        while work:
            node_id, first, positions = work.pop()
            if node_id < self.num_sources:
                source[positions] = node_id
                draw[positions] = first + np.arange(len(positions))
                continue
            node = self.nodes[node_id]
            numbers = first + np.arange(len(positions) + 1, dtype=np.int64)
            left_counts = self._left_count(node_id, numbers)
            increments = np.diff(left_counts)
            if increments.size and (increments.min() < 0 or increments.max() > 1):
                raise AssertionError("exact allocation lost monotonicity (numerical edge case)")
            to_left = increments.astype(bool)
            work.append((node.left, int(left_counts[0]), positions[to_left]))
            work.append((node.right, int(first - left_counts[0]), positions[~to_left]))
        return source, draw

    def error_bound(self) -> np.ndarray:
        """(S,) proven bound on |draws - cumulative target| of each source, at every position.

        A child's count is within 1/2 of its share of the parent's *count*; the parent's
        count is within e_parent of the parent's target. By summation by parts over plan
        segments, e_child <= 1/2 + (max share + total variation of share) * e_parent, with
        e_root = 0 (the root holds every position exactly).
        """
        bound = {self.root: 0.0}
        for node_id in sorted(self.nodes, reverse=True):  # parents before children
            node = self.nodes[node_id]
            for child, share in ((node.left, node.share_left), (node.right, 1.0 - node.share_left)):
                variation = float(np.abs(np.diff(share)).sum()) if len(share) > 1 else 0.0
                bound[child] = 0.5 + (float(share.max()) + variation) * bound[node_id]
        return np.array([bound[i] for i in range(self.num_sources)])


class StochasticAllocator:
    def __init__(self, schedule: MixtureSchedule, global_batch_size: int, seed: int,
                 tail_block_steps: int = 256):
        self.schedule = schedule
        self.batch = int(global_batch_size)
        self.seed = int(seed)
        self.num_sources = len(schedule.sources)
        # Blocks: the finite plan segments, then fixed-size blocks of the final plan.
        self.tail_block = max(int(tail_block_steps), schedule.update_steps) * self.batch
        self.finite_starts = schedule.boundaries * self.batch  # last one = run end
        self._block_counts: list[np.ndarray] = []
        self._cumulative: list[np.ndarray] = [np.zeros(self.num_sources, dtype=np.int64)]
        self._cached_block: tuple[int, np.ndarray] | None = None

    def _block_span(self, block: int) -> tuple[int, int, int]:
        """(start position, length, plan segment) of a block."""
        finite = len(self.finite_starts) - 1
        if block < finite:
            start = int(self.finite_starts[block])
            return start, int(self.finite_starts[block + 1]) - start, block
        start = int(self.finite_starts[-1]) + (block - finite) * self.tail_block
        return start, self.tail_block, finite

    def _block_of(self, position: int) -> int:
        finite = len(self.finite_starts) - 1
        if position < self.finite_starts[-1]:
            return int(np.searchsorted(self.finite_starts, position, side="right") - 1)
        return finite + (position - int(self.finite_starts[-1])) // self.tail_block

    def _rng(self, block: int, purpose: int) -> np.random.Generator:
        """Independent generators per (seed, block, purpose: 0 counts, 1 order)."""
        return np.random.Generator(np.random.Philox(np.random.SeedSequence([self.seed, block, purpose])))

    def _counts(self, block: int) -> np.ndarray:
        while len(self._block_counts) <= block:
            b = len(self._block_counts)
            _, length, segment = self._block_span(b)
            counts = self._rng(b, 0).multinomial(length, self.schedule.probs[segment])
            self._block_counts.append(counts.astype(np.int64))
            self._cumulative.append(self._cumulative[-1] + self._block_counts[-1])
        return self._block_counts[block]

    def _sequence(self, block: int) -> np.ndarray:
        if self._cached_block is None or self._cached_block[0] != block:
            counts = self._counts(block)
            order = np.repeat(np.arange(self.num_sources), counts)
            self._cached_block = (block, self._rng(block, 1).permutation(order))
        return self._cached_block[1]

    def counts_at(self, position: int) -> np.ndarray:
        block = self._block_of(position)
        self._counts(block)
        start, _, _ = self._block_span(block)
        within = self._sequence(block)[: position - start]
        return self._cumulative[block] + np.bincount(within, minlength=self.num_sources)

    def allocate(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        sources = [np.empty(0, dtype=np.int64)]
        draws = [np.empty(0, dtype=np.int64)]
        position = start
        while position < stop:
            block = self._block_of(position)
            block_start, length, _ = self._block_span(block)
            end = min(stop, block_start + length)
            sequence = self._sequence(block)
            base = self.counts_at(position)
            chunk = sequence[position - block_start: end - block_start]
            # Draw number = draws of that source before `position` + rank within the chunk.
            order = np.argsort(chunk, kind="stable")
            ranks = np.empty(len(chunk), dtype=np.int64)
            sorted_chunk = chunk[order]
            group_start = np.searchsorted(sorted_chunk, sorted_chunk, side="left")
            ranks[order] = np.arange(len(chunk)) - group_start
            sources.append(chunk)
            draws.append(base[chunk] + ranks)
            position = end
        return np.concatenate(sources), np.concatenate(draws)
