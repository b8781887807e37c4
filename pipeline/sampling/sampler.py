"""Deterministic, resumable, world-size-independent mixture sampler.

The global sample stream is a pure function of (seed, mixture schedule, position):

    position k  ->  source s(k)            (`pipeline.sampling.allocation`: exact or stochastic)
                ->  draw number d(k)        (how many times s(k) was drawn before k)
                ->  epoch d // n_s, offset d % n_s
                ->  example index  perm_{seed, s, epoch}(offset)   (`pipeline.sampling.permutation`)
                ->  kept_s[that]   when the plan keeps a subset of s (`example_keep`)

``n_s`` is the number of examples a pass over source s covers: every example, or the kept
ones when the plan carries ``example_keep[s]`` (M4 subsample): then draws cycle over the
sorted kept indices ``kept_s`` (an index map of size n_s), so no dropped example is ever
drawn and epochs count passes over the kept data. The mask must be the same in every plan
of the run (the stream stays closed-form) and is part of the sampler's fingerprint.

Global step t covers positions [t*B, (t+1)*B) for global batch size B. Rank r of W takes
the contiguous slice r of each global batch and splits it into its micro-batches, so no
example repeats across ranks within a step and every rank sees the same number of
batches. Nothing depends on world size, ranks, dataloader workers or prefetch depth: a
run saved at world size 2 resumes at world size 3 on the same stream. The state is just
the next step; per-source cursors and epochs are recomputed from it in milliseconds.

Online mixing (`pipeline.mixing.online.OnlineBandit` last in the stages): the schedule is an
`OnlineSchedule` that grows by one window per controller decision (`observe_losses`), and
the stream is a pure function of (seed, plan history, step). The allocator is rebuilt on
each decision over the grown schedule; segments are only ever appended and the source tree
is fixed, so every position before the old horizon keeps its source. The state then also
holds the plan history (`plan_history`), which a resume, at any world size, replays.
Positions past the decided horizon raise `PlanNotDecidedError`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from itertools import repeat

import numpy as np

from pipeline.mixing.base import MixingStage
from pipeline.mixing.online import PlanNotDecidedError
from pipeline.mixing.plan import MixturePlan, validate_sizes
from pipeline.mixing.schedule import Decision, make_schedule
from pipeline.sampling.allocation import ExactAllocator, StochasticAllocator
from pipeline.sampling.batch_geometry import BatchGeometry
from pipeline.sampling.permutation import hash_key, permute

MODES = ("exact", "stochastic")


@dataclass(frozen=True)
class GlobalBatch:
    """One optimizer step of the global stream.

    Attributes:
        step: global step index.
        source: (B,) int64 source index per example (into `MixtureSampler.sources`).
        index: (B,) int64 example index within its source.
        draw: (B,) int64 how many draws of that source preceded this one.
    """

    step: int
    source: np.ndarray
    index: np.ndarray
    draw: np.ndarray


class MixtureSampler:
    """The global stream of (source, example index) pairs for a planned run.

    Args:
        stage: mixing stage (usually `Compose` of the configured list).
        num_documents: {source: documents}; draws are documents of these sources (the
            plan's ``example_keep`` masks, if any, have this length).
        global_batch_size: examples per optimizer step across all ranks and micro-batches.
        total_steps: planned run length (progress = step / total_steps).
        seed: non-negative integer.
        mode: "exact" (deterministic allocation) or "stochastic" (seeded multinomial).
        mixture_sizes: sizes given to the mixing stage (e.g. token counts); defaults to
            `num_documents`. Either way the plan's probabilities are per *draw*.
        update_steps: plan segment length in steps (default total_steps / 1000).

    Attributes:
        total_documents: (S,) every source's example count (the index space of draws).
        num_documents: (S,) examples one pass over each source covers: `total_documents`,
            or the kept count for a source the plan's ``example_keep`` subsamples.
        kept: {source index: sorted kept example indices} for those sources.
    """

    def __init__(
        self,
        stage: MixingStage,
        num_documents: Mapping[str, int],
        global_batch_size: int,
        total_steps: int,
        seed: int = 0,
        mode: str = "exact",
        mixture_sizes: Mapping[str, float] | None = None,
        update_steps: int | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"sampler mode must be one of {MODES}, got {mode!r}")
        if int(global_batch_size) < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size!r}")
        if int(seed) < 0:
            raise ValueError(f"sampler seed must be a non-negative integer, got {seed!r}")
        names, docs = validate_sizes(num_documents)
        if mixture_sizes is not None and set(mixture_sizes) != set(names):
            extra = sorted(set(mixture_sizes) ^ set(names))
            raise ValueError(f"mixture_sizes and num_documents disagree on source {extra[0]!r}")
        self.sources = names
        self.total_documents = docs.astype(np.int64)
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.mode = mode
        sizes = {name: (mixture_sizes or num_documents)[name] for name in names}
        self.schedule = make_schedule(stage, sizes, total_steps, update_steps, self.global_batch_size,
                                      dict(zip(names, self.total_documents.tolist(), strict=True)))
        self.online = self.schedule.adaptive
        # An epoch cap (UniMax) holds over the planned run only: refuse positions past it.
        self.caps_epochs = bool(getattr(stage, "caps_epochs", False))
        self.kept = self._kept_examples()
        self.num_documents = self.total_documents.copy()
        self._index_map: np.ndarray | None = None
        if self.kept:
            self._mapped = np.zeros(len(names), dtype=bool)
            self._map_start = np.zeros(len(names), dtype=np.int64)
            offset = 0
            for s, kept in self.kept.items():
                self.num_documents[s] = kept.size
                self._mapped[s], self._map_start[s] = True, offset
                offset += kept.size
            self._index_map = np.concatenate(list(self.kept.values()))
        self._build_allocator()
        self.fingerprint = f"{mode}-{self.seed}-{self.global_batch_size}-{self.schedule.digest()}"
        if self.kept:  # another kept subset is another stream (runs without one keep their fingerprint)
            hasher = hashlib.sha256()
            for s, kept in self.kept.items():
                hasher.update(f"{names[s]}\0{self.total_documents[s]}\0".encode())
                hasher.update(kept.tobytes())
            self.fingerprint += f"-keep{hasher.hexdigest()[:16]}"

    def _build_allocator(self) -> None:
        if self.mode == "exact":
            self.allocator = ExactAllocator(self.schedule, self.global_batch_size)
        else:
            previous = getattr(self, "allocator", None)
            self.allocator = StochasticAllocator(self.schedule, self.global_batch_size, self.seed)
            if previous is not None:  # an online schedule grew: keep the draws of unchanged chunks
                self.allocator.carry_from(previous)

    def _kept_examples(self) -> dict[int, np.ndarray]:
        """{source index: sorted kept indices} from the plans' ``example_keep`` (one mask per
        source for the whole run; ValueError if it changes, misfits the source or keeps nothing)."""
        masks = None
        for plan in self.schedule.plans:
            keep = {name: np.asarray(mask) for name, mask in (plan.example_keep or {}).items()}
            if masks is None:
                masks = keep
            elif keep.keys() != masks.keys() or any(not np.array_equal(keep[n], masks[n]) for n in keep):
                raise ValueError("the plan's example_keep changes over the run; the sampler needs one "
                                 "kept subset per source for the whole run (a closed-form stream)")
        kept = {}
        for name, mask in (masks or {}).items():
            if name not in self.sources:
                raise ValueError(f"example_keep names unknown source {name!r}; sources are {list(self.sources)}")
            s = self.sources.index(name)
            if mask.shape != (int(self.total_documents[s]),) or mask.dtype != np.bool_:
                raise ValueError(f"example_keep for source {name!r} has {mask.size} entries ({mask.dtype}); "
                                 f"expected a bool mask over its {int(self.total_documents[s])} documents")
            if not mask.any():
                raise ValueError(f"example_keep for source {name!r} keeps no example")
            kept[s] = np.flatnonzero(mask).astype(np.int64)
        return dict(sorted(kept.items()))

    @property
    def total_steps(self) -> int:
        return self.schedule.total_steps

    def plan_at(self, step: int) -> MixturePlan:
        return self.schedule.plan_at(step)

    @property
    def decided_steps(self) -> int | None:
        """Steps [0, decided_steps) have a plan (None: all; a static mixture)."""
        return self.schedule.decided_steps

    def observe_losses(self, step: int, loss_sums, token_counts) -> Decision | None:
        """Online mixing: feed optimizer step `step`'s per-source loss sums and target-token
        counts ((S,) each, already all-reduced, identical on every rank). At the end of a
        window the controller decides, the schedule grows and the allocator is rebuilt.
        Returns the decision, if one was made."""
        if not self.online:
            raise ValueError("observe_losses needs an online mixture (OnlineBandit as the last stage)")
        decision = self.schedule.observe(step, np.asarray(loss_sums, dtype=np.float64),
                                         np.asarray(token_counts, dtype=np.float64))
        if decision is not None:
            self._build_allocator()
        return decision

    # -- the stream ----------------------------------------------------------------------
    def positions(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(source, index, draw) for stream positions [start, stop), each (stop-start,)."""
        if start < 0 or stop < start:
            raise ValueError(f"bad position range [{start}, {stop})")
        if stop > start:
            self._check_planned(-(-stop // self.global_batch_size))
        source, draw = self.allocator.allocate(start, stop)
        return source, self._example_index(source, draw), draw

    def positions_at(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(source, index, draw) at arbitrary stream positions ((K,) int64, strictly
        increasing), each (K,); the same values `positions` gives for them. A rank reads its
        own slices with it, at a cost that does not grow with the world size."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size:
            self._check_planned(int(positions[-1]) // self.global_batch_size + 1)
        source, draw = self.allocator.allocate_at(positions)
        return source, self._example_index(source, draw), draw

    def _check_planned(self, stop_step: int) -> None:
        """Raise unless steps [0, stop_step) may be drawn: decided (online mixing) and, for a
        mixture that caps epochs, within the planned run."""
        if self.online:
            self.schedule.check_decided(stop_step)
        if self.caps_epochs and stop_step > self.total_steps:
            raise ValueError(f"step {stop_step - 1} is past run.total_steps={self.total_steps}: the mixture caps "
                             "epochs per source (UniMax max_epochs) over the planned run only; raise run.total_steps")

    def rank_positions(self, first_step: int, num_steps: int, rank: int, world_size: int) -> np.ndarray:
        """(num_steps * per_rank,) stream positions of rank `rank`'s slices of global steps
        [first_step, first_step + num_steps), in order."""
        per_rank = self.per_rank_batch_size(world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        starts = (np.arange(first_step, first_step + num_steps, dtype=np.int64) * self.global_batch_size
                  + rank * per_rank)
        return (starts[:, None] + np.arange(per_rank, dtype=np.int64)).reshape(-1)

    def global_batch(self, step: int) -> GlobalBatch:
        start = step * self.global_batch_size
        source, index, draw = self.positions(start, start + self.global_batch_size)
        return GlobalBatch(step, source, index, draw)

    def rank_slice(self, step: int, rank: int, world_size: int) -> GlobalBatch:
        """Rank `rank`'s contiguous share of global step `step`."""
        per_rank = self.per_rank_batch_size(world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        start = step * self.global_batch_size + rank * per_rank
        source, index, draw = self.positions(start, start + per_rank)
        return GlobalBatch(step, source, index, draw)

    def per_rank_batch_size(self, world_size: int) -> int:
        return BatchGeometry.of(self.global_batch_size, world_size).per_rank_batch_size

    def _example_index(self, source: np.ndarray, draw: np.ndarray) -> np.ndarray:
        """Map each (source, draw number) to an example index via per-epoch permutations,
        in one vectorised call for all sources (one permutation per (source, epoch))."""
        sizes = self.num_documents[source]
        keys = hash_key(self.seed, source, draw // sizes)
        index = np.asarray(permute(draw % sizes, sizes, keys), dtype=np.int64)
        if self._index_map is not None:  # kept subsets: the permuted offset picks a kept example
            mapped = self._mapped[source]
            index = index.copy()
            index[mapped] = self._index_map[self._map_start[source[mapped]] + index[mapped]]
        return index

    def loss_weights_at(self, step: int) -> np.ndarray:
        """(S,) the plan's loss weights at `step`. With online mixing they do not depend on the
        controller's decisions (it moves only sample_probs), so a dataloader worker, whose copy
        of the sampler never sees a decision, reads them for any step."""
        return self._weights_plan(step).loss_weights

    def _weights_plan(self, step: int) -> MixturePlan:
        return self.schedule.loss_weights_at(step) if self.online else self.plan_at(step)

    def example_weights(self, step: int) -> list[np.ndarray | None]:
        """Per source index: the plan's ``example_weights`` at `step` ((total_documents,)
        float64 factors on each example's loss weight), or None for a source without."""
        weights = self._weights_plan(step).example_weights or {}
        return [None if name not in weights else np.asarray(weights[name], dtype=np.float64)
                for name in self.sources]

    # -- accounting --------------------------------------------------------------------
    def draw_counts(self, step: int) -> np.ndarray:
        """(S,) draws per source in global steps [0, step): the per-source cursors."""
        if self.online:
            self.schedule.check_decided(step)
        return self.allocator.counts_at(step * self.global_batch_size)

    def epochs(self, step: int) -> dict[str, float]:
        """Passes over each source consumed before `step` (fractional)."""
        counts = self.draw_counts(step)
        return {name: float(c) / float(n) for name, c, n in zip(self.sources, counts, self.num_documents, strict=True)}

    def cumulative_targets(self, step: int) -> np.ndarray:
        """(S,) expected draws per source before `step` under the schedule."""
        boundaries = self.schedule.boundaries
        lengths = np.clip(np.minimum(step, np.append(boundaries[1:], max(step, boundaries[-1])))
                          - boundaries, 0, None)
        return (self.schedule.probs * lengths[:, None]).sum(0) * self.global_batch_size

    def state_dict(self, step: int) -> dict:
        """What a checkpoint needs to continue this stream at `step`."""
        state = {
            "step": int(step),
            "fingerprint": self.fingerprint,
            "sources": list(self.sources),
            "draw_counts": self.draw_counts(step).tolist(),
        }
        if self.online:
            state["plan_history"] = self.schedule.state_dict()
        return state

    def load_state_dict(self, state: Mapping) -> int:
        """Validate a saved state against this sampler and return the step to resume at.

        Raises:
            ValueError: the checkpoint was written for another seed, mode, batch size,
                mixture schedule or source list (the stream would not continue).
        """
        for key in ("step", "fingerprint", "sources"):
            if key not in state:
                raise ValueError(f"sampler state is missing key {key!r}")
        if list(state["sources"]) != list(self.sources):
            raise ValueError(f"sampler state sources {state['sources']} != {list(self.sources)}")
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(
                f"sampler state fingerprint {state['fingerprint']!r} != {self.fingerprint!r}: "
                "the seed, mode, global batch size or mixture schedule changed since the checkpoint"
            )
        step = int(state["step"])
        if self.online:
            if "plan_history" not in state:
                raise ValueError("sampler state has no 'plan_history': an online mixture resumes only from its own history")
            self.schedule.load_state_dict(state["plan_history"])
            self._build_allocator()
            if self.schedule.observed_steps != step:
                raise ValueError(f"online plan history observed {self.schedule.observed_steps} steps but the "
                                 f"checkpoint is at step {step}: the losses of the steps between are lost")
        if "draw_counts" in state and list(state["draw_counts"]) != self.draw_counts(step).tolist():
            raise ValueError("sampler state draw_counts disagree with the recomputed stream")
        return step


class RankBatchSampler:
    """A DataLoader `batch_sampler` yielding one rank's micro-batches of the global stream.

    Each item is a list of (source_id, example_index, global_step) triples. Batches are
    made in the main process, so `num_workers` only changes who loads rows, never which.
    A rank computes only its own slices (`MixtureSampler.positions_at`), so its cost per
    example does not grow with the world size.

    One pass (a Lightning "epoch") is the planned run: `len()` is always
    total_steps * micro-batches per step, and each `iter()` starts at `start_step` (an int,
    or a callable such as ``lambda: trainer.global_step``, read at every `iter()`) and runs
    to the end of the pass that step falls in (for a mixture that caps epochs, to
    run.total_steps: there is no second pass). Lightning counts a resumed epoch's batches
    from the checkpoint, so reporting the full pass keeps its bookkeeping aligned.

    Args:
        sampler: the global stream.
        rank, world_size: this process's place in data parallelism.
        micro_batch_size: examples per forward pass on this rank (None: the rank's whole
            share); `geometry` (`pipeline.sampling.batch_geometry`) holds the split and the
            accumulation, global / (world_size * micro).
        start_step: first global step to yield (the resume point).
        num_steps: yield exactly this many global steps instead of the rest of the pass.
    """

    def __init__(self, sampler: MixtureSampler, rank: int = 0, world_size: int = 1,
                 micro_batch_size: int | None = None, start_step: int | Callable[[], int] = 0,
                 num_steps: int | None = None):
        self.sampler = sampler
        self.rank, self.world_size = int(rank), int(world_size)
        self.geometry = BatchGeometry.of(sampler.global_batch_size, self.world_size, micro_batch_size)
        self.micro_batch_size = self.geometry.micro_batch_size
        self.accumulation = self.geometry.accumulation
        self.start_step = start_step
        self.num_steps = num_steps

    def steps(self) -> range:
        """Global steps the next `iter()` yields."""
        start = int(self.start_step() if callable(self.start_step) else self.start_step)
        if self.num_steps is not None:
            return range(start, start + int(self.num_steps))
        total = self.sampler.total_steps
        if self.sampler.caps_epochs:  # no second pass: it would break the epoch cap
            return range(start, max(start, total))
        return range(start, (start // total + 1) * total)

    def __len__(self) -> int:
        steps = self.sampler.total_steps if self.num_steps is None else int(self.num_steps)
        return steps * self.accumulation

    # This rank's positions generated per call, at least: the allocators' per-call cost is
    # fixed (a tree walk over 2S - 1 nodes, a permutation pass), so small slices are made
    # many steps at a time, and more with more sources (WINDOW_PER_SOURCE each).
    WINDOW_SAMPLES = 1 << 16
    WINDOW_PER_SOURCE = 64

    def window_steps(self) -> int:
        """Global steps generated per allocator call (after the first, which is one step)."""
        samples = max(self.WINDOW_SAMPLES, self.WINDOW_PER_SOURCE * len(self.sampler.sources))
        return max(1, samples // self.geometry.per_rank_batch_size)

    def __iter__(self) -> Iterator[MicroBatch]:
        steps = self.steps()
        per_rank = self.geometry.per_rank_batch_size
        window = self.window_steps()
        size = self.micro_batch_size
        first = steps.start
        while first < steps.stop:
            # The first window is one step: a restart's first batch need not wait for a window.
            count = min(window if first > steps.start else 1, steps.stop - first)
            decided = self.sampler.decided_steps  # online mixing: never generate past the decided plan
            if decided is not None:
                if first >= decided:
                    raise PlanNotDecidedError(
                        f"rank {self.rank}: the loader asked for step {first} before the online controller "
                        f"decided its plan (decided up to step {decided}); raise lag_windows or update_every, "
                        "or lower loader.num_workers / prefetch")
                count = min(count, decided - first)
            source, index = self._slices(first, count)
            # One conversion per window, then list slices: with many ranks a step's slice is
            # small, and per-step numpy calls would dominate its cost.
            sources, indices = source.tolist(), index.tolist()
            for offset in range(count):
                step = first + offset
                lo = offset * per_rank
                triples = list(zip(sources[lo:lo + per_rank], indices[lo:lo + per_rank], repeat(step, per_rank),
                                   strict=True))
                for micro in range(self.accumulation):
                    yield MicroBatch(triples[micro * size:(micro + 1) * size],
                                     step_items=triples if micro == 0 else None)
            first += count

    def _slices(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, index), each (count * per_rank,): this rank's slices of steps
        [first, first + count) and nothing of the other ranks' (one range when alone)."""
        batch = self.sampler.global_batch_size
        if self.world_size == 1:
            source, index, _ = self.sampler.positions(first * batch, (first + count) * batch)
        else:
            positions = self.sampler.rank_positions(first, count, self.rank, self.world_size)
            source, index, _ = self.sampler.positions_at(positions)
        return source, index


class MicroBatch(list):
    """A list of (source, index, step) triples; the first micro-batch of each step also
    carries the rank's whole step slice (`step_items`), so the loss normaliser of the step
    is known before its first backward pass."""

    def __init__(self, items, step_items=None):
        super().__init__(items)
        self.step_items = step_items

    def __reduce__(self):  # pickled to dataloader workers with its step slice
        return (MicroBatch, (list(self), self.step_items))
