"""PNG plots of a fit: data with fitted curves and bootstrap bands, residuals, the frontier.

Matplotlib with the Agg backend (no display). Bands are pointwise percentile bands of the
predictions of up to 200 bootstrap replicates.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.scaling.bootstrap import BootstrapResult  # noqa: E402
from pipeline.scaling.fit import FitResult  # noqa: E402
from pipeline.scaling.optimal import frontier  # noqa: E402

__all__ = ["plot_fit", "plot_frontier", "plot_residuals"]

_MAX_BAND_REPLICATES = 200


def _band(fit: FitResult, boot: BootstrapResult | None, Xg: np.ndarray, level: float = 0.95):
    if boot is None or boot.num_boot < 3:
        return None
    th = boot.thetas[:_MAX_BAND_REPLICATES]
    preds = np.stack([fit.law.predict(t, Xg) for t in th])
    q = 100 * (1 - level) / 2
    return np.percentile(preds, [q, 100 - q], axis=0)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)  # atomic: a reader never sees half a PNG
    return path


def plot_fit(
    fit: FitResult,
    X: np.ndarray,
    y: np.ndarray,
    path: str | Path,
    boot: BootstrapResult | None = None,
) -> Path:
    """Data and fitted curves (with bootstrap bands when ``boot`` is given)."""
    law, X, y = fit.law, np.asarray(X, dtype=float), np.asarray(y, dtype=float)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    if law.name == "power":
        xg = np.geomspace(X[:, 0].min(), X[:, 0].max(), 200)[:, None]
        ax.scatter(X[:, 0], y, s=12, c="k", label="data")
        ax.plot(xg[:, 0], fit.predict(xg), c="C0", label="fit")
        band = _band(fit, boot, xg)
        if band is not None:
            ax.fill_between(xg[:, 0], band[0], band[1], color="C0", alpha=0.25, label="95% band")
        ax.set_xscale("log")
        ax.set_xlabel("x")
    elif law.name == "chinchilla":
        logn = np.log10(X[:, 0])
        sc = ax.scatter(X[:, 1], y, s=10, c=logn, cmap="viridis", label="data")
        fig.colorbar(sc, ax=ax, label="log10 N (parameters)")
        dg = np.geomspace(X[:, 1].min(), X[:, 1].max(), 200)
        for q in (0.1, 0.5, 0.9):
            n = float(np.quantile(X[:, 0], q))
            Xg = np.stack([np.full_like(dg, n), dg], axis=1)
            color = plt.cm.viridis((np.log10(n) - logn.min()) / max(np.ptp(logn), 1e-12))
            ax.plot(dg, fit.predict(Xg), c=color, label=f"fit, N={n:.3g}")
            band = _band(fit, boot, Xg)
            if band is not None:
                ax.fill_between(dg, band[0], band[1], color=color, alpha=0.25)
        ax.set_xscale("log")
        ax.set_xlabel("D (tokens)")
    elif law.name == "multilingual":
        ng = np.geomspace(X[:, 0].min(), X[:, 0].max(), 100)
        for s_idx, s in enumerate(law.sources):
            m = X[:, 2] == s_idx
            ax.scatter(X[m, 0], y[m], s=12, c=f"C{s_idx % 10}", label=f"{s} data")
            for w in np.unique(X[m, 1])[:3]:
                Xg = np.stack([ng, np.full_like(ng, w), np.full_like(ng, s_idx)], axis=1)
                ax.plot(ng, fit.predict(Xg), c=f"C{s_idx % 10}", lw=1, alpha=0.8)
                band = _band(fit, boot, Xg)
                if band is not None:
                    ax.fill_between(ng, band[0], band[1], color=f"C{s_idx % 10}", alpha=0.15)
        ax.set_xscale("log")
        ax.set_xlabel("N (parameters); lines: fitted law at the observed weights")
    else:
        pred = fit.predict(X)
        ax.scatter(pred, y, s=10, c="k")
        lo, hi = min(pred.min(), y.min()), max(pred.max(), y.max())
        ax.plot([lo, hi], [lo, hi], c="C3", lw=1, label="y = x")
        ax.set_xlabel("predicted loss")
    ax.set_ylabel("loss")
    ax.set_title(f"{law.name} law, Huber objective {fit.objective:.4g}")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_residuals(fit: FitResult, X: np.ndarray, y: np.ndarray, path: str | Path) -> Path:
    """Log residuals ``log L_hat - log L`` against the prediction, with the Huber delta."""
    pred = fit.predict(X)
    r = np.log(pred) - np.log(np.asarray(y, dtype=float))
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    ax.scatter(pred, r, s=10, c="k")
    ax.axhline(0, c="C0", lw=1)
    for s in (-1, 1):
        ax.axhline(s * fit.delta, c="C3", lw=0.8, ls="--")
    ax.set_xlabel("predicted loss")
    ax.set_ylabel("log residual")
    ax.set_title(f"residuals (dashed: Huber delta = {fit.delta:g})")
    return _save(fig, path)


def plot_frontier(
    fit: FitResult,
    path: str | Path,
    boot: BootstrapResult | None = None,
    C: np.ndarray | None = None,
    k: float = 6.0,
    X: np.ndarray | None = None,
) -> Path:
    """Compute-optimal N and D against the budget C (Chinchilla law), with bootstrap bands."""
    if fit.law.name != "chinchilla":
        raise ValueError(
            f"the optimal-allocation frontier needs the chinchilla law, not {fit.law.name!r}"
        )
    if C is None:
        if X is not None:
            c_obs = k * X[:, 0] * X[:, 1]
            C = np.geomspace(c_obs.min(), c_obs.max() * 100, 50)
        else:
            C = np.geomspace(1e18, 1e25, 50)
    params = [fit.params]
    if boot is not None:
        params += [dict(zip(boot.param_names, s, strict=True)) for s in boot.samples]
    fr = frontier(params, C, k)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot(fr["C"], fr["N_opt"], c="C0", label="N_opt (parameters)")
    ax.plot(fr["C"], fr["D_opt"], c="C1", label="D_opt (tokens)")
    if "N_lo" in fr:
        ax.fill_between(fr["C"], fr["N_lo"], fr["N_hi"], color="C0", alpha=0.25)
        ax.fill_between(fr["C"], fr["D_lo"], fr["D_hi"], color="C1", alpha=0.25)
    if X is not None:
        ax.scatter(k * X[:, 0] * X[:, 1], X[:, 0], s=6, c="C0", alpha=0.4, label="runs (N)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"compute C (FLOPs, C = {k:g} N D)")
    ax.legend(fontsize=8)
    ax.set_title("compute-optimal allocation")
    return _save(fig, path)
