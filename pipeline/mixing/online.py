"""Online data mixing: an Exp3-style bandit over sources driven by their training losses.

ODM (Albalak et al. 2023, "Efficient Online Data Mixing") treats every source as an arm of
a multi-armed bandit whose reward is the source's training loss: sources the model still
finds hard are drawn more. The probabilities mix exponential weights with a uniform floor:

    p_i = (1 - gamma) * softmax_i(log prior_i + lr * R_i) + gamma / S

where R_i is the exponentially smoothed reward of source i (``smoothing`` alpha:
R_i <- alpha R_i + (1 - alpha) r_i, initialised by the first observation), ``lr`` is the
controller's learning rate, ``gamma`` the exploration rate and ``prior`` the sampling
probabilities of the stages to the left (uniform when the bandit is the only stage). With
every source observed in every window (a batch mixes sources) the loss of each source is
seen directly, so this is the full-information form of Exp3 (Hedge) with ODM's smoothing;
no 1/p importance weight is needed. The reward r_i is the window's mean token loss of
source i, or, with ``reference_losses`` (DoReMi, Xie et al. 2023, in its online, bandit
form rather than group DRO), the excess loss max(r_i - reference_i, 0).

Epoch caps (``max_epochs``, as UniMax's): a loss-driven controller favours the small, hard
sources, so it would repeat a 20-document source hundreds of times. With a cap, each decided
window's probabilities are water-filled under each source's remaining budget (max_epochs x
documents minus the draws the decided windows already plan for it), the excess going to the
other sources in proportion; when the budgets left cannot fill a window, the caps are lifted
for it (the run is longer than the sources allow). A cap overrides the exploration floor: an
exhausted source gets probability 0.

Everything here is pure: `OnlineBandit.update` maps (state, observed losses) to the next
state and `OnlineBandit.probs` maps (prior, state) to probabilities, with no RNG. The run's
decisions (what was observed, what was decided) form a plan history
(`pipeline.mixing.schedule.OnlineSchedule`), which the sampler reads, so the stream stays a
pure function of (seed, plan history, step) and a resume replays the same decisions.

Timing (the lag rule): the controller observes window k (steps [kN, (k+1)N) for
``update_every`` N) and its decision applies from window k + 1 + ``lag_windows``. Windows 0 ..
lag_windows use the initial plan. The data loader runs ahead of training (prefetch, workers,
accumulation); the lag keeps every step it can read already decided.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from pipeline.mixing.base import MixingStage
from pipeline.mixing.plan import MixturePlan, validate_sizes


class PlanNotDecidedError(RuntimeError):
    """A step's plan was read before the online controller decided it (the loader ran ahead
    of the lag, or a caller asked for the future): the sampler refuses to guess."""


@dataclass(frozen=True)
class BanditState:
    """The controller's state between decisions.

    Attributes:
        rewards: (S,) float64 smoothed reward per source (0 until observed).
        observed: (S,) bool, whether a source has been observed yet.
    """

    rewards: np.ndarray
    observed: np.ndarray


class OnlineBandit(MixingStage):
    """The ODM bandit as a mixing stage (it must be the last stage of the list).

    As a stage, `apply` returns the *initial* plan: the controller's probabilities before any
    observation (prior tilted by nothing, mixed with the exploration floor), with the loss
    weights, ``example_keep`` and ``example_weights`` of the stages to its left unchanged.
    The sampler sees this stage and switches to an adaptive schedule
    (`pipeline.mixing.schedule.make_schedule`).

    Args:
        lr: controller learning rate (> 0): the factor on rewards inside the softmax.
        exploration: gamma in (0, 1]: the weight of the uniform floor (1 = always uniform).
        update_every: N, steps per observation window (>= 1).
        lag_windows: windows between the observed window and the one its decision applies
            to, minus one (>= 1): the decision from window k applies from window k + 1 + lag.
        smoothing: alpha in [0, 1): weight of the previous reward (0 = the last window only).
        reference_losses: optional {source: loss} of a reference run; rewards become the
            excess loss max(loss - reference, 0) (every source needs a finite value).
        max_epochs: optional cap on the passes over each source (counted in the sampler's
            documents), applied to every decided window.
    """

    def __init__(self, lr: float = 1.0, exploration: float = 0.1, update_every: int = 20,
                 lag_windows: int = 1, smoothing: float = 0.9,
                 reference_losses: Mapping[str, float] | None = None, max_epochs: float | None = None):
        self.lr = _positive_finite(lr, "online bandit lr (controller learning rate)")
        exploration = float(exploration)
        if math.isnan(exploration) or not 0.0 < exploration <= 1.0:
            raise ValueError(f"online bandit exploration must be in (0, 1], got {exploration!r}")
        self.exploration = exploration
        self.update_every = _integer_at_least(update_every, 1, "online bandit update_every")
        self.lag_windows = _integer_at_least(lag_windows, 1, "online bandit lag_windows")
        smoothing = float(smoothing)
        if math.isnan(smoothing) or not 0.0 <= smoothing < 1.0:
            raise ValueError(f"online bandit smoothing must be in [0, 1), got {smoothing!r}")
        self.smoothing = smoothing
        self.reference_losses = None
        if reference_losses is not None:
            reference = {str(k): float(v) for k, v in dict(reference_losses).items()}
            for name, value in reference.items():
                if not math.isfinite(value):
                    raise ValueError(f"online bandit reference loss of source {name!r} must be finite, got {value!r}")
            self.reference_losses = reference
        self.max_epochs = None if max_epochs is None else _positive_finite(max_epochs, "online bandit max_epochs")

    # -- the stage: the initial plan -----------------------------------------------------------
    def apply(self, sizes: Mapping[str, float], progress: float, previous: MixturePlan | None) -> MixturePlan:
        names, _ = validate_sizes(sizes)
        return self.plan_from(self.prior(names, previous), self.initial_state(len(names)).rewards, previous)

    def prior(self, names: tuple[str, ...], previous: MixturePlan | None) -> MixturePlan:
        """The plan the controller tilts: the left stages' plan, or uniform sampling."""
        if previous is None:
            return MixturePlan(names, np.full(len(names), 1.0 / len(names)), np.ones(len(names)))
        return previous

    def plan_from(self, prior: MixturePlan, rewards: np.ndarray, previous: MixturePlan | None = None) -> MixturePlan:
        """The prior's plan with the controller's probabilities for `rewards`."""
        return MixturePlan(prior.sources, self.probs(prior.sample_probs, rewards), prior.loss_weights,
                           prior.example_keep, prior.example_weights)

    # -- the controller ----------------------------------------------------------------------
    def initial_state(self, num_sources: int) -> BanditState:
        return BanditState(np.zeros(num_sources), np.zeros(num_sources, dtype=bool))

    def probs(self, prior: np.ndarray, rewards: np.ndarray) -> np.ndarray:
        """(S,) p = (1 - gamma) softmax(log prior + lr R) + gamma / S (sums to 1)."""
        prior = np.asarray(prior, dtype=np.float64)
        with np.errstate(divide="ignore"):
            logits = np.log(prior) + self.lr * np.asarray(rewards, dtype=np.float64)
        logits -= logits.max()
        weights = np.exp(logits)
        probs = (1.0 - self.exploration) * weights / weights.sum() + self.exploration / len(prior)
        return probs / probs.sum()

    def capped(self, probs: np.ndarray, limit: np.ndarray) -> np.ndarray:
        """`probs` water-filled under per-source upper bounds `limit` (S,): capped sources get
        their bound, the excess goes to the others in proportion. If the bounds sum below 1,
        `probs` unchanged (the caps cannot all hold)."""
        limit = np.maximum(np.asarray(limit, dtype=np.float64), 0.0)
        if limit.sum() < 1.0:
            return probs
        capped = np.asarray(probs, dtype=np.float64).copy()
        fixed = np.zeros(len(capped), dtype=bool)
        for _ in range(len(capped)):
            over = ~fixed & (capped > limit)
            if not over.any():
                break
            fixed |= over
            capped[fixed] = limit[fixed]
            free = ~fixed
            if not free.any():
                break
            # The fixed bounds sum below 1 (each was below its source's share of a total of 1).
            capped[free] *= (1.0 - capped[fixed].sum()) / capped[free].sum()
        return capped / capped.sum()

    def check_sources(self, names: tuple[str, ...]) -> None:
        """ValueError if the reference losses do not name exactly these sources."""
        if self.reference_losses is None:
            return
        missing = [n for n in names if n not in self.reference_losses]
        unknown = [n for n in self.reference_losses if n not in names]
        if missing:
            raise ValueError(f"online bandit reference_losses has no value for source {missing[0]!r}")
        if unknown:
            raise ValueError(f"online bandit reference_losses names unknown source {unknown[0]!r}; "
                             f"sources are {list(names)}")

    def rewards_of(self, names: tuple[str, ...], loss_sums: np.ndarray, token_counts: np.ndarray) -> np.ndarray:
        """(S,) reward of one window: mean loss per source (or excess over the reference); 0
        where a source had no token."""
        seen = token_counts > 0
        losses = np.where(seen, loss_sums / np.where(seen, token_counts, 1.0), 0.0)
        if self.reference_losses is not None:
            reference = np.array([self.reference_losses[n] for n in names])
            losses = np.where(seen, np.maximum(losses - reference, 0.0), 0.0)
        return losses

    def update(self, state: BanditState, names: tuple[str, ...], loss_sums: np.ndarray,
               token_counts: np.ndarray) -> BanditState:
        """The state after observing one window's all-reduced per-source loss sums and token
        counts ((S,) each). Sources without tokens keep their reward."""
        loss_sums = np.asarray(loss_sums, dtype=np.float64)
        token_counts = np.asarray(token_counts, dtype=np.float64)
        if loss_sums.shape != state.rewards.shape or token_counts.shape != state.rewards.shape:
            raise ValueError(f"online bandit observation has shapes {loss_sums.shape}, {token_counts.shape}; "
                             f"expected ({len(state.rewards)},)")
        if not (np.isfinite(loss_sums).all() and np.isfinite(token_counts).all()) or (token_counts < 0).any():
            bad = names[int(np.flatnonzero(~np.isfinite(loss_sums) | ~np.isfinite(token_counts)
                                           | (token_counts < 0))[0])]
            raise ValueError(f"online bandit observation for source {bad!r} is not finite (non-finite loss?)")
        reward = self.rewards_of(names, loss_sums, token_counts)
        seen = token_counts > 0
        alpha = self.smoothing
        smoothed = np.where(state.observed, alpha * state.rewards + (1.0 - alpha) * reward, reward)
        return BanditState(np.where(seen, smoothed, state.rewards), state.observed | seen)


def _positive_finite(value: float, key: str) -> float:
    value = float(value)
    if math.isnan(value) or value <= 0 or math.isinf(value):
        raise ValueError(f"{key} must be a finite number > 0, got {value!r}")
    return value


def _integer_at_least(value: int, minimum: int, key: str) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return int(value)
