"""Exact M4 for small N: the full-data dual maximised by scipy's L-BFGS-B, with a certificate.

The dual of M4 (pipeline/balance/m4/problem.py) in x = [mu, lambda+ , lambda-] with
lambda = lambda+ - lambda-, 0 <= lambda+- <= C / eta (so eps * |lambda| becomes linear), is

    g(x) = mean_i phi(w_i) + eta^2 / 2 - mu * eta - eta * sum_j eps_j (lambda+_j + lambda-_j),
    w_i = eta + gamma u_i - z_i,   phi(w) = (clip(w, 0, 1) - w)^2 / 2 - w^2 / 2,

concave and continuously differentiable (d g / d z_i = q_i / N), so L-BFGS-B converges to
its maximum. The primal q of (Q) at the maximiser is the unique optimum (F is strictly convex
in q); `solve_exact` returns the duals and the duality gap P(q) - g(x) >= 0 as the
certificate that q is optimal to that accuracy. Every product runs on the whole (N, c)
label matrix in float64, so memory is O(N * (m + c)): use it where N * c fits comfortably.
"""

from __future__ import annotations

import time

import numpy as np
from scipy.optimize import minimize

from pipeline.balance.m4.problem import M4Duals, M4Problem


def solve_exact(attributes: np.ndarray, labels: np.ndarray, utility: np.ndarray | None,
                problem: M4Problem, *, tolerance: float = 1e-12,
                max_iterations: int = 20000, hard_bounds: np.ndarray | None = None) -> tuple[M4Duals, dict]:
    """Maximise the M4 dual on all N examples at once.

    Args:
        attributes: (N, m) 0/1; labels: (N, c) 0/1; utility: (N,) or None (validated by the
            caller, `m4_keep_probabilities(solver="exact")`).
        problem: the M4Problem.
        tolerance: L-BFGS-B's projected-gradient tolerance (mean(q a) units).
        hard_bounds: optional (m + m*c,) bounds in E_q units ([representation, association
            raveled]); where finite, that constraint is hard (|E_q[a_j]| <= bound, dual
            unbounded) instead of priced at the enforcement C; NaN keeps it soft. M4's guard
            uses it to keep constraints the data already met from being traded away.

    Returns:
        (duals, info) with info = {"iterations", "dual_value", "seconds", "converged", "message"}.
    """
    m, c = problem.num_attributes, problem.num_labels
    d = np.asarray(attributes, dtype=np.float64) - problem.pi  # (N, m)
    y = np.asarray(labels, dtype=np.float64)  # (N, c)
    n = len(d)
    eta = problem.eta
    t = np.full(n, eta) if utility is None else eta + problem.utility_weight * np.asarray(utility, np.float64)
    eps = np.concatenate([problem.eps_r, problem.eps_a.ravel()]) * eta  # (D,) mean(q a) units
    size = m + m * c
    hard = np.zeros(size, dtype=bool)
    if hard_bounds is not None:
        hard_bounds = np.asarray(hard_bounds, dtype=np.float64).reshape(size)
        hard = np.isfinite(hard_bounds)
        eps = np.where(hard, hard_bounds * eta, eps)

    def unpack(x: np.ndarray):
        lam = x[1:1 + size] - x[1 + size:]
        return x[0], lam[:m], lam[m:].reshape(m, c)

    def negative_dual(x: np.ndarray) -> tuple[float, np.ndarray]:
        mu, lam_r, lam_a = unpack(x)
        z = mu + np.einsum("nk,nk->n", d, y @ lam_a.T + lam_r)
        w = t - z
        q = np.clip(w, 0.0, 1.0)
        phi = 0.5 * (q - w) ** 2 - 0.5 * w * w
        lam_abs = x[1:1 + size] + x[1 + size:]
        value = phi.mean() + 0.5 * eta * eta - mu * eta - float(eps @ lam_abs)
        moments = np.concatenate([d.T @ q, ((d * q[:, None]).T @ y).ravel()]) / n  # mean(q a)
        grad = np.concatenate([[q.mean() - eta], moments - eps, -moments - eps])
        return -value, -grad

    bound = problem.dual_bound
    per_constraint = [(0.0, None) if h else (0.0, bound) for h in hard]
    bounds = [(None, None)] + per_constraint * 2
    start = time.perf_counter()
    solution = minimize(negative_dual, np.zeros(1 + 2 * size), jac=True, method="L-BFGS-B",
                        bounds=bounds, options={"maxiter": max_iterations, "maxfun": 4 * max_iterations,
                                                "ftol": 1e-16, "gtol": tolerance, "maxcor": 30})
    mu, lam_r, lam_a = unpack(solution.x)
    duals = M4Duals(problem, float(mu), lam_r.copy(), lam_a.copy())
    info = {"iterations": int(solution.nit), "dual_value": float(-solution.fun),
            "seconds": time.perf_counter() - start, "converged": bool(solution.success),
            "message": str(solution.message)}
    return duals, info
