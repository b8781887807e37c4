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

Solvers.
    * streaming (default, `fit_streaming`): proximal Newton ascent on the dual. Pass 1 is
      stochastic (one line-searched Newton step per minibatch, conjugate gradients on the
      minibatch curvature, OWL-QN orthant rule for the L1 term, a trust region); each later
      pass evaluates the exact full-data dual and gradient at several step sizes along the
      Newton direction (curvature of a fixed 8192-example sample) and keeps the best: one
      verified Newton step per pass. State O(m * c) plus that sample, independent of N;
      work per example O(m * c * G): two stacked products per minibatch. Then one pass
      writes q and fixes mean(q) = eta exactly (a 1-D root in mu). Default 10 passes; see
      docs/BENCHMARKS.md for what fewer give. The products are memory-bound; on a loaded
      machine multithreaded OpenBLAS can be 100x slower on them than one thread
      (OPENBLAS_NUM_THREADS=1; scripts/bench_m4.py sets it).
    * exact (small N, `pipeline.balance.m4.exact.solve_exact`): the same dual maximised to
      convergence by scipy's L-BFGS-B on the full data, certified by the duality gap.

Output and how it reaches training. `m4_keep_probabilities(...) -> M4Result` returns q (N,)
with before/after statistics. Two modes, the same two routes Temperature vs Upweight take:

    * mode="subsample" (the paper's): `m4_subsample(q, seed)` draws a seeded Bernoulli(q_i)
      subsample, a deterministic function of (q, seed); training sees only kept examples.
    * mode="weights": every example stays, with per-example loss weight q_i / eta (mean 1),
      which gives the loss exactly the kept distribution's expectation.

As a mixing stage, `M4(keep={source: q}, mode=..., seed=...)` (q solved jointly over the
concatenated sources, e.g. with `solve_sources`) refines the plan of the stages to its left:

    subsample: plan.example_keep[source] = (num_documents,) bool mask of the kept examples;
               sample_probs[source] *= kept fraction of source (renormalised), so a
               proportional plan stays proportional to the *kept* sizes and the pooled kept
               data is what M4 balanced.
    weights:   plan.example_weights[source] = (num_documents,) float64 q / eta_pooled,
               multiplied into the per-token loss weight of each example's tokens;
               sample_probs and per-source loss_weights unchanged.

Sources the stage has no q for are left untouched (no entry in example_keep/weights). The
masks are drawn once in __init__ (seeded per source name), so `apply` stays a pure, cheap
function of (sizes, progress) like every other stage.
"""

from __future__ import annotations

import logging
import math
import os
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.balance.m4.statistics import (
    M4Statistics,
    M4StatisticsAccumulator,
    Violation,
    m4_statistics,
)
from pipeline.mixing.base import MixingStage
from pipeline.mixing.plan import MixturePlan, validate_sizes
from pipeline.storage.atomic import atomic_write

log = logging.getLogger(__name__)

MODES = ("subsample", "weights")
SOLVERS = ("streaming", "exact")
DEFAULT_EPS_R = 0.05
DEFAULT_EPS_A = 0.01
DEFAULT_ENFORCEMENT = 100.0
TRUST_RADIUS = 1.0  # largest RMS change of z = eta - q (before the clip) per minibatch step
# Step sizes along each full-data Newton direction, all evaluated in one pass (one stacked
# product per minibatch), so a pass never goes to waste on a step that overshoots.
STEP_GRID = (1.5, 1.0, 0.7, 0.45, 0.25, 0.1)

# A minibatch: (attributes (B, m), labels (B, c)) or (attributes, labels, utility (B,)).
Batch = tuple[np.ndarray, ...]


class M4InfeasibleError(ValueError):
    """Raised with on_violation="raise" when constraints are still violated after solving."""

    def __init__(self, violations: Sequence[Violation], message: str):
        super().__init__(message)
        self.violations = tuple(violations)


# ----------------------------------------------------------------------------- validation


def validate_examples(attributes, labels, utility) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Check shapes and binarity; returns (s (N, m), y (N, c), u (N,) float64 or None).

    Bool and integer arrays are returned as they are (no copy); other dtypes are checked to
    hold only 0 and 1.
    """
    s = _binary_matrix(attributes, "attributes")
    y = _binary_matrix(labels, "labels")
    if s.shape[1] == 0:
        raise ValueError("attributes has 0 columns: M4 needs at least one sensitive attribute")
    if len(s) != len(y):
        raise ValueError(f"attributes has {len(s)} rows but labels has {len(y)}: one row per example")
    if len(s) == 0:
        raise ValueError("no examples: attributes and labels have 0 rows")
    u = None
    if utility is not None:
        u = np.asarray(utility, dtype=np.float64)
        if u.shape != (len(s),):
            raise ValueError(f"utility must have shape ({len(s)},), got {u.shape}")
        bad = np.flatnonzero(~np.isfinite(u))
        if bad.size:
            raise ValueError(f"utility must be finite; row {bad[0]} is {u[bad[0]]!r}")
    return s, y, u


def _binary_matrix(values, key: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim == 1 and key == "attributes":
        array = array[:, None]  # one attribute given as (N,)
    if array.ndim != 2:
        raise ValueError(f"{key} must be a 2-D (examples, columns) array, got shape {array.shape}")
    if array.dtype == np.bool_:
        return array
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{key} must be bool or numeric 0/1, got dtype {array.dtype}")
    bad = (array != 0) & (array != 1)  # NaN compares unequal to both, so it is caught too
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(
            f"{key} must be binary (0/1): column {col} has value {array[row, col].item()!r} at row {row}"
        )
    return array


def validate_pi(pi, m: int) -> np.ndarray:
    """(m,) float64 targets in [0, 1] from a scalar or a length-m sequence."""
    array = np.asarray(pi, dtype=np.float64)
    if array.ndim > 1 or (array.ndim == 1 and array.shape != (m,)):
        raise ValueError(f"pi must be a scalar or have shape ({m},) (one per attribute), got {array.shape}")
    array = np.broadcast_to(array, (m,)).copy()
    if not (np.isfinite(array).all() and (array >= 0).all() and (array <= 1).all()):
        raise ValueError(f"pi must be in [0, 1], got {array.tolist()}")
    return array


def _validate_eps(value, shape: tuple[int, ...], key: str) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    try:
        array = np.broadcast_to(array, shape).copy()
    except ValueError:
        raise ValueError(f"{key} must be a scalar or broadcast to shape {shape}, got {array.shape}") from None
    if not np.isfinite(array).all() or (array < 0).any():
        raise ValueError(f"{key} must be finite and >= 0, got {value!r}")
    return array


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


# ----------------------------------------------------------------------------- streaming solver


def fit_streaming(batches: Callable[[], Iterable[Batch]], problem: M4Problem, *, passes: int = 10,
                  hessian_rows: int = 8192, cg_iterations: int = 20,
                  check_binary: bool = True) -> tuple[M4Duals, dict]:
    """Fit the M4 duals with streaming proximal Newton dual ascent; memory O(m * c).

    Pass 1 is stochastic: per minibatch, q from the current duals (Q), the minibatch dual
    gradient, a Newton direction by conjugate gradients on the curvature of (the first
    `hessian_rows` rows of) the minibatch (Hessian-vector products are two (B, c) x (c, m)
    products; the Hessian is never formed), aligned with the orthant of the L1 term as in
    OWL-QN, capped by a trust region, then a backtracking line search on the minibatch dual.
    Its iterates are averaged over (at least) the last half of the pass.

    Each later pass streams the exact full-data dual value and gradient at G =
    len(STEP_GRID) points along the current Newton direction (step sizes STEP_GRID; one
    stacked product per minibatch, so the labels are still read twice), keeps the best point,
    and computes the next direction from its full gradient and the curvature of a fixed
    sample (the first `hessian_rows` examples of pass 1, kept in memory: O(hessian_rows * c),
    independent of N). The result is the best point evaluated on the full data (passes = 1:
    the stochastic average alone); the loop stops early once the dual stops improving.

    Args:
        batches: called once per pass, returns an iterable of minibatches (attributes (B, m),
            labels (B, c)[, utility (B,)]), the same examples every pass, in a shuffled order
            (stochastic updates on sorted data are biased). Minibatches of 10^4-10^5 examples
            amortise the Python overhead.
        problem: the validated M4Problem.
        passes: passes over the data (>= 1).
        hessian_rows: rows used for curvature (per minibatch in pass 1; the fixed sample after).
        cg_iterations: conjugate-gradient iterations per Newton direction.

    Returns:
        (duals, info) with info = {"passes", "passes_run", "batches", "examples_per_pass", "dual_value",
        "newton_steps", "shrinks", "line_search_failures", "pass_seconds"}.
    """
    if int(passes) != passes or passes < 1:
        raise ValueError(f"passes must be an integer >= 1, got {passes!r}")
    m, c = problem.num_attributes, problem.num_labels
    if problem.eta == 1.0:  # q = 1 is the only point with mean 1: nothing to fit
        return M4Duals.zeros(problem), {"passes": 0, "passes_run": 0, "batches": 0,
                                        "examples_per_pass": 0, "dual_value": float("nan"),
                                        "newton_steps": 0, "shrinks": 0,
                                        "line_search_failures": 0, "pass_seconds": []}
    size = 1 + m + m * c  # [mu, lambda_r, lambda_a.ravel()]
    eps = np.concatenate([[0.0], problem.eps_r, problem.eps_a.ravel()]) * problem.eta
    upper = np.concatenate([[np.inf], np.full(size - 1, problem.dual_bound)])
    state = np.zeros(size)
    # Tail average of the pass-1 iterates in O(size): sums over [2^(k-1), 2^k) and [2^k, t],
    # so at least the last half of the iterates are averaged without keeping them.
    previous_sum, current_sum = np.zeros(size), np.zeros(size)
    previous_count = current_count = 0
    next_window = 1
    sample_rows: list[tuple] = []
    kept_rows = 0
    num_batches = failures = examples = 0
    pass_seconds = [time.perf_counter()]  # wall time per pass, iterator time included
    for batch in batches():  # pass 1: stochastic
        s, y, u = _unpack(batch, m, c, check_binary)
        examples += len(s)
        if kept_rows < hessian_rows:
            take = min(len(s), hessian_rows - kept_rows)
            sample_rows.append((s[:take].copy(), y[:take].copy(), None if u is None else u[:take].copy()))
            kept_rows += take
        minibatch = _Minibatch(problem, s, y, u)
        state, ok = minibatch.newton_step(state, eps, upper, hessian_rows, cg_iterations)
        failures += not ok
        num_batches += 1
        if num_batches == next_window:
            previous_sum, previous_count = current_sum, current_count
            current_sum, current_count = np.zeros(size), 0
            next_window *= 2
        current_sum += state
        current_count += 1
    if examples == 0:
        raise ValueError("the minibatch iterable yielded no examples")
    pass_seconds.append(time.perf_counter())
    state = (previous_sum + current_sum) / (previous_count + current_count)
    sample = _Minibatch(problem, np.concatenate([r[0] for r in sample_rows]),
                        np.concatenate([r[1] for r in sample_rows]),
                        None if sample_rows[0][2] is None else np.concatenate([r[2] for r in sample_rows]))
    best, best_value = state, -np.inf
    candidates = state[None, :]  # (G, size): the points this pass evaluates
    newton_steps = shrinks = stalled = 0
    scale = 1.0  # multiplies STEP_GRID; shrinks when every candidate lowered the dual
    eta = problem.eta
    for _ in range(1, int(passes)):  # full-gradient passes with a grid line search
        total_phi, moments, count = np.zeros(len(candidates)), np.zeros((len(candidates), size)), 0
        for batch in batches():
            s, y, u = _unpack(batch, m, c, False)
            minibatch = _Minibatch(problem, s, y, u)
            phi, batch_moments = minibatch.candidate_sums(candidates)
            total_phi += phi
            moments += batch_moments
            count += len(s)
            num_batches += 1
        if count != examples:
            raise ValueError(f"the minibatches held {examples} examples in pass 1 and {count} later; "
                             "`batches` must yield the same examples every pass")
        pass_seconds.append(time.perf_counter())
        values = (total_phi / count + 0.5 * eta * eta - candidates[:, 0] * eta
                  - np.abs(candidates) @ eps)
        pick = int(np.argmax(values))
        if values[pick] <= best_value:  # no candidate improved: search closer to best next
            scale *= STEP_GRID[-1]
            shrinks += 1
            stalled += 1
            if stalled == 3:  # steps 1000x shorter than Newton's still fail: converged
                break
        else:
            stalled = 0
            converged = values[pick] - best_value <= 1e-9 * abs(values[pick])
            best, best_value = candidates[pick], float(values[pick])
            if converged:
                break
            grad = moments[pick] / count
            grad[0] -= eta
            direction = sample.newton_direction(best, grad, eps, upper, cg_iterations)
            newton_steps += 1
            # The longest step won: the direction is still good further out (typical when a
            # constraint cannot be met and its dual climbs to the enforcement bound), so look
            # 4x further next time; otherwise return towards Newton's own step length.
            scale = scale * 4 if pick == 0 and len(candidates) > 1 else min(1.0, scale * 2)
        candidates = np.stack([_project(best, best + scale * alpha * direction, upper)
                               for alpha in STEP_GRID]) if newton_steps else best[None, :]
    final = state if passes == 1 else best
    duals = M4Duals(problem, float(final[0]), final[1:1 + m].copy(), final[1 + m:].reshape(m, c).copy())
    return duals, {"passes": int(passes), "passes_run": len(pass_seconds) - 1,
                   "batches": num_batches, "examples_per_pass": examples,
                   "dual_value": float(best_value), "newton_steps": newton_steps,
                   "shrinks": shrinks, "line_search_failures": failures,
                   "pass_seconds": np.diff(pass_seconds).tolist()}


class _Minibatch:
    """One minibatch in float32 with the products the streaming solver needs."""

    def __init__(self, problem: M4Problem, s: np.ndarray, y: np.ndarray, u: np.ndarray | None):
        self.problem = problem
        self.m, self.c = problem.num_attributes, problem.num_labels
        self.d = s.astype(np.float32) - problem.pi.astype(np.float32)  # (B, m)
        self.y = y.astype(np.float32)  # (B, c)
        self.t = _targets(problem, len(s), u)  # (B,)

    def shift(self, x: np.ndarray, rows: slice = slice(None)) -> np.ndarray:
        """z = x0 + sum_k d_k (x_r[k] + y . x_a[k]) for dual vector x (size,): (B,) float32."""
        m = self.m
        per_attribute = (self.y[rows] @ x[1 + m:].reshape(m, self.c).T.astype(np.float32)
                         + x[1:1 + m].astype(np.float32))
        return np.float32(x[0]) + np.einsum("bk,bk->b", self.d[rows], per_attribute)

    def moments(self, weights: np.ndarray, rows: slice = slice(None)) -> np.ndarray:
        """mean_i weights_i * a_i with a = [1, d, d (x) y]: (size,) float64."""
        d = self.d[rows]
        dw = d * weights[:, None]
        scale = 1.0 / len(d)
        return np.concatenate([[weights.sum(dtype=np.float64)], dw.sum(0, dtype=np.float64),
                               (dw.T @ self.y[rows]).astype(np.float64).ravel()]) * scale

    def dual_value(self, x: np.ndarray, eps: np.ndarray) -> float:
        w = self.t - self.shift(x)
        q = np.clip(w, 0.0, 1.0)
        phi = 0.5 * (q - w) ** 2 - 0.5 * w * w
        eta = self.problem.eta
        return float(phi.mean(dtype=np.float64)) + 0.5 * eta * eta - x[0] * eta - float(eps @ np.abs(x))

    def newton_step(self, x: np.ndarray, eps: np.ndarray, upper: np.ndarray, hessian_rows: int,
                    cg_iterations: int) -> tuple[np.ndarray, bool]:
        """The minibatch's proximal Newton step from x; (new x, line search succeeded)."""
        q = np.clip(self.t - self.shift(x), 0.0, 1.0)
        grad = self.moments(q)
        grad[0] -= self.problem.eta
        pg = _pseudo_gradient(x, grad, eps, upper)
        if not np.any(pg):
            return x, True
        direction = self.direction(x, pg, slice(0, hessian_rows), cg_iterations)
        start = self.dual_value(x, eps)
        alpha = 1.0
        for _ in range(30):
            trial = _project(x, x + alpha * direction, upper)
            if self.dual_value(trial, eps) >= start + 1e-4 * float(pg @ (trial - x)):
                return trial, True
            alpha *= 0.5
        return x, False

    def newton_direction(self, x: np.ndarray, grad: np.ndarray, eps: np.ndarray, upper: np.ndarray,
                         cg_iterations: int) -> np.ndarray:
        """Newton direction for the full-data gradient `grad` with this sample's curvature."""
        pg = _pseudo_gradient(x, grad, eps, upper)
        if not np.any(pg):
            return np.zeros_like(x)
        return self.direction(x, pg, slice(None), cg_iterations)

    def candidate_sums(self, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For G dual points (G, size): sums over the minibatch of phi (G,) and of q a (G, size).

        One (B, c) x (c, G m) and one (G m, B) x (B, c) product: the labels are read twice
        whatever G is, which is what a memory-bound pass costs.
        """
        m, c, g = self.m, self.c, len(candidates)
        lam_a = candidates[:, 1 + m:].reshape(g, m, c)
        per_attribute = (self.y @ lam_a.reshape(g * m, c).T.astype(np.float32)).reshape(-1, g, m)
        per_attribute += candidates[:, 1:1 + m].astype(np.float32)
        z = candidates[:, 0].astype(np.float32) + np.einsum("bk,bgk->bg", self.d, per_attribute)
        w = self.t[:, None] - z  # (B, G)
        q = np.clip(w, 0.0, 1.0)
        phi = (0.5 * (q - w) ** 2 - 0.5 * w * w).sum(0, dtype=np.float64)
        dq = self.d[:, None, :] * q[:, :, None]  # (B, G, m)
        label_part = (dq.reshape(len(q), g * m).T @ self.y).astype(np.float64).reshape(g, m * c)
        sums = np.concatenate([q.sum(0, dtype=np.float64)[:, None], dq.sum(0, dtype=np.float64),
                               label_part], axis=1)
        return phi, sums

    def direction(self, x: np.ndarray, pg: np.ndarray, rows: slice, cg_iterations: int) -> np.ndarray:
        """Orthant-aligned, trust-capped Newton direction H^-1 pg on the free coordinates."""
        q = np.clip(self.t[rows] - self.shift(x, rows), 0.0, 1.0)
        active = ((q > 0) & (q < 1)).astype(np.float32)
        d2 = self.d[rows] * self.d[rows] * active[:, None]
        diag = np.concatenate([[active.sum(dtype=np.float64)], d2.sum(0, dtype=np.float64),
                               (d2.T @ self.y[rows]).astype(np.float64).ravel()]) / len(d2)
        ridge = 1e-6 * max(float(diag.max()), 1e-12)
        free = (pg != 0) | (x != 0)

        def hessian_vector(v: np.ndarray) -> np.ndarray:
            return (self.moments(active * self.shift(v, rows), rows) + ridge * v) * free

        direction = _conjugate_gradient(hessian_vector, pg * free, 1.0 / (diag + ridge), cg_iterations)
        direction[1:][direction[1:] * pg[1:] <= 0] = 0.0  # stay in the orthant of the L1 term
        if float(pg @ direction) <= 0:
            direction = pg / (diag + ridge)
        # Trust region: the dual is flat where every q saturates, so an unguarded Newton step
        # can jump far; cap the RMS change of z (a keep-probability unit).
        change = float(np.sqrt(np.mean(self.shift(direction, rows) ** 2)))
        if change > TRUST_RADIUS:
            direction *= TRUST_RADIUS / change
        return direction


def _pseudo_gradient(x: np.ndarray, grad: np.ndarray, eps: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Steepest-ascent direction of grad . x - eps . |x| on the box |x| <= upper (OWL-QN)."""
    pg = np.where(x > 0, grad - eps, np.where(x < 0, grad + eps,
                  np.where(grad > eps, grad - eps, np.where(grad < -eps, grad + eps, 0.0))))
    pg[(x >= upper) & (pg > 0)] = 0.0
    pg[(x <= -upper) & (pg < 0)] = 0.0
    return pg


def _project(x: np.ndarray, trial: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """No sign change within a step (a crossing stops at 0), then the box."""
    trial = np.where((x != 0) & (np.sign(trial) != np.sign(x)), 0.0, trial)
    return np.clip(trial, -upper, upper)


def _conjugate_gradient(matvec, rhs: np.ndarray, inverse_diag: np.ndarray, iterations: int) -> np.ndarray:
    """Jacobi-preconditioned CG for H v = rhs (H symmetric positive definite on the free set)."""
    v = np.zeros_like(rhs)
    residual = rhs.copy()
    z = inverse_diag * residual
    p = z.copy()
    rz = float(residual @ z)
    target = 1e-10 * rz
    for _ in range(iterations):
        hp = matvec(p)
        curvature = float(p @ hp)
        if curvature <= 0:
            break
        step = rz / curvature
        v += step * p
        residual -= step * hp
        z = inverse_diag * residual
        rz_new = float(residual @ z)
        if rz_new <= target:
            break
        p = z + (rz_new / rz) * p
        rz = rz_new
    return v


def _targets(problem: M4Problem, num: int, utility: np.ndarray | None) -> np.ndarray:
    if utility is None:
        return np.full(num, problem.eta, dtype=np.float32)
    return (problem.eta + problem.utility_weight * utility).astype(np.float32)


def _unpack(batch: Batch, m: int, c: int, check: bool):
    if len(batch) not in (2, 3):
        raise ValueError("a minibatch is (attributes, labels) or (attributes, labels, utility)")
    s, y = batch[0], batch[1]
    u = batch[2] if len(batch) == 3 else None
    if check:
        s, y, u = validate_examples(s, y, u)
    else:
        s, y = np.asarray(s), np.asarray(y)
        u = None if u is None else np.asarray(u, dtype=np.float64)
    if s.ndim == 1:
        s = s[:, None]
    if s.shape[1] != m or y.shape[1] != c or len(s) != len(y):
        raise ValueError(f"minibatch shapes attributes {s.shape}, labels {y.shape} do not match "
                         f"m={m} attributes and c={c} labels")
    return s, y, u


def write_keep_probabilities(batches: Iterable[Batch], duals: M4Duals, out: np.ndarray,
                             *, fix_mean: bool = True) -> M4StatisticsAccumulator:
    """The final pass: q into `out` (N,) float64 with mean(q) = eta; statistics of the input.

    Holds only `out` and O(m * c) sums. Returns the accumulator of the unweighted ("before")
    statistics. `duals.mu` is updated by the mean fix, so `duals.keep_probabilities`
    reproduces `out`.
    """
    problem = duals.problem
    before = M4StatisticsAccumulator(problem.pi)
    position = 0
    # First write w_i = eta + gamma u_i - shift_i (q before mu and the clip).
    for batch in batches:
        s, y, u = _unpack(batch, problem.num_attributes, problem.num_labels, False)
        stop = position + len(s)
        if stop > len(out):
            raise ValueError(f"the minibatches hold more than the {len(out)} examples of `out`")
        out[position:stop] = _targets(problem, len(s), u) - duals.shifts(s, y)
        before.update(s, y, None)
        position = stop
    if position != len(out):
        raise ValueError(f"the minibatches hold {position} examples, `out` has {len(out)}")
    if fix_mean:
        duals.mu = _solve_mu(out, problem.eta, duals.mu)
    np.subtract(out, duals.mu, out=out)
    np.clip(out, 0.0, 1.0, out=out)
    return before


def _clipped_mean_and_slope(w: np.ndarray, mu: float, chunk: int = 1 << 18) -> tuple[float, float]:
    """(mean(clip(w - mu, 0, 1)), fraction strictly inside (0, 1)), in chunks so that the
    temporaries stay O(chunk), not O(N)."""
    total = inside = 0.0
    for start in range(0, len(w), chunk):
        shifted = w[start:start + chunk] - mu
        total += float(np.clip(shifted, 0.0, 1.0).sum())
        inside += float(np.count_nonzero((shifted > 0) & (shifted < 1)))
    return total / len(w), inside / len(w)


def _solve_mu(w: np.ndarray, eta: float, mu0: float) -> float:
    """mu with mean(clip(w - mu, 0, 1)) = eta (monotone, piecewise linear): safeguarded Newton."""
    lo, hi = float(w.min()) - 1.0, float(w.max())  # mean = 1 at lo, 0 at hi
    if eta >= 1.0:
        return lo
    mu = min(max(mu0, lo), hi)
    for _ in range(100):
        mean, slope = _clipped_mean_and_slope(w, mu)
        value = mean - eta
        if abs(value) < 1e-12:
            break
        if value > 0:
            lo = mu
        else:
            hi = mu
        step = mu + value / slope if slope > 0 else 0.5 * (lo + hi)
        mu = step if lo < step < hi else 0.5 * (lo + hi)
        if hi - lo < 1e-13:
            break
    return mu


# ----------------------------------------------------------------------------- public entry


def m4_keep_probabilities(attributes, labels, *, eta: float = 0.9, pi=0.5,
                          eps_r=DEFAULT_EPS_R, eps_a=DEFAULT_EPS_A, utility=None,
                          utility_weight: float = 1.0, enforcement: float = DEFAULT_ENFORCEMENT,
                          solver: str = "streaming", batch_size: int = 65536, passes: int = 10,
                          seed: int = 0, attribute_names: Sequence[str] | None = None,
                          label_names: Sequence[str] | None = None, tolerance: float = 1e-4,
                          on_violation: str = "warn") -> M4Result:
    """Solve M4 (module doc) and return keep probabilities with a before/after report.

    Args:
        attributes: (N, m) bool or 0/1 sensitive attributes (overlap allowed).
        labels: (N, c) bool or 0/1 labels / concept proxies (c may be 0).
        eta: mean keep rate in (0, 1]. pi: scalar or (m,) representation targets.
        eps_r: scalar or (m,) bound on |E_q[s_k] - pi_k|.
        eps_a: scalar or (m, c) bound on |E_q[(s_k - pi_k) y_r]|.
        utility: optional (N,) utilities; utility_weight: gamma (keep probability per unit u).
        enforcement: C, price per unit of constraint violation (soft constraints).
        solver: "streaming" (minibatch primal-dual, O(m c) memory) or "exact" (scipy, small N).
            When a constraint cannot be met its dual sits at the enforcement bound and q
            becomes very sensitive to the duals: there the streaming q can be clearly worse
            than the exact one (measured on a 1,000-example toy with one unmeetable bound:
            penalised objective 2.45-6.19 against the exact 2.45, depending on batch_size).
            Use "exact" for infeasible requests where N allows. A streaming q that breaks a
            constraint the data already met, is non-finite, or is worse than uniform keeping
            is replaced (`_guard_streaming`: exact re-solve with those constraints hard, else
            a move toward q = eta); `info["guard"]` and a warning say so.
        batch_size, passes, seed: streaming minibatch size, passes to fit the duals, and the
            seed of the per-pass shuffle (q depends on it only through solver noise).
        attribute_names, label_names: used in the report and messages.
        tolerance: slack (E_q units) before a constraint counts as violated in the report.
        on_violation: "warn" (log the failing constraints), "raise" (M4InfeasibleError naming
            them and how close q got) or "ignore".

    Returns:
        M4Result with q (N,) float64 in [0, 1], mean(q) = eta.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if on_violation not in ("warn", "raise", "ignore"):
        raise ValueError(f"on_violation must be 'warn', 'raise' or 'ignore', got {on_violation!r}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    s, y, u = validate_examples(attributes, labels, utility)
    problem = M4Problem.build(s.shape[1], y.shape[1], eta=eta, pi=pi, eps_r=eps_r, eps_a=eps_a,
                              utility_weight=utility_weight, enforcement=enforcement)
    n = len(s)
    if solver == "exact":
        from pipeline.balance.m4.exact import solve_exact

        duals, info = solve_exact(s, y, u, problem)
    else:
        def shuffled() -> Iterator[Batch]:
            order = rng.permutation(n)
            for start in range(0, n, batch_size):
                rows = np.sort(order[start:start + batch_size])  # sorted rows read faster
                yield (s[rows], y[rows]) if u is None else (s[rows], y[rows], u[rows])

        rng = np.random.default_rng(seed)
        duals, info = fit_streaming(shuffled, problem, passes=passes, check_binary=False)
    q = np.empty(n, dtype=np.float64)
    in_order = ((s[i:i + batch_size], y[i:i + batch_size]) if u is None else
                (s[i:i + batch_size], y[i:i + batch_size], u[i:i + batch_size])
                for i in range(0, n, batch_size))
    before_acc = write_keep_probabilities(in_order, duals, q)
    names = (attribute_names, label_names)
    before = before_acc.result(*names, problem.eps_r, problem.eps_a, tolerance)
    after = m4_statistics(s, y, q, problem.pi, eps_r=problem.eps_r, eps_a=problem.eps_a,
                          attribute_names=attribute_names, label_names=label_names,
                          tolerance=tolerance, batch_size=batch_size)
    if solver == "streaming":
        duals, q, after, info = _guard_streaming(s, y, u, problem, duals, q, before, after, info, names,
                                                 tolerance, batch_size)
    objective, penalized = m4_objective(q, problem, u, after)
    if solver == "exact":  # the certificate: P(q) - g(duals) >= 0, zero at the optimum
        info["gap"] = penalized - info["dual_value"]
    result = M4Result(q, duals, before, after, objective, penalized, solver, info)
    if not result.feasible and on_violation != "ignore":
        message = result.describe_violations()
        if on_violation == "raise":
            raise M4InfeasibleError(result.violations, message)
        log.warning("%s", message)
    return result


# Largest N * (m + c) the guard re-solves exactly (float64 copies: ~8 bytes each, a few times).
EXACT_FALLBACK_LIMIT = 20_000_000


def _excess(stats: M4Statistics, problem: M4Problem) -> np.ndarray:
    """(m + m*c,) |statistic| - eps, representation first, then association raveled."""
    values = np.concatenate([stats.representation, stats.association.ravel()])
    bounds = np.concatenate([problem.eps_r, problem.eps_a.ravel()])
    return np.where(np.isfinite(values), np.abs(values) - bounds, np.inf)


def _constraint_names(stats: M4Statistics, which: np.ndarray) -> list[str]:
    m, c = len(stats.attribute_names), len(stats.label_names)
    out = []
    for j in np.flatnonzero(which):
        if j < m:
            out.append(f"E[{stats.attribute_names[j]}] - pi")
        else:
            k, r = divmod(int(j - m), c)
            out.append(f"E[({stats.attribute_names[k]} - pi) * {stats.label_names[r]}]")
    return out


def _guard_streaming(s, y, u, problem: M4Problem, duals: M4Duals, q: np.ndarray, before: M4Statistics,
                     after: M4Statistics, info: dict, names: tuple, tolerance: float, batch_size: int):
    """Never return a streaming q worse than uniform keeping (q = eta) on a constraint the data
    already met, nor a non-finite one, nor one whose penalised objective is worse than q = eta's.

    The streaming solver is approximate; where its duals sit at the enforcement bound (a
    constraint that cannot be met, eps = 0 ...) q is very sensitive to them and it can break
    a constraint the data met (seen: +0.0002 -> +0.0483 at eps_r = eps_a = 0). Then:
    1. re-solve with the exact solver (where N * (m + c) <= EXACT_FALLBACK_LIMIT), with the
       constraints the data met made hard at eps + tolerance, so they cannot be traded for the
       others;
    2. if a met constraint is still broken (no exact solve, or it did not converge), move q
       toward eta along q_t = eta + t (q - eta), t in [0, 1]: mean(q_t) = eta and every E_q_t
       is linear in t, so the largest t that keeps each met constraint met is exact, and t = 0
       (uniform keeping) always qualifies.
    `info["guard"]` records what ran; a warning names the constraints.
    """
    eta = problem.eta
    met = _excess(before, problem) <= tolerance
    finite = bool(np.isfinite(q).all())
    broken = met & ~(_excess(after, problem) <= tolerance)
    uniform = m4_objective(np.full(len(q), eta), problem, u, before)[1]
    penalized = m4_objective(q, problem, u, after)[1] if finite else np.inf
    worse = not penalized <= uniform + 1e-12 * max(1.0, abs(uniform))
    if finite and not broken.any() and not worse:
        return duals, q, after, info
    if not finite:
        why = "non-finite keep probabilities"
    elif broken.any():
        why = f"it broke constraint(s) the data already met: {', '.join(_constraint_names(before, broken)[:5])}"
    else:
        why = f"its penalised objective {penalized:.6g} is worse than uniform keeping's {uniform:.6g}"
    guard: dict = {"reason": why, "steps": []}
    n, m, c = len(s), problem.num_attributes, problem.num_labels

    def statistics(weights):
        return m4_statistics(s, y, weights, problem.pi, eps_r=problem.eps_r, eps_a=problem.eps_a,
                             attribute_names=names[0], label_names=names[1], tolerance=tolerance,
                             batch_size=batch_size)

    if n * (m + c) <= EXACT_FALLBACK_LIMIT:
        from pipeline.balance.m4.exact import solve_exact

        bounds = np.concatenate([problem.eps_r, problem.eps_a.ravel()]) + tolerance
        exact_duals, exact_info = solve_exact(s, y, u, problem, hard_bounds=np.where(met, bounds, np.nan))
        exact_q = np.empty(n, dtype=np.float64)
        in_order = ((s[i:i + batch_size], y[i:i + batch_size]) if u is None else
                    (s[i:i + batch_size], y[i:i + batch_size], u[i:i + batch_size])
                    for i in range(0, n, batch_size))
        write_keep_probabilities(in_order, exact_duals, exact_q)
        if np.isfinite(exact_q).all():
            duals, q, after = exact_duals, exact_q, statistics(exact_q)
            guard["steps"].append("exact re-solve with met constraints hard")
            guard["exact"] = exact_info
    if not np.isfinite(q).all():
        q = np.full(n, eta)
        after = statistics(q)
        guard["steps"].append("uniform keep (q = eta)")
    broken = met & ~(_excess(after, problem) <= tolerance)
    if broken.any():
        b = np.concatenate([before.representation, before.association.ravel()])
        a = np.concatenate([after.representation, after.association.ravel()])
        limit = np.concatenate([problem.eps_r, problem.eps_a.ravel()]) + tolerance
        t = 1.0
        for j in np.flatnonzero(broken):  # |(1 - t) b + t a| <= limit, |b| <= limit at t = 0
            edge = limit[j] if a[j] > b[j] else -limit[j]
            t = min(t, max(0.0, (edge - b[j]) / (a[j] - b[j])))
        t *= 1 - 1e-9
        q = eta + t * (q - eta)
        after = statistics(q)
        guard["steps"].append(f"moved toward uniform keeping (t = {t:.4g})")
        guard["t"] = t
    log.warning("M4 streaming solver: %s; %s", why, "; then ".join(guard["steps"]))
    return duals, q, after, {**info, "guard": guard}


def m4_subsample(q, seed: int) -> np.ndarray:
    """Sorted int64 indices of a seeded Bernoulli(q_i) subsample (the paper's mode).

    A pure function of (q, seed): the same call returns the same indices on every rank.
    """
    q = np.asarray(q, dtype=np.float64)
    if q.ndim != 1:
        raise ValueError(f"q must be 1-D (N,), got shape {q.shape}")
    if not np.isfinite(q).all() or (q < 0).any() or (q > 1).any():
        raise ValueError("keep probabilities q must be in [0, 1]")
    draws = np.random.default_rng(np.random.SeedSequence([int(seed), 0x4D34])).random(len(q))
    return np.flatnonzero(draws < q)


def solve_sources(sources: Mapping[str, tuple], **kwargs) -> tuple[dict[str, np.ndarray], M4Result]:
    """Solve M4 jointly over several sources; returns ({source: q slice}, pooled result).

    Args:
        sources: {name: (attributes (n_i, m), labels (n_i, c)[, utility (n_i,)])}, all with the
            same m and c columns in the same order.
        kwargs: passed to `m4_keep_probabilities`.
    """
    if not sources:
        raise ValueError("solve_sources needs at least one source")
    names = list(sources)
    parts = [tuple(sources[name]) for name in names]
    for name, part in zip(names, parts, strict=True):
        if len(part) not in (2, 3):
            raise ValueError(f"source {name!r}: expected (attributes, labels[, utility])")
    with_utility = {len(part) == 3 for part in parts}
    if len(with_utility) > 1:
        raise ValueError("either every source or none gives a utility column")
    try:
        s = np.concatenate([np.asarray(p[0]).reshape(len(p[0]), -1) for p in parts])
        y = np.concatenate([np.asarray(p[1]) for p in parts])
    except ValueError as error:
        raise ValueError(f"sources {names} disagree on attribute/label columns: {error}") from None
    u = np.concatenate([np.asarray(p[2], dtype=np.float64) for p in parts]) if True in with_utility else None
    result = m4_keep_probabilities(s, y, utility=u, **kwargs)
    bounds = np.cumsum([0] + [len(p[0]) for p in parts])
    keep = {name: result.q[bounds[i]:bounds[i + 1]] for i, name in enumerate(names)}
    return keep, result


def examples_from_columns(table, attribute_columns: Sequence[str], label_columns: Sequence[str],
                          utility_column: str | None = None):
    """(attributes (N, m), labels (N, c), utility or None) from named columns of a table.

    `table` is anything indexable by column name with a column list (`datasets.Dataset`,
    pandas DataFrame, dict of arrays). A missing column raises ValueError naming it.
    """
    available = list(getattr(table, "column_names", None) or list(table.keys()))
    for kind, columns in (("attribute", attribute_columns), ("label", label_columns),
                          ("utility", [utility_column] if utility_column else [])):
        missing = [col for col in columns if col not in available]
        if missing:
            raise ValueError(f"missing {kind} column(s) {missing}; the table has {available}")
    if not attribute_columns:
        raise ValueError("attribute_columns is empty: M4 needs at least one sensitive attribute")
    n = len(table[attribute_columns[0]])
    attributes = np.stack([np.asarray(table[col]) for col in attribute_columns], axis=1)
    labels = (np.stack([np.asarray(table[col]) for col in label_columns], axis=1)
              if label_columns else np.zeros((n, 0), dtype=bool))
    utility = None if utility_column is None else np.asarray(table[utility_column], dtype=np.float64)
    for key, values, names in (("attribute", attributes, attribute_columns), ("label", labels, label_columns)):
        try:
            _binary_matrix(values, key + "s")
        except ValueError as error:
            column = int(str(error).split("column ")[1].split()[0])
            raise ValueError(f"{key} column {names[column]!r}: {error}") from None
    return attributes, labels, utility


# ----------------------------------------------------------------------------- the stage


def save_keep_probabilities(path: str | os.PathLike, keep: Mapping[str, np.ndarray]) -> None:
    """Write {source: q} to an .npz file atomically (for `M4(keep=path)` in a config)."""
    arrays = {name: np.asarray(q, dtype=np.float64) for name, q in keep.items()}
    atomic_write(path, lambda stream: np.savez(stream, **arrays), binary=True, suffix=".npz")


def load_keep_probabilities(path: str | os.PathLike) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"M4 keep-probability file {str(path)!r} does not exist")
    with np.load(path) as data:
        return {name: data[name] for name in data.files}


class M4(MixingStage):
    """Mixing stage applying M4 keep probabilities per example (module doc for the contract).

    Args:
        keep: {source: (num_documents,) q in [0, 1]}, or a path to an .npz written by
            `save_keep_probabilities`.
        mode: "subsample" (seeded Bernoulli draw; plan.example_keep) or "weights"
            (plan.example_weights = q / pooled mean q).
        seed: seed of the subsample draw (per source: seeded by (seed, crc32(name))).
        reweight_sources: in subsample mode, scale each source's sampling probability by its
            kept fraction (default True; False keeps the left stage's probabilities).
    """

    def __init__(self, keep: Mapping[str, np.ndarray] | str | os.PathLike, mode: str = "subsample",
                 seed: int = 0, reweight_sources: bool = True):
        if mode not in MODES:
            raise ValueError(f"M4 mode must be one of {MODES}, got {mode!r}")
        raw = load_keep_probabilities(keep) if isinstance(keep, str | os.PathLike) else dict(keep)
        if not raw:
            raise ValueError("M4 stage needs keep probabilities for at least one source")
        self.keep: dict[str, np.ndarray] = {}
        for name, q in raw.items():
            q = np.asarray(q, dtype=np.float64)
            if q.ndim != 1 or len(q) == 0:
                raise ValueError(f"M4 keep probabilities for source {name!r} must be 1-D and non-empty, got shape {q.shape}")
            if not np.isfinite(q).all() or (q < 0).any() or (q > 1).any():
                raise ValueError(f"M4 keep probabilities for source {name!r} must be in [0, 1]")
            self.keep[name] = q
        self.mode = mode
        self.seed = int(seed)
        self.reweight_sources = bool(reweight_sources)
        self.masks = {name: self._mask(name, q) for name, q in self.keep.items()} if mode == "subsample" else {}
        pooled = np.concatenate(list(self.keep.values()))
        self.pooled_keep_rate = float(pooled.mean())
        if mode == "weights" and self.pooled_keep_rate == 0:
            raise ValueError("M4 keep probabilities are all zero: nothing to weight")

    def _mask(self, name: str, q: np.ndarray) -> np.ndarray:
        mask = np.zeros(len(q), dtype=bool)
        mask[m4_subsample(q, (self.seed << 32) ^ zlib.crc32(name.encode()))] = True
        if not mask.any():
            raise ValueError(f"M4 subsample of source {name!r} keeps no example (seed {self.seed})")
        return mask

    def kept_fraction(self, source: str) -> float:
        """Fraction of the source's examples kept (drawn mask in subsample mode, mean q otherwise)."""
        if source not in self.keep:
            return 1.0
        return float(self.masks[source].mean()) if self.mode == "subsample" else float(self.keep[source].mean())

    def apply(self, sizes: Mapping[str, float], progress: float, previous: MixturePlan | None) -> MixturePlan:
        names, array = validate_sizes(sizes)
        unknown = sorted(set(self.keep) - set(names))
        if unknown:
            raise ValueError(f"M4 has keep probabilities for unknown source(s) {unknown}; sources are {list(names)}")
        if previous is None:
            probs, weights = array / array.sum(), np.ones(len(names))
        else:
            probs, weights = previous.sample_probs, previous.loss_weights
        if self.mode == "weights":
            example_weights = {name: q / self.pooled_keep_rate for name, q in self.keep.items()}
            return MixturePlan(names, probs, weights, example_weights=example_weights)
        if self.reweight_sources:
            probs = probs * np.array([self.kept_fraction(name) for name in names])
            probs = probs / probs.sum()
        return MixturePlan(names, probs, weights, example_keep=dict(self.masks))

    def __repr__(self) -> str:
        return (f"M4(sources={sorted(self.keep)}, mode={self.mode!r}, seed={self.seed}, "
                f"reweight_sources={self.reweight_sources})")
