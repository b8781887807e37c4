"""Streaming M4 solver: proximal Newton ascent on the dual, memory O(m * c) independent of N.

The problem, the closed form (Q) and the dual it ascends are in the module doc of
`pipeline/balance/m4/problem.py`.

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
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import numpy as np

from pipeline.balance.m4.problem import M4Duals, M4Problem
from pipeline.balance.m4.statistics import M4StatisticsAccumulator
from pipeline.balance.m4.validation import validate_examples

TRUST_RADIUS = 1.0  # largest RMS change of z = eta - q (before the clip) per minibatch step
# Step sizes along each full-data Newton direction, all evaluated in one pass (one stacked
# product per minibatch), so a pass never goes to waste on a step that overshoots.
STEP_GRID = (1.5, 1.0, 0.7, 0.45, 0.25, 0.1)

# A minibatch: (attributes (B, m), labels (B, c)) or (attributes, labels, utility (B,)).
Batch = tuple[np.ndarray, ...]


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
