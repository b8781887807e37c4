"""Mixture optimiser: pick training proportions r from fitted laws before training them.

Minimises ``sum_i v_i L_i(r)`` over the capped simplex ``{r : sum_j r_j = 1,
0 <= r_j <= cap_j}``, where ``L_i`` are predicted per-target losses (one data mixing law per
target domain, or a multilingual joint law at a fixed model size) and ``v_i`` the target
weights. Epoch caps (UniMax-style): a source with ``tokens_j`` unique tokens may be repeated
at most ``max_epochs_j`` times in a run of ``budget`` tokens, so
``cap_j = max_epochs_j * tokens_j / budget``. The problem is feasible iff ``sum_j cap_j >= 1``.

Method: SLSQP (equality constraint + bounds) from several starts (the uniform-within-caps
point and seeded Dirichlet draws projected onto the capped simplex); the best feasible end
point is returned with its constraint violation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

from pipeline.scaling.fit import FitResult

__all__ = [
    "MixtureResult",
    "epoch_caps",
    "mixing_loss_fn",
    "multilingual_loss_fn",
    "optimise_mixture",
    "project_capped_simplex",
]


def epoch_caps(
    tokens: Sequence[float], budget: float, max_epochs: float | Sequence[float]
) -> np.ndarray:
    """``cap_j = max_epochs_j * tokens_j / budget`` (all in tokens); capped at 1."""
    tokens = np.asarray(tokens, dtype=float)
    ep = np.broadcast_to(np.asarray(max_epochs, dtype=float), tokens.shape)
    if not budget > 0:
        raise ValueError(f"token budget must be > 0, got {budget}")
    for name, arr in (("tokens", tokens), ("max_epochs", ep)):
        bad = ~np.isfinite(arr) | (arr < 0)
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{name}[{j}] must be finite and >= 0, got {arr[j]!r}")
    return np.minimum(ep * tokens / budget, 1.0)


def project_capped_simplex(v: np.ndarray, caps: np.ndarray, iters: int = 100) -> np.ndarray:
    """Euclidean projection of ``v`` onto ``{r : sum r = 1, 0 <= r <= caps}`` (bisection)."""
    v = np.asarray(v, dtype=float)
    lo, hi = float(np.min(v - caps)) - 1.0, float(np.max(v)) + 1.0
    for _ in range(iters):
        tau = 0.5 * (lo + hi)
        if np.clip(v - tau, 0.0, caps).sum() > 1.0:
            lo = tau
        else:
            hi = tau
    return np.clip(v - 0.5 * (lo + hi), 0.0, caps)


@dataclass
class MixtureResult:
    """Optimised mixture.

    Attributes:
        r: proportions ``(M,)`` (sum 1, within caps up to ``violation``).
        objective: ``sum_i v_i L_i(r)``.
        losses: predicted per-target losses ``(T,)`` at ``r``.
        violation: max of ``|sum r - 1|``, ``max(r - cap)``, ``max(-r)`` (feasibility error).
        at_cap: indices of sources at their cap (within 1e-6).
        num_starts: SLSQP runs.
    """

    r: np.ndarray
    objective: float
    losses: np.ndarray
    violation: float
    at_cap: list[int]
    num_starts: int


def optimise_mixture(
    loss_fn: Callable[[np.ndarray], np.ndarray],
    num_domains: int,
    *,
    target_weights: Sequence[float] | None = None,
    caps: Sequence[float] | None = None,
    num_starts: int = 16,
    seed: int = 0,
) -> MixtureResult:
    """Minimise ``sum_i v_i loss_fn(r)_i`` over the capped simplex.

    Args:
        loss_fn: ``r (M,) -> predicted losses (T,)``.
        num_domains: M.
        target_weights: ``v (T,)``, >= 0 (default: all 1).
        caps: per-source upper bounds ``(M,)`` in [0, 1] (default: none), e.g. ``epoch_caps``.
        num_starts: SLSQP starts.
        seed: seeds the Dirichlet starts.

    Raises:
        ValueError: caps that cannot sum to 1 (infeasible), negative weights, bad shapes.
    """
    M = int(num_domains)
    caps = np.ones(M) if caps is None else np.asarray(caps, dtype=float)
    if caps.shape != (M,):
        raise ValueError(f"caps must have shape ({M},), got {caps.shape}")
    if np.any(~np.isfinite(caps)) or np.any(caps < 0):
        j = int(np.flatnonzero(~np.isfinite(caps) | (caps < 0))[0])
        raise ValueError(f"cap[{j}] must be finite and >= 0, got {caps[j]!r}")
    caps = np.minimum(caps, 1.0)
    if caps.sum() < 1.0 - 1e-12:
        raise ValueError(
            f"infeasible: epoch caps sum to {caps.sum():.6g} < 1, so no mixture reaches the token "
            f"budget without exceeding a cap; raise max_epochs or lower the budget by a factor "
            f"{caps.sum():.6g}"
        )
    T = len(np.atleast_1d(loss_fn(np.full(M, 1.0 / M))))
    v = np.ones(T) if target_weights is None else np.asarray(target_weights, dtype=float)
    if v.shape != (T,) or np.any(v < 0) or not np.all(np.isfinite(v)):
        raise ValueError(f"target_weights must be {T} finite values >= 0, got {v}")

    def f(r):
        return float(v @ np.asarray(loss_fn(r), dtype=float))

    rng = np.random.default_rng(seed)
    starts = [project_capped_simplex(np.full(M, 1.0 / M), caps)]
    starts += [
        project_capped_simplex(rng.dirichlet(np.ones(M)), caps)
        for _ in range(max(num_starts - 1, 0))
    ]
    cons = [{"type": "eq", "fun": lambda r: np.sum(r) - 1.0, "jac": lambda r: np.ones_like(r)}]
    bounds = list(zip(np.zeros(M), caps, strict=True))
    best = None
    for x0 in starts:
        res = minimize(
            f,
            x0,
            method="SLSQP",
            bounds=bounds,
            constraints=cons,
            options={"maxiter": 500, "ftol": 1e-12},
        )
        r = project_capped_simplex(np.asarray(res.x), caps)
        val = f(r)
        if best is None or val < best[1]:
            best = (r, val)
    r, val = best
    violation = float(max(abs(r.sum() - 1.0), np.max(r - caps), np.max(-r)))
    return MixtureResult(
        r=r,
        objective=val,
        losses=np.asarray(loss_fn(r), dtype=float),
        violation=violation,
        at_cap=[int(j) for j in np.flatnonzero(r >= caps - 1e-6)],
        num_starts=len(starts),
    )


def mixing_loss_fn(fits: Sequence[FitResult]) -> Callable[[np.ndarray], np.ndarray]:
    """``r -> [L_i(r) for each fitted MixingLaw]`` (all over the same training domains)."""
    fits = list(fits)
    if not fits:
        raise ValueError("need at least one fitted mixing law")
    doms = fits[0].law.domains
    for f in fits:
        if getattr(f.law, "domains", None) != doms:
            raise ValueError("all mixing laws must share the same training domains")
    thetas = np.stack([f.theta for f in fits])

    def loss(r):
        r = np.asarray(r, dtype=float)
        return np.exp(np.logaddexp(thetas[:, 1:] @ r, thetas[:, 0]))

    return loss


def multilingual_loss_fn(
    fit: FitResult, N: float, floor: float = 1e-9
) -> Callable[[np.ndarray], np.ndarray]:
    """``r -> [L_i(N, r_i) for each source]`` from a fitted ``MultilingualLaw`` at model size N.

    ``r_i`` is floored at ``floor`` (the law diverges at zero weight when gamma_i > 0).
    """
    law = fit.law
    S = len(law.sources)
    src = np.arange(S, dtype=float)

    def loss(r):
        w = np.maximum(np.asarray(r, dtype=float), floor)
        X = np.stack([np.full(S, float(N)), np.minimum(w, 1.0), src], axis=1)
        return law.predict(fit.theta, X)

    return loss
