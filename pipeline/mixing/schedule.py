"""A mixing stage evaluated over a planned run: a piecewise-constant plan per step range.

The sampler needs the cumulative target of every source at any step in closed form, so
the plan is held constant over *segments* of steps: a regular grid of `update_steps`
steps, plus a boundary at every breakpoint of the stages (e.g. Cooldown's switch), so a
step schedule switches exactly where it says. Each segment uses the plan at its first
step's progress. After the planned `total_steps`, the plan at progress 1 holds forever.

`OnlineSchedule` is the adaptive variant (`pipeline.mixing.online.OnlineBandit` as the last
stage): segments are the controller's windows of `update_every` steps, known only up to the
last decision (`decided_steps`), and the schedule grows by one appended segment per
decision. Its plan history (observations and decisions) is its state; `load_state_dict`
replays it through the pure controller, so a resumed run continues with the same plans and
the same controller state. Reading a step beyond the decided horizon raises
`PlanNotDecidedError`. `make_schedule` picks the variant from the stage.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from pipeline.mixing.base import Compose, MixingStage
from pipeline.mixing.online import BanditState, OnlineBandit, PlanNotDecidedError
from pipeline.mixing.plan import MixturePlan, validate_sizes


class MixtureSchedule:
    """Plans of `stage` over `total_steps` optimizer steps.

    Attributes:
        sources: source names (plan order).
        boundaries: (M + 1,) int64 step at which each segment starts; the last segment
            (index M) starts at total_steps and never ends.
        probs: (M + 1, S) sampling probabilities per segment.
        loss_weights: (M + 1, S) loss weights per segment.
    """

    def __init__(
        self,
        stage: MixingStage,
        sizes: Mapping[str, float],
        total_steps: int,
        update_steps: int | None = None,
    ):
        if int(total_steps) < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps!r}")
        self.total_steps = int(total_steps)
        if update_steps is None:
            update_steps = max(1, math.ceil(self.total_steps / 1000))
        if int(update_steps) < 1:
            raise ValueError(f"plan update_steps must be >= 1, got {update_steps!r}")
        self.update_steps = int(update_steps)
        self.sources, _ = validate_sizes(sizes)
        self.stage = stage
        grid = set(range(0, self.total_steps, self.update_steps))
        for point in stage.breakpoints():
            step = math.ceil(point * self.total_steps - 1e-9)
            if 0 < step < self.total_steps:
                grid.add(step)
        grid.add(self.total_steps)
        self.boundaries = np.array(sorted(grid), dtype=np.int64)
        plans: list[MixturePlan] = []
        constant = not stage.depends_on_progress()
        for step in self.boundaries:
            # A stage whose plan cannot change with progress is evaluated once (the same
            # plan it would give at every segment).
            plan = plans[-1] if constant and plans else stage.plan(sizes, float(step) / self.total_steps)
            if plan.sources != self.sources:
                raise ValueError(f"stage returned sources {plan.sources}, expected {self.sources}")
            # A plan equal (bit for bit) to the previous one is stored once: a constant
            # mixture holds one plan, not one per segment.
            plans.append(plans[-1] if plans and same_plan(plans[-1], plan) else plan)
        self.plans = plans
        self.probs = _rows([plan.sample_probs for plan in plans])
        self.loss_weights = _rows([plan.loss_weights for plan in plans])

    adaptive = False

    @property
    def num_segments(self) -> int:
        return len(self.boundaries)

    @property
    def decided_steps(self) -> int | None:
        """Steps whose plan is known (None: every step; a static schedule)."""
        return None

    def tree_weights(self) -> np.ndarray:
        """(S,) weights the exact allocator builds its source tree on (fixed for the run)."""
        return self.mean_probs()

    def segment_of(self, step: int | np.ndarray) -> np.ndarray:
        """Index of the segment containing each step."""
        return np.searchsorted(self.boundaries, step, side="right") - 1

    def plan_at(self, step: int) -> MixturePlan:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return self.plans[int(self.segment_of(step))]

    def mean_probs(self) -> np.ndarray:
        """(S,) sampling probabilities averaged over the planned run, weighted by steps."""
        lengths = np.diff(self.boundaries).astype(np.float64)
        # These weights build the exact allocator's source tree, so they must keep their bits.
        # numpy's axis-0 sum orders its additions by the operand's memory layout, which the
        # product takes from its inputs: multiply the C-ordered (M, S) rows, as when every
        # plan was stacked, also for a constant schedule's broadcast row (a temporary copy).
        return (np.ascontiguousarray(self.probs[:-1]) * lengths[:, None]).sum(0) / lengths.sum()

    def digest(self) -> str:
        """Fingerprint of what the stream depends on (sources, boundaries, probabilities)."""
        hasher = hashlib.sha256()
        hasher.update("\0".join(self.sources).encode())
        hasher.update(self.boundaries.tobytes())
        for row in self.probs:  # row by row: the bytes of the (M+1, S) array, never materialised
            hasher.update(np.ascontiguousarray(row).data)
        return hasher.hexdigest()[:16]


def same_plan(a: MixturePlan, b: MixturePlan) -> bool:
    """Whether two plans are equal bit for bit (probabilities, loss weights, kept and
    per-example weights), so one can stand for both."""
    return (a.sources == b.sources and _same_bits(a.sample_probs, b.sample_probs)
            and _same_bits(a.loss_weights, b.loss_weights)
            and _same_masks(a.example_keep, b.example_keep) and _same_masks(a.example_weights, b.example_weights))


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a is b or (a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes())


def _same_masks(a, b) -> bool:
    if a is b:
        return True
    if a is None or b is None or a.keys() != b.keys():
        return False
    return all(_same_bits(a[name], b[name]) for name in a)


def _rows(rows: list[np.ndarray]) -> np.ndarray:
    """(M+1, S) stacked rows; one read-only broadcast row when every row is the same array
    (a constant schedule: 8 S bytes instead of 8 S (M+1))."""
    if all(row is rows[0] for row in rows):
        return np.broadcast_to(np.asarray(rows[0]), (len(rows), len(rows[0])))
    return np.stack(rows)


def make_schedule(stage: MixingStage, sizes: Mapping[str, float], total_steps: int,
                  update_steps: int | None = None, global_batch_size: int | None = None,
                  num_documents: Mapping[str, int] | None = None) -> MixtureSchedule:
    """`OnlineSchedule` when the stage list ends with an `OnlineBandit`, else `MixtureSchedule`.
    `global_batch_size` and `num_documents` (what a draw is) are needed by the bandit's epoch cap.

    Raises:
        ValueError: an `OnlineBandit` anywhere but last (a later stage would overwrite the
            controller's probabilities).
    """
    stages = list(stage.stages) if isinstance(stage, Compose) else [stage]
    online = [i for i, s in enumerate(stages) if isinstance(s, OnlineBandit)]
    if not online:
        return MixtureSchedule(stage, sizes, total_steps, update_steps)
    if online != [len(stages) - 1]:
        raise ValueError(f"the OnlineBandit stage must be the last mixing stage (found at position(s) {online} "
                         f"of {len(stages)}; balance=m4 appends a stage after it and is not supported with it)")
    return OnlineSchedule(stages[:-1], stages[-1], sizes, total_steps, global_batch_size, num_documents)


@dataclass(frozen=True)
class Decision:
    """One controller decision: what window `window` observed, and the probabilities it
    set for window `applies_to` = window + 1 + lag_windows."""

    window: int
    loss_sums: np.ndarray  # (S,) all-reduced sum of token losses per source over the window
    token_counts: np.ndarray  # (S,) all-reduced target tokens per source over the window
    probs: np.ndarray  # (S,) sampling probabilities decided for `applies_to`
    applies_to: int


class OnlineSchedule(MixtureSchedule):
    """The plans of an online controller: one segment per window of N = update_every steps.

    Window w covers steps [wN, (w+1)N) and holds one plan: its prior is the left stages' plan
    at progress wN / total_steps (so a Cooldown prior still cools down), tilted by the
    controller state decided for it. Windows 0..lag_windows hold the initial plan; each
    completed window k appends the plan of window k + 1 + lag_windows.

    Attributes (besides MixtureSchedule's):
        bandit: the controller stage; decisions: the plan history; state: controller state
        after the last decision; pending: (loss sums, token counts) of the open window.
    """

    adaptive = True

    def __init__(self, left: list[MixingStage], bandit: OnlineBandit, sizes: Mapping[str, float],
                 total_steps: int, global_batch_size: int | None = None,
                 num_documents: Mapping[str, int] | None = None):
        if int(total_steps) < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps!r}")
        self.total_steps = int(total_steps)
        self.sources, _ = validate_sizes(sizes)
        bandit.check_sources(self.sources)
        self.budget = None  # (S,) draws each source may take over the run (the epoch cap)
        if bandit.max_epochs is not None:
            if global_batch_size is None or num_documents is None:
                raise ValueError("OnlineBandit max_epochs needs the global batch size and document counts")
            self.draws_per_window = float(global_batch_size) * bandit.update_every
            self.budget = bandit.max_epochs * np.array([float(num_documents[n]) for n in self.sources])
        self.sizes = {name: sizes[name] for name in self.sources}
        self.left = Compose(left) if left else None
        self.bandit = bandit
        self.stage = Compose([*left, bandit])
        self.update_steps = bandit.update_every
        self.lag_windows = bandit.lag_windows
        self._reset()
        initial = self.probs[0].copy()
        self._tree_weights = initial
        hasher = hashlib.sha256()
        hasher.update(f"online\0{self.total_steps}\0{bandit!r}\0".encode())
        hasher.update(np.ascontiguousarray(self.probs[:-1]).tobytes())
        self._digest = hasher.hexdigest()[:16]

    def _reset(self) -> None:
        num = len(self.sources)
        self.state = self.bandit.initial_state(num)
        self.decisions: list[Decision] = []
        self.plans: list[MixturePlan] = []
        self._probability_mass = np.zeros(num)  # (S,) sum of the decided windows' probabilities
        self.boundaries = np.zeros(0, dtype=np.int64)
        for window in range(1 + self.lag_windows):
            self._append(self._plan_for(window, self.state, capped=False))
        self.pending = (np.zeros(num), np.zeros(num))
        self.pending_steps = 0
        self._prior_cache: dict[int, MixturePlan] = {}

    def _plan_for(self, window: int, state: BanditState, capped: bool = True) -> MixturePlan:
        """Window `window`'s plan for controller state `state`; a decided window (`capped`)
        also honours the epoch cap given the draws the windows before it plan."""
        progress = min(1.0, window * self.update_steps / self.total_steps)
        previous = None if self.left is None else self.left.apply(self.sizes, progress, None)
        plan = self.bandit.plan_from(self.bandit.prior(self.sources, previous), state.rewards, previous)
        if self.budget is None or not capped:
            return plan
        assert window == len(self.plans)  # the plans before it are decided
        limit = (self.budget - self._probability_mass * self.draws_per_window) / self.draws_per_window
        return MixturePlan(plan.sources, self.bandit.capped(plan.sample_probs, limit), plan.loss_weights,
                           plan.example_keep, plan.example_weights)

    def _append(self, plan: MixturePlan, restack: bool = True) -> None:
        """Append one window's plan; the arrays keep a sentinel row (the last plan) at the
        decided horizon so the allocators' last, unbounded segment is well defined (it is
        never read: positions past the horizon raise). `restack=False` defers the arrays
        (a replay restacks once at the end)."""
        if plan.sources != self.sources:
            raise ValueError(f"stage returned sources {plan.sources}, expected {self.sources}")
        self.plans.append(plan)
        self._probability_mass = self._probability_mass + plan.sample_probs  # in window order: same bits on replay
        if restack:
            self._restack()

    def _restack(self) -> None:
        windows = len(self.plans)
        self.boundaries = np.arange(windows + 1, dtype=np.int64) * self.update_steps
        rows = [p.sample_probs for p in self.plans]
        self.probs = np.stack([*rows, rows[-1]])
        weights = [p.loss_weights for p in self.plans]
        self.loss_weights = np.stack([*weights, weights[-1]])

    # -- what the sampler reads -------------------------------------------------------------
    @property
    def decided_steps(self) -> int:
        """Steps [0, decided_steps) have a plan; later ones wait for the controller."""
        return len(self.plans) * self.update_steps

    def plan_at(self, step: int) -> MixturePlan:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self.check_decided(int(step) + 1)
        return self.plans[int(step) // self.update_steps]

    def loss_weights_at(self, step: int) -> MixturePlan:
        """The plan the left stages give step `step` (its loss weights and example weights are
        the step's, whatever the controller decides: it only moves sample_probs). Needs no
        decision, so a dataloader worker's copy of the schedule can read it."""
        window = int(step) // self.update_steps
        if window < len(self.plans):
            return self.plans[window]
        cached = self._prior_cache.get(window)
        if cached is None:
            cached = self._prior_cache[window] = self._plan_for(window, self.bandit.initial_state(len(self.sources)),
                                                                capped=False)
        return cached

    def check_decided(self, stop_step: int) -> None:
        """PlanNotDecidedError unless steps [0, stop_step) are decided."""
        if stop_step > self.decided_steps:
            raise PlanNotDecidedError(
                f"the plan of step {stop_step - 1} is not decided yet: the online controller has decided "
                f"steps [0, {self.decided_steps}) (update_every={self.update_steps}, lag_windows={self.lag_windows}); "
                "the data loader ran further ahead than the lag allows"
            )

    def tree_weights(self) -> np.ndarray:
        return self._tree_weights

    def mean_probs(self) -> np.ndarray:
        """(S,) probabilities averaged over the decided windows."""
        return self.probs[:-1].mean(0)

    def digest(self) -> str:
        """Fingerprint of the stream's inputs that do not depend on the history: sources,
        run length, controller parameters and the initial plans."""
        return self._digest

    # -- the controller loop ------------------------------------------------------------------
    @property
    def observed_steps(self) -> int:
        """Steps observed so far (the next `observe` must be for this step)."""
        return len(self.decisions) * self.update_steps + self.pending_steps

    def observe(self, step: int, loss_sums: np.ndarray, token_counts: np.ndarray) -> Decision | None:
        """Add optimizer step `step`'s all-reduced per-source loss sums and token counts; at
        the end of a window, decide and append the plan of window k + 1 + lag_windows.

        Raises:
            ValueError: steps observed out of order (a skipped or repeated step would make
                the decision depend on how the run was interrupted).
        """
        if int(step) != self.observed_steps:
            raise ValueError(f"online controller expected the losses of step {self.observed_steps}, got step {step}")
        sums, counts = self.pending
        self.pending = (sums + np.asarray(loss_sums, dtype=np.float64),
                        counts + np.asarray(token_counts, dtype=np.float64))
        self.pending_steps += 1
        if self.pending_steps < self.update_steps:
            return None
        return self._decide(*self.pending)

    def _decide(self, loss_sums: np.ndarray, token_counts: np.ndarray, restack: bool = True) -> Decision:
        window = len(self.decisions)
        self.state = self.bandit.update(self.state, self.sources, loss_sums, token_counts)
        applies_to = len(self.plans)
        assert applies_to == window + 1 + self.lag_windows
        plan = self._plan_for(applies_to, self.state)
        decision = Decision(window, loss_sums.copy(), token_counts.copy(), plan.sample_probs.copy(), applies_to)
        self.decisions.append(decision)
        self._append(plan, restack)
        self.pending = (np.zeros(len(self.sources)), np.zeros(len(self.sources)))
        self.pending_steps = 0
        return decision

    # -- checkpoint state ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The plan history: every decision (observation and probabilities) and the open
        window's partial sums. Plain lists of Python floats (exact float64 round trip)."""
        return {
            "update_every": self.update_steps,
            "lag_windows": self.lag_windows,
            "decisions": [{"window": d.window, "loss_sums": d.loss_sums.tolist(),
                           "token_counts": d.token_counts.tolist(), "probs": d.probs.tolist()}
                          for d in self.decisions],
            "pending": {"steps": self.pending_steps, "loss_sums": self.pending[0].tolist(),
                        "token_counts": self.pending[1].tolist()},
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Replace the history by a saved one, replaying every decision through the controller.

        Raises:
            ValueError: another window length or lag, or a replayed decision whose
                probabilities differ from the stored ones (the controller changed).
        """
        for key in ("update_every", "lag_windows", "decisions", "pending"):
            if key not in state:
                raise ValueError(f"online plan history is missing key {key!r}")
        if (int(state["update_every"]), int(state["lag_windows"])) != (self.update_steps, self.lag_windows):
            raise ValueError(f"online plan history was written with update_every={state['update_every']}, "
                             f"lag_windows={state['lag_windows']}; this run has {self.update_steps}, {self.lag_windows}")
        self._reset()
        for number, saved in enumerate(state["decisions"]):
            if int(saved["window"]) != number:
                raise ValueError(f"online plan history decision {number} is for window {saved['window']}")
            decision = self._decide(np.array(saved["loss_sums"], dtype=np.float64),
                                    np.array(saved["token_counts"], dtype=np.float64), restack=False)
            if not np.array_equal(decision.probs, np.array(saved["probs"], dtype=np.float64)):
                raise ValueError(f"online plan history: replaying decision {number} gives other probabilities "
                                 "than the checkpoint stored (the controller or its prior changed)")
        self._restack()
        pending = state["pending"]
        self.pending = (np.array(pending["loss_sums"], dtype=np.float64),
                        np.array(pending["token_counts"], dtype=np.float64))
        self.pending_steps = int(pending["steps"])
