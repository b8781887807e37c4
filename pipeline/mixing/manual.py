"""Manual weights: set the sampling masses per source, or scale the plan to the left.

Weights count *draws* (examples), not tokens: a weight of 2 against 1 means twice as many
examples, whatever their lengths.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from pipeline.mixing.base import MixingStage
from pipeline.mixing.plan import MixturePlan, check_finite_nonnegative, validate_sizes

MODES = ("set", "multiply")


class Manual(MixingStage):
    """Args:
        weights: {source: non-negative mass}; normalised to probabilities.
        default: mass of sources not named in `weights`; None requires every source named.
        mode: "set" replaces the sampling distribution; "multiply" scales the one to the
            left (e.g. weight 0 drops a source from any schedule).
        loss_weights: optional {source: factor} multiplied into the loss weights.
    """

    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        default: float | None = None,
        mode: str = "set",
        loss_weights: Mapping[str, float] | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"Manual mode must be one of {MODES}, got {mode!r}")
        self.weights = dict(weights or {})
        self.loss_weight_factors = dict(loss_weights or {})
        check_finite_nonnegative(self.weights, "manual weight")
        check_finite_nonnegative(self.loss_weight_factors, "manual loss weight")
        if default is not None:
            check_finite_nonnegative({"<default>": default}, "manual default weight")
        self.default = default
        self.mode = mode

    def _lookup(self, names: tuple[str, ...], table: Mapping[str, float], default: float | None,
                what: str) -> np.ndarray:
        unknown = sorted(set(table) - set(names))
        if unknown:
            raise ValueError(f"{what} given for unknown source {unknown[0]!r}; sources are {list(names)}")
        missing = [name for name in names if name not in table]
        if missing and default is None:
            raise ValueError(f"{what} missing for source {missing[0]!r} and no default is set")
        return np.array([float(table.get(name, default)) for name in names])

    def depends_on_progress(self) -> bool:
        return False  # the plan is the same at every step

    def apply(
        self, sizes: Mapping[str, float], progress: float, previous: MixturePlan | None
    ) -> MixturePlan:
        names, _ = validate_sizes(sizes)
        default = self.default if self.mode == "set" else (1.0 if self.default is None else self.default)
        masses = self._lookup(names, self.weights, default, "manual weight")
        if self.mode == "multiply":
            if previous is None:
                raise ValueError("Manual(mode='multiply') needs a stage to its left")
            masses = masses * previous.sample_probs
        weights = np.ones(len(names)) if previous is None else previous.loss_weights
        weights = weights * self._lookup(names, self.loss_weight_factors, 1.0, "manual loss weight")
        return MixturePlan.from_weights(names, masses, weights)
