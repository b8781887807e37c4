"""UniMax (Chung et al., ICLR 2023): uniform budget with a cap on epochs per source.

The run's budget (in the same unit as the sizes) is spread as evenly as possible over the
sources, but no source gets more than `max_epochs` passes. Sources are visited from the
smallest: each gets min(remaining budget / remaining sources, max_epochs * size), so what a
small source cannot use flows to the larger ones (water-filling).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from pipeline.mixing.base import MixingStage
from pipeline.mixing.plan import MixturePlan, validate_sizes


def unimax_allocation(sizes: np.ndarray, budget: float, max_epochs: float) -> np.ndarray:
    """(S,) budget per source in size units; sums to `budget`.

    Raises:
        ValueError: the budget exceeds what max_epochs passes over every source provide.
    """
    capacity = sizes * max_epochs
    if budget > capacity.sum() * (1 + 1e-12):
        raise ValueError(
            f"UniMax budget {budget:g} exceeds max_epochs={max_epochs:g} passes over all "
            f"sources ({capacity.sum():g}); raise max_epochs or lower the budget"
        )
    allocation = np.zeros_like(sizes)
    remaining = float(budget)
    order = np.argsort(sizes, kind="stable")
    for position, index in enumerate(order):
        fair_share = remaining / (len(order) - position)
        allocation[index] = min(fair_share, capacity[index])
        remaining -= allocation[index]
    return allocation


class UniMax(MixingStage):
    """Args:
        budget: total samples (in size units) the planned run draws; in configs this is
            usually interpolated from the run (`${run.total_samples}`).
        max_epochs: most passes over any one source.
    """

    caps_epochs = True  # the cap holds over the planned run only: the sampler stops there

    def __init__(self, budget: float, max_epochs: float = 1.0):
        budget, max_epochs = float(budget), float(max_epochs)
        if not budget > 0 or np.isinf(budget):
            raise ValueError(f"UniMax budget must be a finite number > 0, got {budget!r}")
        if not max_epochs > 0 or np.isinf(max_epochs):
            raise ValueError(f"UniMax max_epochs must be a finite number > 0, got {max_epochs!r}")
        self.budget = budget
        self.max_epochs = max_epochs

    def depends_on_progress(self) -> bool:
        return False  # the plan is the same at every step

    def apply(
        self, sizes: Mapping[str, float], progress: float, previous: MixturePlan | None
    ) -> MixturePlan:
        names, array = validate_sizes(sizes)
        allocation = unimax_allocation(array, self.budget, self.max_epochs)
        weights = None if previous is None else previous.loss_weights
        return MixturePlan.from_weights(names, allocation, weights)
