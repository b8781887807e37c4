"""A mixing stage evaluated over a planned run: a piecewise-constant plan per step range.

The sampler needs the cumulative target of every source at any step in closed form, so
the plan is held constant over *segments* of steps: a regular grid of `update_steps`
steps, plus a boundary at every breakpoint of the stages (e.g. Cooldown's switch), so a
step schedule switches exactly where it says. Each segment uses the plan at its first
step's progress. After the planned `total_steps`, the plan at progress 1 holds forever.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import numpy as np

from pipeline.mixing.base import MixingStage
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
        plans = [stage.plan(sizes, float(step) / self.total_steps) for step in self.boundaries]
        for plan in plans:
            if plan.sources != self.sources:
                raise ValueError(f"stage returned sources {plan.sources}, expected {self.sources}")
        self.plans = plans
        self.probs = np.stack([plan.sample_probs for plan in plans])
        self.loss_weights = np.stack([plan.loss_weights for plan in plans])

    @property
    def num_segments(self) -> int:
        return len(self.boundaries)

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
        return (self.probs[:-1] * lengths[:, None]).sum(0) / lengths.sum()

    def digest(self) -> str:
        """Fingerprint of what the stream depends on (sources, boundaries, probabilities)."""
        hasher = hashlib.sha256()
        hasher.update("\0".join(self.sources).encode())
        hasher.update(self.boundaries.tobytes())
        hasher.update(np.ascontiguousarray(self.probs).tobytes())
        return hasher.hexdigest()[:16]
