"""Compute-optimal allocation: the N and D that minimise L(N, D) subject to C = k N D.

Closed form for the Chinchilla law (Hoffmann et al. 2022, eq. 4), with ``k = 6`` FLOPs per
parameter per token by default::

    G = (alpha A / (beta B))^(1 / (alpha + beta))
    N_opt(C) = G (C / k)^(beta / (alpha + beta)),   D_opt(C) = (C / k) / N_opt(C)

``compute_optimal_numeric`` does the same for any ``loss(N, D)`` by a bounded 1-D search
over log N, so other laws (or a Chinchilla law with a different cost model) can be used.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.optimize import minimize_scalar

__all__ = ["chinchilla_optimal", "compute_optimal_numeric", "frontier"]


def _check_budget(C, k):
    C = np.asarray(C, dtype=float)
    if np.any(~np.isfinite(C)) or np.any(C <= 0):
        raise ValueError(f"compute budget C must be finite and > 0, got {C}")
    if not (k > 0 and np.isfinite(k)):
        raise ValueError(f"FLOPs per parameter-token k must be > 0, got {k}")
    return C


def chinchilla_optimal(
    params: dict[str, float], C, k: float = 6.0
) -> tuple[np.ndarray, np.ndarray]:
    """``(N_opt, D_opt)`` for budgets ``C`` (FLOPs; scalar or array) under ``C = k N D``."""
    C = _check_budget(C, k)
    A, B, alpha, beta = params["A"], params["B"], params["alpha"], params["beta"]
    if alpha <= 0 or beta <= 0:
        raise ValueError(f"closed form needs alpha, beta > 0, got alpha={alpha}, beta={beta}")
    G = (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))
    n_opt = G * (C / k) ** (beta / (alpha + beta))
    return n_opt, (C / k) / n_opt


def compute_optimal_numeric(
    loss: Callable[[np.ndarray, np.ndarray], np.ndarray],
    C: float,
    k: float = 6.0,
    n_bounds: tuple[float, float] = (1e3, 1e15),
) -> tuple[float, float, float]:
    """Minimise ``loss(N, C / (k N))`` over N in ``n_bounds`` (log-spaced search).

    Returns:
        ``(N_opt, D_opt, loss at the optimum)``.
    """
    C = float(_check_budget(C, k))

    def f(logn):
        n = np.exp(logn)
        return float(loss(np.array([n]), np.array([C / (k * n)]))[0])

    lo, hi = np.log(n_bounds[0]), np.log(n_bounds[1])
    grid = np.linspace(lo, hi, 64)
    vals = [f(g) for g in grid]
    i = int(np.argmin(vals))
    res = minimize_scalar(
        f,
        bounds=(grid[max(i - 1, 0)], grid[min(i + 1, 63)]),
        method="bounded",
        options={"xatol": 1e-10},
    )
    n = float(np.exp(res.x))
    return n, C / (k * n), float(res.fun)


def frontier(
    samples_params: list[dict[str, float]], C: np.ndarray, k: float = 6.0, level: float = 0.95
) -> dict:
    """Optimal N and D over budgets ``C`` with percentile bands over bootstrap parameter sets.

    Args:
        samples_params: public Chinchilla parameters, the first the point estimate and the
            rest bootstrap replicates (may be just the point estimate).
        C: budgets ``(m,)``.

    Returns:
        dict with ``C``, ``N_opt``, ``D_opt`` (point estimate) and, with replicates,
        ``N_lo``, ``N_hi``, ``D_lo``, ``D_hi``.
    """
    C = _check_budget(C, k)
    n0, d0 = chinchilla_optimal(samples_params[0], C, k)
    out = {"C": C, "N_opt": n0, "D_opt": d0}
    if len(samples_params) > 2:
        ns = np.array([chinchilla_optimal(p, C, k)[0] for p in samples_params[1:]])
        q = 100 * (1 - level) / 2
        n_lo, n_hi = np.percentile(ns, [q, 100 - q], axis=0)
        out.update(N_lo=n_lo, N_hi=n_hi, D_lo=(C / k) / n_hi, D_hi=(C / k) / n_lo)
    return out
