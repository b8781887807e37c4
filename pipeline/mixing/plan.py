"""The `MixturePlan` every mixing stage returns, and the input checks they share.

A plan separates two things the literature often conflates:

* ``sample_probs[i]``: the probability that a draw of the sampler comes from source i
  (what fraction of *examples* source i contributes);
* ``loss_weights[i]``: the factor on each of source i's target tokens in the loss.

Temperature sampling moves mass into ``sample_probs``; upweighting keeps proportional
sampling and moves the same mass into ``loss_weights``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class MixturePlan:
    """Per-source sampling probabilities and loss weights at one point of training.

    Attributes:
        sources: source names, in a fixed order shared by the arrays below.
        sample_probs: (S,) float64, non-negative, sums to 1.
        loss_weights: (S,) float64, non-negative; 1.0 means "a token counts once".
        example_keep: optional {source: (num_documents,) bool} mask of the examples the
            sampler may draw (M4 balancing, subsample mode; see pipeline/balance/m4/stage.py);
            sources without an entry, or ``None``, keep every example. Honoured by
            `pipeline.sampling.sampler.MixtureSampler`: it draws only kept examples (a pass over the
            source is a pass over its kept ones) and refuses a mask that changes over the
            run, does not match the source's document count or keeps nothing.
        example_weights: optional {source: (num_documents,) float64} per-example factor on
            the loss weight of the example's tokens (M4 balancing, weights mode); sources
            without an entry, or ``None``, use 1. Applied by the collators
            (`pipeline.data.text_rows.plan_loss_weight`): an example's loss weight is its source's
            ``loss_weights`` entry times this factor at the example's index.
    """

    sources: tuple[str, ...]
    sample_probs: np.ndarray
    loss_weights: np.ndarray
    example_keep: Mapping[str, np.ndarray] | None = field(default=None)
    example_weights: Mapping[str, np.ndarray] | None = field(default=None)

    def __post_init__(self) -> None:
        probs = np.asarray(self.sample_probs, dtype=np.float64)
        weights = np.asarray(self.loss_weights, dtype=np.float64)
        if probs.shape != (len(self.sources),) or weights.shape != (len(self.sources),):
            raise ValueError(
                f"plan arrays must have shape ({len(self.sources)},): "
                f"sample_probs {probs.shape}, loss_weights {weights.shape}"
            )
        check_finite_nonnegative(dict(zip(self.sources, probs, strict=True)), "sample probability")
        check_finite_nonnegative(dict(zip(self.sources, weights, strict=True)), "loss weight")
        total = probs.sum()
        if not total > 0:
            raise ValueError("all sample probabilities are zero: the mixture draws nothing")
        if abs(total - 1.0) > 1e-9:
            raise ValueError(f"sample probabilities sum to {total!r}, not 1")
        object.__setattr__(self, "sample_probs", probs)
        object.__setattr__(self, "loss_weights", weights)

    @classmethod
    def from_weights(
        cls,
        sources: tuple[str, ...],
        unnormalised_probs: np.ndarray,
        loss_weights: np.ndarray | None = None,
    ) -> MixturePlan:
        """Normalise non-negative masses into probabilities (ValueError if all zero)."""
        masses = np.asarray(unnormalised_probs, dtype=np.float64)
        check_finite_nonnegative(dict(zip(sources, masses, strict=True)), "sampling mass")
        total = masses.sum()
        if not total > 0:
            raise ValueError(
                f"all sampling masses are zero for sources {list(sources)}: nothing to draw"
            )
        weights = np.ones(len(sources)) if loss_weights is None else loss_weights
        return cls(tuple(sources), masses / total, np.asarray(weights, dtype=np.float64))

    def prob(self, source: str) -> float:
        return float(self.sample_probs[self.index(source)])

    def weight(self, source: str) -> float:
        return float(self.loss_weights[self.index(source)])

    def index(self, source: str) -> int:
        try:
            return self.sources.index(source)
        except ValueError:
            raise ValueError(f"unknown source {source!r}; plan has {list(self.sources)}") from None

    def as_dict(self) -> dict[str, dict[str, float]]:
        """{source: {"prob": p, "loss_weight": w}} for logging and reports."""
        return {
            name: {"prob": float(p), "loss_weight": float(w)}
            for name, p, w in zip(self.sources, self.sample_probs, self.loss_weights, strict=True)
        }

    def expected_loss_weight(self) -> float:
        """Mean per-example loss weight under the sampling distribution."""
        return float(np.dot(self.sample_probs, self.loss_weights))


def check_finite_nonnegative(values: Mapping[str, float], what: str) -> None:
    """Raise ValueError naming the first source whose value is NaN, infinite or negative."""
    for name, value in values.items():
        value = float(value)
        if math.isnan(value) or math.isinf(value) or value < 0:
            raise ValueError(f"{what} for source {name!r} must be finite and >= 0, got {value!r}")


def validate_sizes(sizes: Mapping[str, int | float]) -> tuple[tuple[str, ...], np.ndarray]:
    """Check source sizes and return (names in input order, (S,) float64 sizes).

    Raises:
        ValueError: no sources, a non-string name, a NaN/negative size, or a source with
            zero size (an empty source cannot be sampled and usually means a data bug).
    """
    if not sizes:
        raise ValueError("no sources given: the mixture needs at least one source")
    names = tuple(sizes)
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"source names must be non-empty strings, got {name!r}")
    check_finite_nonnegative(sizes, "size")
    array = np.array([float(sizes[name]) for name in names], dtype=np.float64)
    empty = [name for name, size in zip(names, array, strict=True) if size == 0]
    if empty:
        raise ValueError(f"source {empty[0]!r} has zero documents (size 0); remove it or fix the data")
    return names, array


def validate_progress(progress: float) -> float:
    progress = float(progress)
    if math.isnan(progress) or not 0.0 <= progress <= 1.0:
        raise ValueError(f"training progress must be in [0, 1], got {progress!r}")
    return progress


def validate_tau(tau: float, key: str = "tau") -> float:
    tau = float(tau)
    if math.isnan(tau) or tau <= 0 or math.isinf(tau):
        raise ValueError(f"{key} must be a finite number > 0, got {tau!r}")
    return tau


def validate_fraction(value: float, key: str) -> float:
    value = float(value)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{key} must be in [0, 1], got {value!r}")
    return value
