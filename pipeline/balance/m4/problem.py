"""M4 balancing (Multi-Modal Moment Matching; Alabdulmohsin et al., "CLIP the Bias", ICLR 2024).

Problem. Examples i = 1..N carry sensitive attributes s_i in {0,1}^m (may overlap: an example
can have several), labels or concept proxies y_i in {0,1}^c, and optionally a utility u_i
(e.g. a quality score). M4 chooses keep probabilities q_i in [0, 1] that solve

    minimise   P(q) = 1/(2N) sum_i (q_i - eta)^2  -  gamma/N sum_i u_i q_i              (F)
                      + C * sum_j max(0, |E_q[a_j]| - eps_j)                             (penalty)
    subject to mean_i q_i = eta,   0 <= q_i <= 1,

where E_q[x] = sum_i q_i x_i / sum_i q_i is the mean under the kept distribution and the
constraint features a_j are

    representation, j = k:        a = s_k - pi_k                 bound eps_R[k]
    association,    j = (k, r):   a = (s_k - pi_k) * y_r         bound eps_A[k, r]

so |E_q[s_k] - pi_k| <= eps_R and |E_q[(s_k - pi_k) y_r]| <= eps_A when the penalty is zero.
F keeps q as close as possible to uniform keeping (q = eta) and, with utility, prefers
high-utility examples (gamma = `utility_weight`, in units of keep probability per unit of u).
C = `enforcement` is the price per unit of violation: the constraints are soft, so an
infeasible request still returns the closest q it can, and the result lists which constraint
fails and by how much. C is also the bound on the dual variables; for a feasible request any
C above the largest optimal dual gives the hard-constrained solution (the default 100 does on
every problem in the tests).

Dual. With z_i = mu + sum_j lambda_j a_ij the minimiser over q is closed form,

    q_i = clip(eta + gamma * u_i - z_i, 0, 1),                                          (Q)
    z_i = mu + sum_k (s_ik - pi_k) * (lambda_R[k] + sum_r lambda_A[k, r] * y_ir),

and the concave dual in (mu, lambda_R (m,), lambda_A (m, c)), |lambda| <= C / eta, has
gradient mean(q) - eta and mean(q a_j) - eps_j * eta * sign(lambda_j). So the solution is
m + m*c + 1 numbers (`M4Duals`); q of any example follows from (Q) without the others.

Modules. This one holds the problem and its solution and result types (`M4Problem`,
`M4Duals`, `M4Result`) and the objective; the solvers are `streaming.py` (the default, its
module doc describes the algorithm) and `exact.py`; `api.py` is the entry point
(`m4_keep_probabilities`, the two output modes) and `stage.py` the mixing stage.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.balance.m4.statistics import M4Statistics, Violation
from pipeline.balance.m4.validation import _validate_eps, validate_examples, validate_pi

MODES = ("subsample", "weights")
SOLVERS = ("streaming", "exact")
DEFAULT_EPS_R = 0.05
DEFAULT_EPS_A = 0.01
DEFAULT_ENFORCEMENT = 100.0


class M4InfeasibleError(ValueError):
    """Raised with on_violation="raise" when constraints are still violated after solving."""

    def __init__(self, violations: Sequence[Violation], message: str):
        super().__init__(message)
        self.violations = tuple(violations)


@dataclass(frozen=True)
class M4Problem:
    """Validated parameters of one M4 problem with m attributes and c labels.

    Attributes:
        eta: target mean keep rate in (0, 1].
        pi: (m,) representation targets.
        eps_r: (m,) representation bounds; eps_a: (m, c) association bounds.
        utility_weight: gamma in (F); enforcement: C, price per unit of violation.
    """

    eta: float
    pi: np.ndarray
    eps_r: np.ndarray
    eps_a: np.ndarray
    utility_weight: float = 1.0
    enforcement: float = DEFAULT_ENFORCEMENT

    @classmethod
    def build(cls, m: int, c: int, *, eta=0.9, pi=0.5, eps_r=DEFAULT_EPS_R, eps_a=DEFAULT_EPS_A,
              utility_weight=1.0, enforcement=DEFAULT_ENFORCEMENT) -> M4Problem:
        eta = float(eta)
        if math.isnan(eta) or not 0.0 < eta <= 1.0:
            raise ValueError(f"eta (mean keep rate) must be in (0, 1], got {eta!r}")
        utility_weight = float(utility_weight)
        if not math.isfinite(utility_weight) or utility_weight < 0:
            raise ValueError(f"utility_weight must be finite and >= 0, got {utility_weight!r}")
        enforcement = float(enforcement)
        if math.isnan(enforcement) or enforcement <= 0:
            raise ValueError(f"enforcement must be > 0 (inf = hard constraints), got {enforcement!r}")
        return cls(eta, validate_pi(pi, m), _validate_eps(eps_r, (m,), "eps_r"),
                   _validate_eps(eps_a, (m, c), "eps_a"), utility_weight, enforcement)

    @property
    def num_attributes(self) -> int:
        return len(self.pi)

    @property
    def num_labels(self) -> int:
        return self.eps_a.shape[1]

    @property
    def dual_bound(self) -> float:
        """Box on |lambda| in mean(q a) units: the penalty is on E_q = mean(q a) / eta."""
        return self.enforcement / self.eta


# ----------------------------------------------------------------------------- the dual


@dataclass
class M4Duals:
    """The M4 solution in O(m * c) numbers; `keep_probabilities` applies (Q) to a minibatch.

    Attributes:
        problem: the M4Problem solved.
        mu: multiplier of mean(q) = eta.
        lambda_r: (m,) representation multipliers; lambda_a: (m, c) association multipliers.
    """

    problem: M4Problem
    mu: float
    lambda_r: np.ndarray
    lambda_a: np.ndarray

    @classmethod
    def zeros(cls, problem: M4Problem) -> M4Duals:
        m, c = problem.num_attributes, problem.num_labels
        return cls(problem, 0.0, np.zeros(m), np.zeros((m, c)))

    def shifts(self, attributes: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """z_i - mu = sum_k (s_ik - pi_k)(lambda_R[k] + lambda_A[k] . y_i): (B,) float32."""
        d = attributes.astype(np.float32) - self.problem.pi.astype(np.float32)
        y = labels.astype(np.float32)
        per_attribute = y @ self.lambda_a.T.astype(np.float32) + self.lambda_r.astype(np.float32)
        return np.einsum("bk,bk->b", d, per_attribute)

    def targets(self, num: int, utility: np.ndarray | None) -> np.ndarray:
        """eta + gamma * u_i: (B,) float32."""
        if utility is None:
            return np.full(num, self.problem.eta, dtype=np.float32)
        return (self.problem.eta + self.problem.utility_weight * utility).astype(np.float32)

    def keep_probabilities(self, attributes, labels, utility=None) -> np.ndarray:
        """(B,) float64 q_i = clip(eta + gamma u_i - mu - shift_i, 0, 1) for one minibatch."""
        s, y, u = validate_examples(attributes, labels, utility)
        w = self.targets(len(s), u) - self.shifts(s, y) - np.float32(self.mu)
        return np.clip(w, 0.0, 1.0).astype(np.float64)


# ----------------------------------------------------------------------------- results


@dataclass
class M4Result:
    """Keep probabilities and the report.

    Attributes:
        q: (N,) float64 keep probabilities in [0, 1], mean eta (up to 1e-9 when solvable).
        duals: the fitted M4Duals.
        before: statistics of the data as given (weights all 1).
        after: statistics under q (expectation over the kept distribution).
        objective: F(q) = 1/(2N) sum (q - eta)^2 - gamma/N sum u q.
        penalized_objective: P(q) = objective + C * sum of violations (E_q units).
        solver: "streaming" or "exact"; info: solver details (passes, batches, time, gap).
    """

    q: np.ndarray
    duals: M4Duals
    before: M4Statistics
    after: M4Statistics
    objective: float
    penalized_objective: float
    solver: str
    info: dict = field(default_factory=dict)

    @property
    def violations(self) -> tuple[Violation, ...]:
        """Constraints not met under q (E_q units), worst first; empty if all are met."""
        return self.after.violations

    @property
    def feasible(self) -> bool:
        return not self.after.violations

    def describe_violations(self, limit: int = 10) -> str:
        if self.feasible:
            return "all M4 constraints are met"
        lines = [f"{len(self.violations)} M4 constraint(s) cannot be met with eta="
                 f"{self.duals.problem.eta:g} (closest q found; worst first):"]
        lines += [f"  {v.describe()}" for v in self.violations[:limit]]
        return "\n".join(lines)


def m4_objective(q: np.ndarray, problem: M4Problem, utility: np.ndarray | None,
                 after: M4Statistics) -> tuple[float, float]:
    """(F(q), P(q)) given q and the statistics under q (see the module doc)."""
    objective = 0.5 * float(np.mean((q - problem.eta) ** 2))
    if utility is not None:
        objective -= problem.utility_weight * float(np.mean(utility * q))
    excess = np.concatenate([
        np.maximum(0.0, np.abs(after.representation) - problem.eps_r),
        np.maximum(0.0, np.abs(after.association) - problem.eps_a).ravel(),
    ])
    return objective, objective + problem.enforcement * float(excess.sum())
