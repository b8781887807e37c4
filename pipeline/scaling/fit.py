"""Robust multi-start fitting: Huber loss on log residuals, L-BFGS-B from every grid point.

Objective (Hoffmann et al. 2022, Approach 3; Besiroglu et al. 2024)::

    f(theta) = sum_i huber_delta( log L_hat(theta, X_i) - log y_i )

with ``huber_delta(r) = r^2 / 2`` for ``|r| <= delta`` and ``delta (|r| - delta / 2)``
otherwise, ``delta = 1e-3`` by default. ``delta -> inf`` is least squares on log residuals.
The gradient is closed-form (``J^T huber'(r)``, J from the law's log-sum-exp form), so each
L-BFGS-B iteration costs one vectorised pass over the data.

The optimiser sees ``f / (n * delta_s)`` with ``delta_s = min(delta, 1)``: the same minimiser,
but of order |r| rather than 1e-5, so L-BFGS-B's relative tolerances mean something. Reported
objectives are always the unscaled ``f``.

Every start of ``law.init_grid`` is run to convergence; the best is kept. Two engines:

* ``method="batched"`` (default): all starts advance together in a vectorised projected
  L-BFGS (``pipeline.scaling.lbfgs``), chunked over processes when ``n_jobs > 1``; then the
  few best distinct end points are polished with scipy's L-BFGS-B and the best is kept.
* ``method="scipy"``: one ``scipy.optimize.minimize(method="L-BFGS-B")`` call per start
  (the reference; ~10x slower on a 4^5 grid).

The result does not depend on ``n_jobs``.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

from pipeline.scaling.laws import ScalingLaw
from pipeline.scaling.lbfgs import batched_lbfgs

__all__ = ["FitResult", "fit_law", "huber", "objective", "resolve_jobs"]

log = logging.getLogger(__name__)

DEFAULT_DELTA = 1e-3


def huber(r: np.ndarray, delta: float) -> np.ndarray:
    """Elementwise Huber loss of residuals ``r``."""
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _huber_grad(r: np.ndarray, delta: float) -> np.ndarray:
    return np.clip(r, -delta, delta)


def objective(
    law: ScalingLaw, theta: np.ndarray, X: np.ndarray, y: np.ndarray, delta: float = DEFAULT_DELTA
) -> float:
    """Unscaled objective ``sum huber_delta(log L_hat - log y)`` at internal ``theta``."""
    r = law.log_predict(np.asarray(theta, dtype=float), X) - np.log(y)
    return float(np.sum(huber(r, delta)))


def _scaled_fun_and_grad(theta, law, X, logy, delta, scale):
    lp, jac = law.log_predict_and_jac(theta, X)
    r = lp - logy
    f = float(np.sum(huber(r, delta))) * scale
    g = (jac.T @ _huber_grad(r, delta)) * scale
    if not np.isfinite(f):
        return 1e30, np.zeros_like(theta)
    return f, g


@dataclass
class _StartOut:
    theta: np.ndarray
    fun: float  # unscaled objective
    success: bool
    nit: int


def _run_starts(law, X, y, delta, starts, maxiter, ftol, gtol) -> list[_StartOut]:
    logy = np.log(y)
    scale = 1.0 / (len(y) * min(delta, 1.0))
    bounds = law.bounds()
    out = []
    for x0 in starts:
        lo = np.array([b[0] if b[0] is not None else -np.inf for b in bounds])
        hi = np.array([b[1] if b[1] is not None else np.inf for b in bounds])
        x0 = np.clip(np.asarray(x0, dtype=float), lo, hi)
        res = minimize(
            _scaled_fun_and_grad,
            x0,
            args=(law, X, logy, delta, scale),
            jac=True,
            method="L-BFGS-B",
            bounds=bounds,
            options={"maxiter": maxiter, "ftol": ftol, "gtol": gtol},
        )
        out.append(
            _StartOut(
                np.asarray(res.x, dtype=float),
                float(res.fun) / scale,
                bool(res.success),
                int(res.nit),
            )
        )
    return out


def _box(law):
    bounds = law.bounds()
    lo = np.array([b[0] if b[0] is not None else -np.inf for b in bounds], dtype=float)
    hi = np.array([b[1] if b[1] is not None else np.inf for b in bounds], dtype=float)
    return lo, hi


def _batched_starts(law, X, y, delta, starts, weights, maxiter, ftol, gtol):
    """Batched L-BFGS on ``starts (B, p)``; ``weights (B, n)`` row multiplicities or None.

    Returns ``(x (B, p), unscaled objective (B,), converged (B,))``.
    """
    logy = np.log(y)
    scale = 1.0 / (len(y) * min(delta, 1.0))

    def fun_grad(th, ids):
        lp, jac = law.log_predict_and_jac_batch(th, X)
        r = lp - logy[None, :]
        h = huber(r, delta)
        hg = _huber_grad(r, delta)
        if weights is not None:
            w = weights[ids]
            h = h * w
            hg = hg * w
        f = scale * h.sum(axis=1)
        g = scale * np.einsum("bn,bnp->bp", hg, jac)
        return f, g

    lo, hi = _box(law)
    res = batched_lbfgs(fun_grad, starts, lo, hi, maxiter=maxiter, ftol=ftol, gtol=gtol)
    return res.x, res.fun / scale, res.converged


def _batched_chunk(law, X, y, delta, starts, maxiter, ftol, gtol):
    x, fun, conv = _batched_starts(law, X, y, delta, starts, None, maxiter, ftol, gtol)
    return [_StartOut(x[i], float(fun[i]), bool(conv[i]), 0) for i in range(len(x))]


def resolve_jobs(n_jobs: int | None) -> int:
    """``None`` or ``<= 0`` -> all usable cores."""
    if n_jobs is None or n_jobs <= 0:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover (not Linux)
            return max(1, os.cpu_count() or 1)
    return int(n_jobs)


def run_starts_parallel(
    law, X, y, delta, starts, *, n_jobs, maxiter, ftol, gtol, method="batched", min_per_job=64
):
    """Optimise from each row of ``starts``; chunks over processes when worthwhile."""
    starts = np.asarray(starts, dtype=float)
    worker = _batched_chunk if method == "batched" else _run_starts
    jobs = min(resolve_jobs(n_jobs), max(1, len(starts) // min_per_job))
    if jobs <= 1:
        return worker(law, X, y, delta, starts, maxiter, ftol, gtol)
    chunks = np.array_split(starts, jobs)
    with ProcessPoolExecutor(max_workers=jobs) as ex:
        futs = [ex.submit(worker, law, X, y, delta, c, maxiter, ftol, gtol) for c in chunks]
        return [o for f in futs for o in f.result()]


@dataclass
class FitResult:
    """Best of a multi-start fit.

    Attributes:
        law: the fitted law.
        theta: best internal parameters ``(num_params,)``.
        params: public parameters (dict, ``law.param_names`` order).
        objective: unscaled Huber objective at ``theta``.
        delta: Huber delta used.
        num_points: rows fitted.
        num_starts: L-BFGS-B runs.
        num_converged: runs whose L-BFGS-B reported success.
        start_objectives: objective reached from each start ``(num_starts,)``.
        top_thetas: the distinct best end points (best first), warm starts for the bootstrap.
        seconds: wall time of the fit.
    """

    law: ScalingLaw
    theta: np.ndarray
    params: dict[str, float]
    objective: float
    delta: float
    num_points: int
    num_starts: int
    num_converged: int
    start_objectives: np.ndarray = field(repr=False)
    top_thetas: np.ndarray = field(repr=False)
    seconds: float = 0.0

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.law.predict(self.theta, np.asarray(X, dtype=float))

    def at_bounds(self, rtol: float = 1e-6) -> dict[str, str]:
        """Internal parameters that ended on a box bound: ``{theta_name: "lower" | "upper"}``.

        A parameter on its bound was not determined by the data (e.g. the offset ``E`` of a
        power law fitted to points that never bend); its estimate is the bound, not a measurement.
        """
        out = {}
        for name, value, (lo, hi) in zip(
            self.law.theta_names, self.theta, self.law.bounds(), strict=True
        ):
            for side, bound in (("lower", lo), ("upper", hi)):
                if bound is not None and abs(value - bound) <= rtol * max(1.0, abs(bound)):
                    out[name] = side
        return out

    def to_dict(self) -> dict:
        return {
            "law": self.law.spec(),
            "params": self.params,
            "theta": dict(zip(self.law.theta_names, map(float, self.theta), strict=True)),
            "at_bounds": self.at_bounds(),
            "objective": self.objective,
            "delta": self.delta,
            "num_points": self.num_points,
            "num_starts": self.num_starts,
            "num_converged": self.num_converged,
            "seconds": self.seconds,
        }


def _distinct_top(outs: list[_StartOut], k: int) -> np.ndarray:
    order = sorted(range(len(outs)), key=lambda i: outs[i].fun)
    picked: list[np.ndarray] = []
    for i in order:
        th = outs[i].theta
        if all(np.max(np.abs(th - p)) > 1e-3 for p in picked):
            picked.append(th)
        if len(picked) >= k:
            break
    return np.array(picked)


def fit_law(
    law: ScalingLaw,
    X: np.ndarray,
    y: np.ndarray,
    *,
    delta: float = DEFAULT_DELTA,
    grid_size: int = 4,
    starts: np.ndarray | None = None,
    n_jobs: int | None = 1,
    method: str = "batched",
    polish: int = 3,
    maxiter: int = 1000,
    ftol: float = 1e-12,
    gtol: float = 1e-9,
) -> FitResult:
    """Fit ``law`` to ``(X, y)`` by L-BFGS-B from every start; keep the best.

    Args:
        law: a ``ScalingLaw``.
        X: inputs ``(n, len(law.input_names))``.
        y: observed losses ``(n,)``, > 0.
        delta: Huber delta on log residuals (1e-3 as in Chinchilla's Approach 3; a huge
            value gives least squares).
        grid_size: values per grid axis for ``law.init_grid`` (ignored if ``starts``).
        starts: explicit internal start points ``(k, num_params)``.
        n_jobs: processes for the starts (``None`` = all cores; 1 = in process).
        method: ``"batched"`` (vectorised L-BFGS over all starts, then scipy L-BFGS-B
            polishing of the ``polish`` best distinct end points) or ``"scipy"`` (one
            L-BFGS-B call per start).
        polish: end points polished with scipy in the batched method.
        maxiter, ftol, gtol: L-BFGS-B options (on the scaled objective).

    Raises:
        ValueError: bad inputs (non-positive or non-finite values, too few points) or bad delta.
    """
    if not (delta > 0 and np.isfinite(delta)):
        raise ValueError(f"huber delta must be a finite number > 0, got {delta!r}")
    X, y = law.check_inputs(X, y)
    t0 = time.perf_counter()
    if starts is None:
        starts = law.init_grid(grid_size, X, y)
    starts = np.atleast_2d(np.asarray(starts, dtype=float))
    if starts.shape[1] != law.num_params:
        raise ValueError(
            f"starts must have {law.num_params} columns ({law.theta_names}), got {starts.shape[1]}"
        )
    if method not in ("batched", "scipy"):
        raise ValueError(f"method must be 'batched' or 'scipy', got {method!r}")
    outs = run_starts_parallel(
        law,
        X,
        y,
        delta,
        starts,
        n_jobs=n_jobs,
        maxiter=maxiter,
        ftol=ftol,
        gtol=gtol,
        method=method,
    )
    objs = np.array([o.fun for o in outs])
    cands = outs
    if method == "batched" and polish > 0:
        polished = _run_starts(law, X, y, delta, _distinct_top(outs, polish), maxiter, ftol, gtol)
        cands = outs + polished
    theta = min(cands, key=lambda o: o.fun if np.isfinite(o.fun) else np.inf).theta
    res = FitResult(
        law=law,
        theta=theta,
        params=law.to_public(theta),
        objective=objective(law, theta, X, y, delta),
        delta=float(delta),
        num_points=len(y),
        num_starts=len(outs),
        num_converged=sum(o.success for o in outs),
        start_objectives=objs,
        top_thetas=_distinct_top(cands, 8),
        seconds=time.perf_counter() - t0,
    )
    log.info(
        "fitted %s law on %d points: objective %.6g, %d/%d starts converged, %.2fs",
        law.name,
        res.num_points,
        res.objective,
        res.num_converged,
        res.num_starts,
        res.seconds,
    )
    return res


def undetermined_parameters(fit: FitResult, X: np.ndarray, y: np.ndarray | None = None, boot=None,
                            rtol: float = 1e-6) -> dict[str, str]:
    """Public parameters the data do not determine: ``{name: reason}`` (empty when all are).

    * Degenerate design: the Jacobian of log L over the rows (columns scaled to unit norm) is
      rank-deficient, e.g. every x identical, or fewer distinct rows than parameters; a
      parameter with weight in its null space can move without changing any prediction.
    * With a bootstrap (``BootstrapResult``): an interval of zero width while the fit does not
      interpolate the data (resamples cannot have moved it), a non-finite end, or more than the
      interval's tail share of replicates on a box bound (the interval reaches the bound).
    """
    X = np.asarray(X, dtype=float)
    law = fit.law
    names = law.param_names
    out: dict[str, str] = {}
    _, jac = law.log_predict_and_jac(fit.theta, X)
    jac = np.asarray(jac, dtype=float)
    norms = np.linalg.norm(jac, axis=0)
    for i in np.flatnonzero(~(norms > 0)):
        out[names[i]] = "not determined: the predictions do not depend on it at these points"
    scaled = jac / np.where(norms > 0, norms, 1.0)
    _, sing, vt = np.linalg.svd(scaled, full_matrices=True)
    rank = int(np.sum(sing > rtol * (sing.max() if sing.size else 0.0)))
    null = vt[rank:]  # (p - rank, p)
    if len(null):
        distinct = len(np.unique(X, axis=0)) if X.ndim == 2 else len(np.unique(X))
        for i in np.flatnonzero(np.sum(null**2, axis=0) > 1e-3):
            out.setdefault(names[i], f"not determined: degenerate design ({distinct} distinct input "
                                     f"point(s) for {law.num_params} parameters; Jacobian rank {rank})")
    if boot is not None:
        tail = (1 - boot.level) / 2
        bounds = law.bounds()
        interpolates = fit.objective <= 1e-12 * max(1.0, fit.num_points)
        for i, name in enumerate(names):
            lo, hi = boot.ci[name]
            estimate = fit.params[name]
            if not (np.isfinite(lo) and np.isfinite(hi)):
                out.setdefault(name, "not determined: unbounded bootstrap interval")
            elif hi - lo <= 1e-12 * max(1.0, abs(estimate)) and not interpolates:
                out.setdefault(name, "not determined: zero-width bootstrap interval (every resample gave the same "
                                     "value although the fit leaves residuals)")
            else:
                b_lo, b_hi = bounds[i]
                column = boot.thetas[:, i]
                on_bound = np.zeros(len(column), dtype=bool)
                for bound in (b_lo, b_hi):
                    if bound is not None:
                        on_bound |= np.abs(column - bound) <= 1e-6 * max(1.0, abs(bound))
                if on_bound.mean() > tail:
                    out.setdefault(name, f"not determined: {on_bound.mean():.0%} of bootstrap fits end on its "
                                         "bound (the interval reaches the bound)")
    return {name: out[name] for name in names if name in out}
