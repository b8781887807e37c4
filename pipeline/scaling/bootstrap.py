"""Nonparametric bootstrap confidence intervals for a fitted law.

Each replicate resamples the rows with replacement and refits from the full fit's best
parameters plus a few other distinct end points of its multi-start (``extra_starts``),
keeping the best. A resample is represented by row multiplicities (a weighted objective on
the original rows, identical to fitting the resampled rows), so all replicates x starts of a
process advance together in the batched L-BFGS (``pipeline.scaling.lbfgs``). Replicate b
draws its rows from ``default_rng([seed, b])``, so the samples are the same whatever the
number of processes. Intervals are percentile intervals of the
public parameters (``A``, not ``log A``).

Percentile bootstrap intervals assume the rows are exchangeable. Runs of one sweep that share
a model size or a seed are not independent, so treat these intervals as a lower bound on the
real uncertainty (Besiroglu et al. 2024 make the same caveat for the Chinchilla fit).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from pipeline.scaling.fit import FitResult, _batched_starts, resolve_jobs

__all__ = ["BootstrapResult", "bootstrap"]

log = logging.getLogger(__name__)


@dataclass
class BootstrapResult:
    """Bootstrap replicates of a fit.

    Attributes:
        thetas: internal parameters per replicate ``(num_boot, num_params)``.
        samples: public parameters per replicate ``(num_boot, num_params)``, columns
            ``param_names``.
        param_names: column names of ``samples``.
        objectives: each replicate's objective on its own resample ``(num_boot,)``.
        level: confidence level of ``ci``.
        ci: ``{name: (lo, hi)}`` percentile intervals.
        seconds: wall time.
    """

    thetas: np.ndarray = field(repr=False)
    samples: np.ndarray = field(repr=False)
    param_names: tuple[str, ...]
    objectives: np.ndarray = field(repr=False)
    level: float
    ci: dict[str, tuple[float, float]]
    seconds: float = 0.0

    @property
    def num_boot(self) -> int:
        return len(self.samples)

    def interval(self, name: str, level: float | None = None) -> tuple[float, float]:
        level = self.level if level is None else level
        j = self.param_names.index(name)
        q = 100 * (1 - level) / 2
        lo, hi = np.percentile(self.samples[:, j], [q, 100 - q])
        return float(lo), float(hi)

    def to_dict(self) -> dict:
        return {
            "num_boot": self.num_boot,
            "level": self.level,
            "ci": {k: list(v) for k, v in self.ci.items()},
            "std": dict(zip(self.param_names, map(float, self.samples.std(axis=0)), strict=True)),
            "seconds": self.seconds,
        }


def resample_counts(n: int, seed: int, b: int) -> np.ndarray:
    """Row multiplicities ``(n,)`` of bootstrap replicate ``b``."""
    idx = np.random.default_rng([seed, int(b)]).integers(0, n, size=n)
    return np.bincount(idx, minlength=n).astype(float)


def _replicates(law, X, y, delta, starts, seed, ids, maxiter, ftol, gtol):
    n, k = len(y), len(starts)
    counts = np.stack([resample_counts(n, seed, b) for b in ids])  # (R, n)
    weights = np.repeat(counts, k, axis=0)  # (R * k, n), replicate-major
    x0 = np.tile(starts, (len(ids), 1))
    x, fun, _ = _batched_starts(law, X, y, delta, x0, weights, maxiter, ftol, gtol)
    fun = np.where(np.isfinite(fun), fun, np.inf).reshape(len(ids), k)
    best = np.argmin(fun, axis=1)
    rows = np.arange(len(ids)) * k + best
    return x[rows], fun[np.arange(len(ids)), best]


def bootstrap(
    fit: FitResult,
    X: np.ndarray,
    y: np.ndarray,
    *,
    num_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    extra_starts: int = 3,
    n_jobs: int | None = None,
    maxiter: int = 1000,
    ftol: float = 1e-12,
    gtol: float = 1e-9,
) -> BootstrapResult:
    """Bootstrap ``fit`` (made on ``X, y``) ``num_boot`` times; percentile intervals.

    Args:
        fit: the full-data fit (its law, delta, best and runner-up end points are used).
        X, y: the data the fit was made on.
        num_boot: replicates.
        seed: base seed; replicate b uses ``default_rng([seed, b])``.
        level: confidence level of the reported intervals.
        extra_starts: distinct runner-up end points of the full fit used as extra starts.
        n_jobs: processes (``None`` = all cores).

    Raises:
        ValueError: ``num_boot < 2`` or ``level`` outside (0, 1).
    """
    if num_boot < 2:
        raise ValueError(f"num_boot must be >= 2, got {num_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    law = fit.law
    X, y = law.check_inputs(X, y)
    starts = np.vstack([fit.theta[None, :], fit.top_thetas[1 : 1 + extra_starts]])
    t0 = time.perf_counter()
    ids = np.arange(num_boot)
    jobs = min(resolve_jobs(n_jobs), num_boot)
    args = (law, X, y, fit.delta, starts, seed)
    opts = (maxiter, ftol, gtol)
    if jobs <= 1:
        thetas, objs = _replicates(*args, ids, *opts)
    else:
        with ProcessPoolExecutor(max_workers=jobs) as ex:
            futs = [
                ex.submit(_replicates, *args, chunk, *opts) for chunk in np.array_split(ids, jobs)
            ]
            parts = [f.result() for f in futs]
        thetas = np.vstack([p[0] for p in parts])
        objs = np.concatenate([p[1] for p in parts])
    samples = np.array([[law.to_public(t)[k] for k in law.param_names] for t in thetas])
    q = 100 * (1 - level) / 2
    lo, hi = np.percentile(samples, [q, 100 - q], axis=0)
    ci = {k: (float(a), float(b)) for k, a, b in zip(law.param_names, lo, hi, strict=True)}
    res = BootstrapResult(
        thetas=thetas,
        samples=samples,
        param_names=tuple(law.param_names),
        objectives=objs,
        level=level,
        ci=ci,
        seconds=time.perf_counter() - t0,
    )
    log.info("bootstrap: %d replicates of %s in %.1fs", num_boot, law.name, res.seconds)
    return res
