"""Temperature sampling: p_i proportional to n_i^(1/tau) (mT5, XLM-R, fairseq).

tau = 1 is proportional sampling; tau -> infinity approaches uniform. seqio's `maximum`
clips each size before the exponent, so one huge source cannot dominate even at tau = 1.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from pipeline.mixing.base import MixingStage
from pipeline.mixing.plan import MixturePlan, validate_sizes, validate_tau


def temperature_probs(sizes: np.ndarray, tau: float, maximum: float | None = None) -> np.ndarray:
    """(S,) probabilities proportional to min(n, maximum)^(1/tau).

    Computed in log space so tau close to 0 (a near-argmax) does not overflow.
    """
    tau = validate_tau(tau)
    clipped = sizes if maximum is None else np.minimum(sizes, _validate_maximum(maximum))
    logits = np.log(clipped) / tau
    logits -= logits.max()
    masses = np.exp(logits)
    return masses / masses.sum()


def _validate_maximum(maximum: float) -> float:
    maximum = float(maximum)
    if not maximum > 0 or np.isinf(maximum):
        raise ValueError(f"maximum must be a finite number > 0, got {maximum!r}")
    return maximum


class Temperature(MixingStage):
    """Sample source i with probability proportional to min(n_i, maximum)^(1/tau).

    Overwrites the sampling probabilities of any stage to its left; keeps their loss weights.
    """

    def __init__(self, tau: float = 1.0, maximum: float | None = None):
        self.tau = validate_tau(tau)
        self.maximum = None if maximum is None else _validate_maximum(maximum)

    def depends_on_progress(self) -> bool:
        return False  # the plan is the same at every step

    def apply(
        self, sizes: Mapping[str, float], progress: float, previous: MixturePlan | None
    ) -> MixturePlan:
        names, array = validate_sizes(sizes)
        weights = None if previous is None else previous.loss_weights
        return MixturePlan(names, temperature_probs(array, self.tau, self.maximum),
                           np.ones(len(names)) if weights is None else weights)


class Proportional(Temperature):
    """Sample in proportion to size (temperature 1)."""

    def __init__(self, maximum: float | None = None):
        super().__init__(tau=1.0, maximum=maximum)
