"""Two-phase curriculum: high-resource sources only, then all sources.

"Order Matters in the Presence of Dataset Imbalance for Multilingual Learning" (Choi et
al., NeurIPS 2023): pre-train on the high-resource sources, then fine-tune on the full
mixture. Phase 1 runs until `switch_at`; both phases sample at temperature `tau`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from pipeline.mixing.base import MixingStage
from pipeline.mixing.plan import MixturePlan, validate_fraction, validate_sizes, validate_tau
from pipeline.mixing.temperature import temperature_probs


class OrderMatters(MixingStage):
    """Args:
        switch_at: fraction of training spent in phase 1.
        high_resource: names of the phase-1 sources, or None to use `min_size`.
        min_size: with high_resource=None, phase 1 uses sources with size >= min_size.
        tau: temperature used in both phases.
    """

    def __init__(
        self,
        switch_at: float = 0.5,
        high_resource: Sequence[str] | None = None,
        min_size: float | None = None,
        tau: float = 1.0,
    ):
        self.switch_at = validate_fraction(switch_at, "switch_at")
        if (high_resource is None) == (min_size is None):
            raise ValueError("OrderMatters needs exactly one of high_resource or min_size")
        self.high_resource = None if high_resource is None else tuple(high_resource)
        self.min_size = None if min_size is None else float(min_size)
        self.tau = validate_tau(tau)

    def phase_one_mask(self, names: tuple[str, ...], sizes: np.ndarray) -> np.ndarray:
        if self.high_resource is not None:
            unknown = sorted(set(self.high_resource) - set(names))
            if unknown:
                raise ValueError(f"OrderMatters high_resource names unknown source {unknown[0]!r}")
            mask = np.array([name in self.high_resource for name in names])
        else:
            mask = sizes >= self.min_size
        if not mask.any():
            raise ValueError(
                f"OrderMatters phase 1 has no sources (min_size={self.min_size}, "
                f"largest size {sizes.max():g})"
            )
        return mask

    def apply(
        self, sizes: Mapping[str, float], progress: float, previous: MixturePlan | None
    ) -> MixturePlan:
        names, array = validate_sizes(sizes)
        probs = temperature_probs(array, self.tau)
        if progress < self.switch_at:
            probs = np.where(self.phase_one_mask(names, array), probs, 0.0)
        weights = None if previous is None else previous.loss_weights
        return MixturePlan.from_weights(names, probs, weights)

    def breakpoints(self) -> tuple[float, ...]:
        return (self.switch_at,)
