"""M4 data statistics: representation and association bias of a (weighted) dataset.

For attributes s in {0,1}^m, labels y in {0,1}^c, targets pi in [0,1]^m and non-negative
example weights w (keep probabilities q, a 0/1 subsample indicator, or None = all ones):

    representation[k]     = E_w[s_k] - pi_k                     (m,)
    association[k, r]     = E_w[(s_k - pi_k) * y_r]              (m, c)
    kept_fraction         = sum(w) / N
    effective_sample_size = (sum w)^2 / sum(w^2)

with E_w[x] = sum_i w_i x_i / sum_i w_i. `M4StatisticsAccumulator` computes the same numbers
from minibatches in O(m * c) memory, so the report scales with the streaming solver.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.balance.m4.validation import validate_examples, validate_pi


@dataclass(frozen=True)
class Violation:
    """One constraint not met: |value| > bound."""

    kind: str  # "representation" or "association"
    attribute: str
    label: str | None  # None for representation constraints
    value: float  # the statistic (signed)
    bound: float  # eps_R or eps_A

    @property
    def excess(self) -> float:
        """How far past the bound (>0): |value| - bound."""
        return abs(self.value) - self.bound

    def describe(self) -> str:
        what = (f"representation E[{self.attribute}] - pi" if self.label is None
                else f"association E[({self.attribute} - pi) * {self.label}]")
        return f"{what} = {self.value:+.5f}, bound +-{self.bound:.5f} (exceeds by {self.excess:.5f})"


@dataclass(frozen=True)
class M4Statistics:
    """Representation and association statistics of a weighted dataset (see module doc).

    Attributes:
        representation: (m,) float64, E_w[s_k] - pi_k.
        association: (m, c) float64, E_w[(s_k - pi_k) y_r].
        pi: (m,) targets used.
        num_examples: N.
        kept_fraction: sum(w) / N.
        effective_sample_size: (sum w)^2 / sum(w^2).
        attribute_names, label_names: for messages (default "s0.." and "y0..").
        violations: constraints with |statistic| > eps + tolerance, worst first; empty when
            no eps was given.
    """

    representation: np.ndarray
    association: np.ndarray
    pi: np.ndarray
    num_examples: int
    kept_fraction: float
    effective_sample_size: float
    attribute_names: tuple[str, ...]
    label_names: tuple[str, ...]
    violations: tuple[Violation, ...] = field(default=())

    @property
    def max_abs_representation(self) -> float:
        return float(np.abs(self.representation).max(initial=0.0))

    @property
    def max_abs_association(self) -> float:
        return float(np.abs(self.association).max(initial=0.0))

    def as_dict(self) -> dict:
        """Flat {metric name: value} for logging (names follow CONVENTIONS.md)."""
        out = {"data/m4/kept_fraction": self.kept_fraction,
               "data/m4/effective_sample_size": self.effective_sample_size,
               "data/m4/num_violations": float(len(self.violations))}
        for k, a in enumerate(self.attribute_names):
            out[f"bias/representation/{a}"] = float(self.representation[k])
            for r, label in enumerate(self.label_names):
                out[f"bias/association/{a}~{label}"] = float(self.association[k, r])
        return out

    def format(self, max_labels: int = 10) -> str:
        """ASCII summary: per attribute its representation and worst associations."""
        lines = [f"N={self.num_examples:,} kept={self.kept_fraction:.4f} "
                 f"ESS={self.effective_sample_size:,.1f}"]
        for k, a in enumerate(self.attribute_names):
            worst = np.argsort(-np.abs(self.association[k]))[:max_labels]
            assoc = ", ".join(f"{self.label_names[r]}={self.association[k, r]:+.4f}" for r in worst)
            lines.append(f"  {a}: E[s]-pi={self.representation[k]:+.4f} (pi={self.pi[k]:.3f}); "
                         f"max|assoc|={np.abs(self.association[k]).max(initial=0):.4f} [{assoc}]")
        if self.violations:
            lines.append(f"  {len(self.violations)} constraint(s) not met; worst:")
            lines.extend(f"    {v.describe()}" for v in self.violations[:max_labels])
        return "\n".join(lines)


class M4StatisticsAccumulator:
    """Accumulates M4Statistics over minibatches: memory O(m * c), float64 sums.

    Call `update(attributes, labels, weights)` per minibatch, then `result(...)`.
    """

    def __init__(self, pi: np.ndarray):
        self.pi = np.asarray(pi, dtype=np.float64)
        self.num_examples = 0
        self.sum_w = 0.0
        self.sum_w2 = 0.0
        self.sum_ws: np.ndarray | None = None  # (m,) sum_i w_i s_ik
        self.sum_wdy: np.ndarray | None = None  # (m, c) sum_i w_i (s_ik - pi_k) y_ir

    def update(self, attributes: np.ndarray, labels: np.ndarray, weights: np.ndarray | None) -> None:
        """attributes (B, m) 0/1, labels (B, c) 0/1, weights (B,) >= 0 or None (all 1)."""
        s = np.asarray(attributes, dtype=np.float32)
        y = np.asarray(labels, dtype=np.float32)
        w = np.ones(len(s)) if weights is None else np.asarray(weights, np.float64)
        d = s - self.pi.astype(np.float32)
        if self.sum_ws is None:
            self.sum_ws = np.zeros(s.shape[1])
            self.sum_wdy = np.zeros((s.shape[1], y.shape[1]))
        self.num_examples += len(s)
        self.sum_w += float(w.sum())
        self.sum_w2 += float(np.dot(w, w))
        self.sum_ws += w @ s
        # The (B, m) x (B, c) product in float32 (BLAS speed); sums of 0/1 products are exact
        # in float32 up to 2^24 per minibatch, weights carry ~1e-7 relative rounding.
        self.sum_wdy += ((d * w.astype(np.float32)[:, None]).T @ y).astype(np.float64)

    def result(self, attribute_names: Sequence[str] | None = None,
               label_names: Sequence[str] | None = None,
               eps_r: np.ndarray | float | None = None, eps_a: np.ndarray | float | None = None,
               tolerance: float = 0.0) -> M4Statistics:
        if self.sum_ws is None:
            raise ValueError("no examples were given to the M4 statistics")
        m, c = self.sum_wdy.shape
        names_s = _names(attribute_names, m, "s", "attribute_names")
        names_y = _names(label_names, c, "y", "label_names")
        total = self.sum_w
        if total > 0:
            representation = self.sum_ws / total - self.pi
            association = self.sum_wdy / total
        else:  # nothing kept: the statistics are undefined, report NaN rather than 0
            representation = np.full(m, np.nan)
            association = np.full((m, c), np.nan)
        violations = find_violations(representation, association, eps_r, eps_a, names_s,
                                     names_y, tolerance)
        ess = total * total / self.sum_w2 if self.sum_w2 > 0 else 0.0
        return M4Statistics(representation, association, self.pi.copy(), self.num_examples,
                            total / self.num_examples, ess, names_s, names_y, violations)


def m4_statistics(attributes, labels, weights=None, pi=0.5, *, eps_r=None, eps_a=None,
                  attribute_names=None, label_names=None, tolerance: float = 0.0,
                  batch_size: int = 65536) -> M4Statistics:
    """Representation/association statistics of a weighted dataset (module doc for the math).

    Args:
        attributes: (N, m) bool or 0/1.
        labels: (N, c) bool or 0/1.
        weights: (N,) non-negative (keep probabilities, or a 0/1 subsample mask), or None.
        pi: scalar or (m,) targets in [0, 1].
        eps_r, eps_a: if given, constraints |representation| <= eps_r (scalar or (m,)) and
            |association| <= eps_a (scalar or (m, c)) are checked and failures listed.
        tolerance: slack added to every bound before a value counts as a violation.
    """
    s, y, _ = validate_examples(attributes, labels, None)
    pis = validate_pi(pi, s.shape[1])
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != (len(s),):
            raise ValueError(f"weights must have shape ({len(s)},), got {weights.shape}")
        if not np.isfinite(weights).all() or (weights < 0).any():
            raise ValueError("weights must be finite and >= 0")
    acc = M4StatisticsAccumulator(pis)
    for start in range(0, len(s), batch_size):
        stop = start + batch_size
        acc.update(s[start:stop], y[start:stop], None if weights is None else weights[start:stop])
    return acc.result(attribute_names, label_names, eps_r, eps_a, tolerance)


def find_violations(representation, association, eps_r, eps_a, attribute_names, label_names,
                    tolerance: float = 0.0) -> tuple[Violation, ...]:
    """Constraints with |statistic| > eps + tolerance, sorted by excess (worst first)."""
    m, c = association.shape
    found: list[Violation] = []
    if eps_r is not None:
        bound_r = np.broadcast_to(np.asarray(eps_r, dtype=np.float64), (m,))
        for k in np.flatnonzero(~(np.abs(representation) <= bound_r + tolerance)):
            found.append(Violation("representation", attribute_names[k], None,
                                   float(representation[k]), float(bound_r[k])))
    if eps_a is not None:
        bound_a = np.broadcast_to(np.asarray(eps_a, dtype=np.float64), (m, c))
        for k, r in zip(*np.nonzero(~(np.abs(association) <= bound_a + tolerance)), strict=True):
            found.append(Violation("association", attribute_names[k], label_names[r],
                                   float(association[k, r]), float(bound_a[k, r])))
    found.sort(key=lambda v: -v.excess if np.isfinite(v.value) else -np.inf)
    return tuple(found)


def _names(names, count: int, prefix: str, key: str) -> tuple[str, ...]:
    if names is None:
        return tuple(f"{prefix}{i}" for i in range(count))
    names = tuple(str(n) for n in names)
    if len(names) != count:
        raise ValueError(f"{key} has {len(names)} names for {count} columns")
    return names
