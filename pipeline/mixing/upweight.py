"""Upweighting (scalarization): keep the sampling, move the temperature into the loss.

Sampling follows p(i; sample_tau) (proportional by default) and every token of source i is
weighted by p_target(i) / p(i; sample_tau). The expected per-example objective is then

    sum_i p(i; sample_tau) * w_i * L_i = sum_i p_target(i) * L_i,

exactly the temperature-sampling objective, with the same mean loss weight of 1. Its
minibatch gradient has no lower variance than sampling at tau (Li et al. 2025, Thm. 1):
rare sources appear less often but count more when they do.

The target is temperature sampling at `tau`, or, with ``tau=None``, the sampling
distribution of the stages to the left: ``[Cooldown(...), Upweight()]`` is Cooldown by
upweighting.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from pipeline.mixing.base import MixingStage
from pipeline.mixing.plan import MixturePlan, validate_sizes, validate_tau
from pipeline.mixing.temperature import temperature_probs


class Upweight(MixingStage):
    def __init__(self, tau: float | None = None, sample_tau: float = 1.0, maximum: float | None = None):
        self.tau = None if tau is None else validate_tau(tau)
        self.sample_tau = validate_tau(sample_tau, "sample_tau")
        self.maximum = maximum

    def depends_on_progress(self) -> bool:
        return False  # the plan is the same at every step

    def apply(
        self, sizes: Mapping[str, float], progress: float, previous: MixturePlan | None
    ) -> MixturePlan:
        names, array = validate_sizes(sizes)
        if self.tau is not None:
            target = temperature_probs(array, self.tau, self.maximum)
        elif previous is not None:
            target = previous.sample_probs
        else:
            raise ValueError(
                "Upweight(tau=None) takes its target from the stage to its left, but it is "
                "the first stage; give it a tau or put a Temperature/Cooldown stage first"
            )
        sample = temperature_probs(array, self.sample_tau, self.maximum)
        prior_weights = np.ones(len(names)) if previous is None else previous.loss_weights
        # sample > 0 always (sizes > 0), so every targeted source keeps a finite weight.
        return MixturePlan(names, sample, prior_weights * target / sample)
