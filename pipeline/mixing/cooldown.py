"""Cooldown: a temperature schedule over training ("Upsample or Upweight?", Li et al. 2025).

Train first at a high temperature (rare sources upsampled), then drop to a low one so the
end of training sees the natural distribution. The paper's schedule is a single step:
tau_start = 5 until `switch_at` = 0.5 of training, then tau_end = 1. `linear` and `cosine`
shapes are ablations: they hold tau_start until `switch_at` and then move to tau_end over
`ramp` (fraction of training; default: the rest of the run).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from pipeline.mixing.base import MixingStage
from pipeline.mixing.plan import MixturePlan, validate_fraction, validate_tau
from pipeline.mixing.temperature import Temperature

SHAPES = ("step", "linear", "cosine")


class Cooldown(MixingStage):
    def __init__(
        self,
        tau_start: float = 5.0,
        tau_end: float = 1.0,
        switch_at: float = 0.5,
        shape: str = "step",
        ramp: float | None = None,
        maximum: float | None = None,
    ):
        self.tau_start = validate_tau(tau_start, "tau_start")
        self.tau_end = validate_tau(tau_end, "tau_end")
        self.switch_at = validate_fraction(switch_at, "switch_at")
        if shape not in SHAPES:
            raise ValueError(f"Cooldown shape must be one of {SHAPES}, got {shape!r}")
        self.shape = shape
        if ramp is None:
            ramp = 1.0 - self.switch_at
        self.ramp = validate_fraction(ramp, "ramp")
        if shape != "step" and self.ramp == 0:
            raise ValueError(f"Cooldown shape {shape!r} needs ramp > 0 (switch_at={switch_at})")
        self.maximum = maximum

    def tau_at(self, progress: float) -> float:
        """The temperature in force at `progress`."""
        if progress < self.switch_at:
            return self.tau_start
        if self.shape == "step":
            return self.tau_end
        fraction = min(1.0, (progress - self.switch_at) / self.ramp)
        if self.shape == "cosine":
            fraction = 0.5 * (1.0 - math.cos(math.pi * fraction))
        return self.tau_start + (self.tau_end - self.tau_start) * fraction

    def apply(
        self, sizes: Mapping[str, float], progress: float, previous: MixturePlan | None
    ) -> MixturePlan:
        return Temperature(self.tau_at(progress), self.maximum).apply(sizes, progress, previous)

    def breakpoints(self) -> tuple[float, ...]:
        if self.shape == "step":
            return (self.switch_at,)
        return (self.switch_at, min(1.0, self.switch_at + self.ramp))
