"""Held-out error of a law: leave-out (e.g. the largest-compute runs) and k-fold.

Errors are on log losses, the scale the fit works in: ``rmse_log`` and ``mae_log`` of
``log L_hat - log L``, plus the mean absolute percentage error ``mape`` of L and Spearman's
rank correlation between predicted and observed losses (what matters when a fit is used to
rank mixtures or model sizes before training them).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr

from pipeline.scaling.fit import FitResult, fit_law
from pipeline.scaling.laws import ScalingLaw

__all__ = ["errors", "kfold_error", "leave_out_error"]


def errors(pred: np.ndarray, obs: np.ndarray) -> dict[str, float]:
    """Error summary of predicted vs observed losses (both ``(n,)``, > 0)."""
    pred, obs = np.asarray(pred, dtype=float), np.asarray(obs, dtype=float)
    r = np.log(pred) - np.log(obs)
    out = {
        "num_points": int(len(obs)),
        "rmse_log": float(np.sqrt(np.mean(r**2))),
        "mae_log": float(np.mean(np.abs(r))),
        "mape": float(np.mean(np.abs(pred / obs - 1))),
    }
    out["spearman"] = float(spearmanr(pred, obs).statistic) if len(obs) > 2 else float("nan")
    return out


def leave_out_error(
    law: ScalingLaw, X: np.ndarray, y: np.ndarray, test_mask: np.ndarray, **fit_kwargs
) -> tuple[dict[str, float], FitResult]:
    """Fit on the rows where ``test_mask`` is False, report errors on the rows where it is True.

    Typical use: ``test_mask = C >= np.quantile(C, 0.9)``: does the law extrapolate in compute?

    Returns:
        ``(errors on the held-out rows, fit on the rest)``.
    """
    X, y = law.check_inputs(X, y)
    test_mask = np.asarray(test_mask, dtype=bool)
    if test_mask.shape != y.shape:
        raise ValueError(f"test_mask has shape {test_mask.shape}, expected {y.shape}")
    if not test_mask.any() or test_mask.all():
        raise ValueError("test_mask must hold out some rows and keep some for fitting")
    fit = fit_law(law, X[~test_mask], y[~test_mask], **fit_kwargs)
    return errors(fit.predict(X[test_mask]), y[test_mask]), fit


def kfold_error(
    law: ScalingLaw, X: np.ndarray, y: np.ndarray, *, k: int = 5, seed: int = 0, **fit_kwargs
) -> dict[str, float]:
    """k-fold cross-validated errors (folds from a seeded permutation); out-of-fold predictions."""
    X, y = law.check_inputs(X, y)
    if not 2 <= k <= len(y):
        raise ValueError(f"k must be in [2, {len(y)}], got {k}")
    perm = np.random.default_rng(seed).permutation(len(y))
    pred = np.empty_like(y)
    for fold in np.array_split(perm, k):
        mask = np.zeros(len(y), dtype=bool)
        mask[fold] = True
        fit = fit_law(law, X[~mask], y[~mask], **fit_kwargs)
        pred[mask] = fit.predict(X[mask])
    out = errors(pred, y)
    out["k"] = k
    return out
