"""Mixture -> per-target loss regressions for a mixture search, compared on held-out proxies.

Three models, each fitted per target (a source or a group of sources) on proxies' mixtures
``R (K, M)`` (rows on the simplex) and losses ``Y (K, T)``:

- ``mixing_law``: the data mixing law ``L(r) = c + exp(t . r)`` (Ye et al. 2024;
  `pipeline.scaling.laws.MixingLaw`, robust multi-start fit), 1 + M parameters;
- ``linear``: RegMix's linear regression ``L(r) = w . r`` (Liu et al. 2024; no intercept:
  on the simplex an intercept is ``w + b``), M parameters, ridge-regularised;
- ``log_linear``: ``log L(r) = w . r``, M parameters.

`compare_models` fits each on the training proxies and scores its predictions on the held-out
ones (log errors, MAPE, Spearman's rank correlation of predicted vs observed, pooled over
targets and on the objective); `fit_model` refits the chosen one on every proxy and returns
``r -> (T,)`` for `pipeline.scaling.mixture.optimise_mixture`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.scaling.fit import fit_law
from pipeline.scaling.laws import MixingLaw
from pipeline.scaling.mixture import mixing_loss_fn
from pipeline.scaling.validation import errors

__all__ = ["MODELS", "LinearMixtureModel", "compare_models", "cross_validate", "fit_linear", "fit_model",
           "held_out_split", "with_max_increase"]

MODELS = ("mixing_law", "linear", "log_linear")


@dataclass
class LinearMixtureModel:
    """``L(r) = W r`` (or ``exp(W r)`` when `log`); ``W`` is ``(T, M)``."""

    W: np.ndarray
    log: bool

    def predict(self, R: np.ndarray) -> np.ndarray:
        """``R (n, M) -> (n, T)``."""
        Z = np.atleast_2d(np.asarray(R, dtype=float)) @ self.W.T
        return np.exp(Z) if self.log else Z


def _check(R: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    R, Y = np.asarray(R, dtype=float), np.asarray(Y, dtype=float)
    if Y.ndim == 1:
        Y = Y[:, None]
    if R.ndim != 2 or Y.ndim != 2 or R.shape[0] != Y.shape[0]:
        raise ValueError(f"mixtures R must be (K, M) and losses Y (K, T) with the same K, got {R.shape} and {Y.shape}")
    for name, array in (("mixture", R), ("loss", Y)):
        bad = ~np.isfinite(array)
        if bad.any():
            i, j = (int(v) for v in np.argwhere(bad)[0])
            raise ValueError(f"{name} [{i}, {j}] is not finite ({array[i, j]!r}); drop that proxy")
    if np.any(Y <= 0):
        i, j = (int(v) for v in np.argwhere(Y <= 0)[0])
        raise ValueError(f"loss [{i}, {j}] must be > 0, got {Y[i, j]!r}")
    return R, Y


def fit_linear(R: np.ndarray, Y: np.ndarray, *, log: bool = False, ridge: float = 1e-6) -> LinearMixtureModel:
    """Least squares of ``Y`` (or ``log Y``) on ``R`` without intercept, with a small ridge
    (relative to the mean of ``diag(R^T R)``) so that K close to M stays well posed."""
    R, Y = _check(R, Y)
    if R.shape[0] < R.shape[1]:
        raise ValueError(f"linear fit needs K >= M proxies, got K={R.shape[0]} for M={R.shape[1]} domains")
    Z = np.log(Y) if log else Y
    gram = R.T @ R
    lam = ridge * float(np.mean(np.diag(gram)) or 1.0)
    W = np.linalg.solve(gram + lam * np.eye(R.shape[1]), R.T @ Z).T
    return LinearMixtureModel(W=W, log=log)


def fit_model(kind: str, R: np.ndarray, Y: np.ndarray, domains: Sequence[str],
              grid_size: int = 4) -> Callable[[np.ndarray], np.ndarray]:
    """The fitted model ``kind`` (one of `MODELS`) as ``r (M,) -> predicted losses (T,)``."""
    R, Y = _check(R, Y)
    if kind == "mixing_law":
        law = MixingLaw(list(domains))
        if R.shape[0] <= law.num_params:
            raise ValueError(f"mixing law ({law.num_params} parameters) needs K >= {law.num_params + 1} "
                             f"proxies, got {R.shape[0]}")
        return mixing_loss_fn([fit_law(law, R, Y[:, t], grid_size=grid_size) for t in range(Y.shape[1])])
    if kind in ("linear", "log_linear"):
        model = fit_linear(R, Y, log=kind == "log_linear")
        return lambda r: model.predict(np.asarray(r, dtype=float)[None, :])[0]
    raise ValueError(f"unknown model {kind!r}; choose from {MODELS}")


def held_out_split(num_proxies: int, num_held_out: int, seed: int) -> np.ndarray:
    """Boolean mask of the held-out proxies: a seeded choice of `num_held_out` of them."""
    if not 0 < num_held_out < num_proxies:
        raise ValueError(f"held-out proxies must be between 1 and {num_proxies - 1}, got {num_held_out}")
    mask = np.zeros(num_proxies, dtype=bool)
    mask[np.random.default_rng(seed).choice(num_proxies, num_held_out, replace=False)] = True
    return mask


def compare_models(R: np.ndarray, Y: np.ndarray, domains: Sequence[str], held_out: np.ndarray,
                   target_weights: Sequence[float] | None = None,
                   models: Sequence[str] = MODELS, grid_size: int = 4) -> dict[str, dict]:
    """Fit each model on the proxies outside `held_out`, score it on those inside.

    Returns:
        {model: {"pred": (H, T) predictions, "errors": pooled `errors` over all held-out
        (proxy, target) pairs, "objective_errors": `errors` of the weighted objective
        ``sum_t v_t L_t`` per held-out proxy}}; a model that cannot be fitted (too few
        proxies) has {"error": reason} instead.
    """
    R, Y = _check(R, Y)
    held_out = np.asarray(held_out, dtype=bool)
    v = np.ones(Y.shape[1]) if target_weights is None else np.asarray(target_weights, dtype=float)
    out = {}
    for kind in models:
        try:
            loss_fn = fit_model(kind, R[~held_out], Y[~held_out], domains, grid_size=grid_size)
        except ValueError as error:
            out[kind] = {"error": str(error)}
            continue
        pred = np.stack([np.asarray(loss_fn(r), dtype=float) for r in R[held_out]])
        obs = Y[held_out]
        if np.any(pred <= 0) or not np.all(np.isfinite(pred)):
            out[kind] = {"error": "non-positive or non-finite predictions on held-out proxies", "pred": pred}
            continue
        out[kind] = {"pred": pred, "errors": errors(pred.ravel(), obs.ravel()),
                     "objective_errors": errors(pred @ v, obs @ v)}
    return out


def cross_validate(R: np.ndarray, Y: np.ndarray, domains: Sequence[str], kind: str,
                   target_weights: Sequence[float] | None = None, grid_size: int = 4) -> dict:
    """Leave-one-out: each proxy predicted by the model fitted on the K - 1 others.

    Returns:
        {"pred": (K, T) out-of-sample predictions, "errors": pooled `errors`,
        "objective_errors": `errors` of ``sum_t v_t L_t``, "spearman": [per target, across
        proxies]}; {"error": reason} when the model cannot be fitted on K - 1 proxies.
    """
    R, Y = _check(R, Y)
    v = np.ones(Y.shape[1]) if target_weights is None else np.asarray(target_weights, dtype=float)
    pred = np.empty_like(Y)
    for k in range(len(R)):
        keep = np.arange(len(R)) != k
        try:
            loss_fn = fit_model(kind, R[keep], Y[keep], domains, grid_size=grid_size)
        except ValueError as error:
            return {"error": str(error)}
        pred[k] = np.asarray(loss_fn(R[k]), dtype=float)
    if np.any(pred <= 0) or not np.all(np.isfinite(pred)):
        return {"error": "non-positive or non-finite out-of-sample predictions", "pred": pred}
    return {"pred": pred, "errors": errors(pred.ravel(), Y.ravel()), "objective_errors": errors(pred @ v, Y @ v),
            "spearman": [errors(pred[:, t], Y[:, t])["spearman"] for t in range(Y.shape[1])]}


def with_max_increase(loss_fn: Callable[[np.ndarray], np.ndarray], reference: np.ndarray, slack: float,
                      penalty: float = 1e4) -> Callable[[np.ndarray], np.ndarray]:
    """``loss_fn`` with one more output, ``penalty * sum_t max(0, L_t(r) - reference_t - slack)^2``:
    give it weight 1 in `optimise_mixture` to ask that no target gets worse than its
    reference (e.g. the prediction at proportional sampling) by more than `slack`."""
    reference = np.asarray(reference, dtype=float)
    if not np.isfinite(slack) or slack < 0:
        raise ValueError(f"slack must be a finite number >= 0, got {slack!r}")

    def loss(r):
        values = np.asarray(loss_fn(r), dtype=float)
        excess = np.maximum(values - reference - slack, 0.0)
        return np.append(values, penalty * float(excess @ excess))

    return loss
