"""Scaling laws as objects: parameter names, bounds, an initialisation grid, predict.

Every law is fitted in log space, as in Chinchilla's Approach 3 (Hoffmann et al. 2022;
Besiroglu et al. 2024): the prediction is written as a log-sum-exp of terms that are linear
in the *internal* parameters ``theta``, so ``log L`` and its Jacobian are closed-form and
numerically stable (no overflow for A ~ 1e10). Multiplicative constants are stored as logs
(``a = log A``), which also makes the objective far better conditioned.

Two parameterisations per law:

* internal ``theta`` (1-D float array, order ``law.theta_names``): what the optimiser sees,
  what ``bounds`` and ``init_grid`` are in;
* public parameters (dict, order ``law.param_names``): what a user reads and what
  confidence intervals are reported for (``A = exp(a)``).

Inputs ``X`` are 2-D float arrays of shape ``(n_points, len(law.input_names))``; the loss
``y`` has shape ``(n_points,)`` and must be positive (it is a cross-entropy in nats).

Laws
    PowerLaw          L(x) = E + A / x^alpha
    ChinchillaLaw     L(N, D) = E + A / N^alpha + B / D^beta
    MultilingualLaw   L_i(N, w_i) = beta_i * (N * w_i^gamma_i)^(-alpha) + L_inf_i
    MixingLaw         L(r) = c + exp(t . r)   (Ye et al. 2024, k absorbed, see class)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.special import logsumexp, softmax

__all__ = [
    "ChinchillaLaw",
    "MixingLaw",
    "MultilingualLaw",
    "PowerLaw",
    "ScalingLaw",
    "law_from_spec",
]


def _lse_and_softmax(terms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``terms (n, k)`` -> ``(log sum exp over k (n,), softmax weights (n, k))``."""
    return logsumexp(terms, axis=1), softmax(terms, axis=1)


class ScalingLaw:
    """Base class. Subclasses set the class attributes and implement ``_terms``.

    A subclass describes ``log L = logsumexp_k T_k(theta, X)`` where each term ``T_k`` is
    linear in ``theta`` given ``X``; ``_terms`` returns the terms ``(n, k)`` and their
    derivatives ``dT/dtheta (n, k, p)``. The base class turns that into ``log_predict``,
    its Jacobian, and ``predict``.
    """

    name: str = "base"
    input_names: tuple[str, ...] = ()
    theta_names: tuple[str, ...] = ()
    param_names: tuple[str, ...] = ()

    # ---- to implement -------------------------------------------------------------------
    def _terms(self, theta: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def bounds(self) -> list[tuple[float | None, float | None]]:
        """L-BFGS-B bounds on ``theta``, one ``(lo, hi)`` per internal parameter."""
        raise NotImplementedError

    def grid_axes(self, size: int, X: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
        """One axis of start values per gridded coordinate (see ``init_grid``)."""
        raise NotImplementedError

    def grid_to_theta(self, point: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Map a grid point (one value per axis) to a full ``theta`` (identity by default)."""
        return np.asarray(point, dtype=float)

    def to_public(self, theta: np.ndarray) -> dict[str, float]:
        raise NotImplementedError

    def from_public(self, params: dict[str, float]) -> np.ndarray:
        raise NotImplementedError

    # ---- shared -------------------------------------------------------------------------
    @property
    def num_params(self) -> int:
        return len(self.theta_names)

    def init_grid(self, size: int, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        """All starts of the multi-start fit: the Cartesian product of ``grid_axes``.

        Returns ``(num_starts, num_params)``; ``size`` values per axis, so a 5-parameter
        law with ``size=4`` has 4^5 = 1024 starts.
        """
        if size < 1:
            raise ValueError(f"grid size must be >= 1, got {size}")
        axes = self.grid_axes(size, X, y)
        mesh = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(axes))
        return np.stack([self.grid_to_theta(p, X, y) for p in mesh])

    def log_predict(self, theta: np.ndarray, X: np.ndarray) -> np.ndarray:
        terms, _ = self._terms(np.asarray(theta, dtype=float), X)
        return logsumexp(terms, axis=1)

    def log_predict_and_jac(
        self, theta: np.ndarray, X: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(log L (n,), d log L / d theta (n, p))``."""
        terms, dterms = self._terms(np.asarray(theta, dtype=float), X)
        lse, w = _lse_and_softmax(terms)
        return lse, np.einsum("nk,nkp->np", w, dterms)

    def log_predict_and_jac_batch(
        self, thetas: np.ndarray, X: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Many parameter vectors at once: ``thetas (B, p)`` -> ``(log L (B, n), jac (B, n, p))``.

        The default loops over B; laws on the hot path override it with array code.
        """
        outs = [self.log_predict_and_jac(t, X) for t in np.asarray(thetas, dtype=float)]
        return np.stack([o[0] for o in outs]), np.stack([o[1] for o in outs])

    def predict(self, theta: np.ndarray, X: np.ndarray) -> np.ndarray:
        """Predicted loss ``(n,)`` for internal parameters ``theta``."""
        return np.exp(self.log_predict(theta, X))

    def predict_public(self, params: dict[str, float], X: np.ndarray) -> np.ndarray:
        return self.predict(self.from_public(params), X)

    def check_inputs(
        self, X: np.ndarray, y: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Shape and domain checks; raises ``ValueError`` naming the input and the value."""
        X = np.asarray(X, dtype=float)
        if X.ndim == 1 and len(self.input_names) == 1:
            X = X[:, None]
        if X.ndim != 2 or X.shape[1] != len(self.input_names):
            raise ValueError(
                f"{self.name} law expects X with columns {list(self.input_names)}, "
                f"got shape {X.shape}"
            )
        for j, col in enumerate(self.input_names):
            bad = ~np.isfinite(X[:, j])
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ValueError(
                    f"input {col!r} has a non-finite value {float(X[i, j])!r} at row {i}"
                )
        self._check_domain(X)
        if y is not None:
            y = np.asarray(y, dtype=float).reshape(-1)
            if y.shape[0] != X.shape[0]:
                raise ValueError(f"{X.shape[0]} input rows but {y.shape[0]} losses")
            bad = ~np.isfinite(y) | (y <= 0)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ValueError(
                    f"loss must be finite and > 0 (log-space fit), got {float(y[i])!r} at row {i} "
                    f"({int(bad.sum())} bad rows)"
                )
            if X.shape[0] <= self.num_params:
                raise ValueError(
                    f"{self.name} law has {self.num_params} parameters and needs more than "
                    f"{self.num_params} points, got {X.shape[0]}"
                )
        return X, y

    def _check_domain(self, X: np.ndarray) -> None:
        for j, col in enumerate(self.input_names):
            bad = X[:, j] <= 0
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ValueError(f"input {col!r} must be > 0, got {float(X[i, j])!r} at row {i}")

    def spec(self) -> dict:
        """JSON-able description, inverse of ``law_from_spec``."""
        return {"name": self.name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec()})"


class PowerLaw(ScalingLaw):
    """``L(x) = E + A / x^alpha`` (x > 0: parameters, tokens or FLOPs; L in nats).

    Internal ``theta = (a, alpha, e)`` with ``A = exp(a)``, ``E = exp(e)``;
    ``log L = LSE(a - alpha log x, e)``.
    """

    name = "power"
    input_names = ("x",)
    theta_names = ("a", "alpha", "e")
    param_names = ("A", "alpha", "E")

    def _terms(self, theta, X):
        a, alpha, e = theta
        lx = np.log(X[:, 0])
        n = lx.shape[0]
        terms = np.stack([a - alpha * lx, np.full(n, e)], axis=1)
        d = np.zeros((n, 2, 3))
        d[:, 0, 0] = 1.0
        d[:, 0, 1] = -lx
        d[:, 1, 2] = 1.0
        return terms, d

    def log_predict_and_jac_batch(self, thetas, X):
        a, alpha, e = (thetas[:, i : i + 1] for i in range(3))
        lx = np.log(X[:, 0])[None, :]
        t1 = a - alpha * lx
        m = np.maximum(t1, e)
        e1, e2 = np.exp(t1 - m), np.exp(e - m)
        s = e1 + e2
        w1 = e1 / s
        jac = np.stack([w1, -w1 * lx, e2 / s], axis=2)
        return m + np.log(s), jac

    def bounds(self):
        return [(-20.0, 60.0), (0.0, 3.0), (-5.0, 3.0)]

    def grid_axes(self, size, X, y):
        return [
            np.linspace(0.0, 25.0, size),
            np.linspace(0.0, 2.0, size) if size > 1 else np.array([0.5]),
            np.linspace(-1.0, 1.0, size) if size > 1 else np.array([0.0]),
        ]

    def to_public(self, theta):
        a, alpha, e = (float(v) for v in theta)
        return {"A": float(np.exp(a)), "alpha": alpha, "E": float(np.exp(e))}

    def from_public(self, params):
        return np.array([np.log(params["A"]), params["alpha"], np.log(params["E"])])


class ChinchillaLaw(ScalingLaw):
    """``L(N, D) = E + A / N^alpha + B / D^beta`` (N parameters, D tokens, L in nats).

    Internal ``theta = (a, b, e, alpha, beta)``; ``log L = LSE(a - alpha log N,
    b - beta log D, e)`` exactly as in Chinchilla's Approach 3. The default grid follows
    Hoffmann et al. / Besiroglu et al.: a, b in [0, 25], e in [-1, 1], alpha, beta in
    [0, 2], ``size`` values each.
    """

    name = "chinchilla"
    input_names = ("N", "D")
    theta_names = ("a", "b", "e", "alpha", "beta")
    param_names = ("A", "B", "E", "alpha", "beta")

    def _terms(self, theta, X):
        a, b, e, alpha, beta = theta
        ln, ld = np.log(X[:, 0]), np.log(X[:, 1])
        n = ln.shape[0]
        terms = np.stack([a - alpha * ln, b - beta * ld, np.full(n, e)], axis=1)
        d = np.zeros((n, 3, 5))
        d[:, 0, 0] = 1.0
        d[:, 0, 3] = -ln
        d[:, 1, 1] = 1.0
        d[:, 1, 4] = -ld
        d[:, 2, 2] = 1.0
        return terms, d

    # Faster specialisation of the generic einsum (this is the hot path of the bench).
    def log_predict_and_jac(self, theta, X):
        a, b, e, alpha, beta = (float(v) for v in theta)
        ln, ld = np.log(X[:, 0]), np.log(X[:, 1])
        t1 = a - alpha * ln
        t2 = b - beta * ld
        m = np.maximum(np.maximum(t1, t2), e)
        e1, e2, e3 = np.exp(t1 - m), np.exp(t2 - m), np.exp(e - m)
        s = e1 + e2 + e3
        lse = m + np.log(s)
        w1, w2, w3 = e1 / s, e2 / s, e3 / s
        jac = np.stack([w1, w2, w3, -w1 * ln, -w2 * ld], axis=1)
        return lse, jac

    def log_predict_and_jac_batch(self, thetas, X):
        a, b, e, alpha, beta = (thetas[:, i : i + 1] for i in range(5))
        ln, ld = np.log(X[:, 0])[None, :], np.log(X[:, 1])[None, :]
        t1 = a - alpha * ln
        t2 = b - beta * ld
        m = np.maximum(np.maximum(t1, t2), e)
        e1, e2, e3 = np.exp(t1 - m), np.exp(t2 - m), np.exp(e - m)
        s = e1 + e2 + e3
        w1, w2, w3 = e1 / s, e2 / s, e3 / s
        jac = np.stack([w1, w2, w3, -w1 * ln, -w2 * ld], axis=2)
        return m + np.log(s), jac

    def bounds(self):
        return [(-20.0, 60.0), (-20.0, 60.0), (-5.0, 3.0), (0.0, 3.0), (0.0, 3.0)]

    def grid_axes(self, size, X, y):
        if size == 1:
            return [
                np.array([6.0]),
                np.array([7.0]),
                np.array([0.5]),
                np.array([0.34]),
                np.array([0.28]),
            ]
        return [
            np.linspace(0.0, 25.0, size),
            np.linspace(0.0, 25.0, size),
            np.linspace(-1.0, 1.0, size),
            np.linspace(0.0, 2.0, size),
            np.linspace(0.0, 2.0, size),
        ]

    def to_public(self, theta):
        a, b, e, alpha, beta = (float(v) for v in theta)
        return {
            "A": float(np.exp(a)),
            "B": float(np.exp(b)),
            "E": float(np.exp(e)),
            "alpha": alpha,
            "beta": beta,
        }

    def from_public(self, params):
        return np.array(
            [
                np.log(params["A"]),
                np.log(params["B"]),
                np.log(params["E"]),
                params["alpha"],
                params["beta"],
            ]
        )


class MultilingualLaw(ScalingLaw):
    """Joint law over sources sharing one exponent (after Fernandes et al. 2023).

    For source i trained with mixture weight ``w_i`` (fraction of training tokens, in
    (0, 1]) in a model of ``N`` parameters::

        L_i(N, w_i) = beta_i * N_eff_i^(-alpha) + L_inf_i,   N_eff_i = N * w_i^gamma_i

    Why this form: Fernandes et al. found that changing the language weights moves only the
    multiplicative factor of each language's power law in N, never the exponent, and read it
    as an *effective parameter count* allocated to the language. ``f_i(w) = w^gamma_i`` is
    the simplest effective-parameter map with the right anchors: ``f_i(1) = 1`` (a model
    trained on source i alone spends all N parameters on it), ``gamma_i = 0`` means the
    weight does not matter (full transfer from the other sources), ``gamma_i = 1`` means
    capacity splits in proportion to the weight (no transfer). Because
    ``beta_i N_eff^(-alpha) = beta_i w^(-alpha gamma_i) N^(-alpha)``, the weight only
    scales the multiplicative factor and alpha is shared by all sources and mixtures.
    Units: N in parameters, w dimensionless, L in nats per token, beta_i in nats * params^alpha.

    Inputs ``X`` columns: ``N``, ``w`` and ``source`` (integer index into ``sources``).
    Internal ``theta = (alpha, b_1, g_1, e_1, ..., b_S, g_S, e_S)`` with
    ``beta_i = exp(b_i)``, ``gamma_i = g_i``, ``L_inf_i = exp(e_i)``.
    """

    name = "multilingual"
    input_names = ("N", "w", "source")

    def __init__(self, sources: Sequence[str]):
        sources = [str(s) for s in sources]
        if not sources:
            raise ValueError("MultilingualLaw needs at least one source")
        if len(set(sources)) != len(sources):
            raise ValueError(f"duplicate source names in {sources}")
        self.sources = sources
        names = ["alpha"]
        pub = ["alpha"]
        for s in sources:
            names += [f"b[{s}]", f"gamma[{s}]", f"e[{s}]"]
            pub += [f"beta[{s}]", f"gamma[{s}]", f"L_inf[{s}]"]
        self.theta_names = tuple(names)
        self.param_names = tuple(pub)

    def _check_domain(self, X):
        S = len(self.sources)
        if (X[:, 0] <= 0).any():
            i = int(np.flatnonzero(X[:, 0] <= 0)[0])
            raise ValueError(f"input 'N' must be > 0, got {float(X[i, 0])!r} at row {i}")
        bad = (X[:, 1] <= 0) | (X[:, 1] > 1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"input 'w' (mixture weight) must be in (0, 1], got {float(X[i, 1])!r} at row {i}"
            )
        src = X[:, 2]
        bad = (src != np.round(src)) | (src < 0) | (src >= S)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"input 'source' must be an index in [0, {S}), got {float(src[i])!r} at row {i}"
            )

    def _terms(self, theta, X):
        S = len(self.sources)
        alpha = theta[0]
        per = theta[1:].reshape(S, 3)
        idx = X[:, 2].astype(int)
        ln, lw = np.log(X[:, 0]), np.log(X[:, 1])
        b, g, e = per[idx, 0], per[idx, 1], per[idx, 2]
        n = X.shape[0]
        terms = np.stack([b - alpha * (ln + g * lw), e], axis=1)
        d = np.zeros((n, 2, self.num_params))
        rows = np.arange(n)
        d[:, 0, 0] = -(ln + g * lw)
        d[rows, 0, 1 + 3 * idx] = 1.0
        d[rows, 0, 2 + 3 * idx] = -alpha * lw
        d[rows, 1, 3 + 3 * idx] = 1.0
        return terms, d

    def log_predict_and_jac_batch(self, thetas, X):
        S = len(self.sources)
        B, n = thetas.shape[0], X.shape[0]
        alpha = thetas[:, :1]
        per = thetas[:, 1:].reshape(B, S, 3)
        idx = X[:, 2].astype(int)
        ln, lw = np.log(X[:, 0])[None, :], np.log(X[:, 1])[None, :]
        b, g, e = per[:, idx, 0], per[:, idx, 1], per[:, idx, 2]
        z = ln + g * lw
        t1 = b - alpha * z
        m = np.maximum(t1, e)
        e1, e2 = np.exp(t1 - m), np.exp(e - m)
        s = e1 + e2
        w1, w2 = e1 / s, e2 / s
        jac = np.zeros((B, n, self.num_params))
        rows = np.arange(n)
        jac[:, :, 0] = -w1 * z
        jac[:, rows, 1 + 3 * idx] = w1
        jac[:, rows, 2 + 3 * idx] = -w1 * alpha * lw
        jac[:, rows, 3 + 3 * idx] = w2
        return m + np.log(s), jac

    def bounds(self):
        return [(0.0, 3.0)] + [(-20.0, 60.0), (0.0, 2.0), (-5.0, 3.0)] * len(self.sources)

    def grid_axes(self, size, X, y):
        # Sources share the grid values (the grid would otherwise grow as size^(3S+1)).
        if size == 1:
            return [np.array([0.3]), np.array([5.0]), np.array([0.5]), np.array([0.0])]
        return [
            np.linspace(0.05, 1.0, size),
            np.linspace(0.0, 20.0, size),
            np.linspace(0.0, 1.0, size),
            np.linspace(-1.0, 1.0, size),
        ]

    def grid_to_theta(self, point, X, y):
        alpha, b, g, e = point
        return np.concatenate([[alpha], np.tile([b, g, e], len(self.sources))])

    def to_public(self, theta):
        out = {"alpha": float(theta[0])}
        for i, s in enumerate(self.sources):
            b, g, e = theta[1 + 3 * i : 4 + 3 * i]
            out[f"beta[{s}]"] = float(np.exp(b))
            out[f"gamma[{s}]"] = float(g)
            out[f"L_inf[{s}]"] = float(np.exp(e))
        return out

    def from_public(self, params):
        th = [params["alpha"]]
        for s in self.sources:
            th += [
                np.log(params[f"beta[{s}]"]),
                params[f"gamma[{s}]"],
                np.log(params[f"L_inf[{s}]"]),
            ]
        return np.array(th, dtype=float)

    def spec(self):
        return {"name": self.name, "sources": list(self.sources)}


class MixingLaw(ScalingLaw):
    """Data mixing law for one target domain (Ye et al. 2024): ``L(r) = c + k exp(t . r)``.

    ``r`` is a mixture (proportions of M training domains, on the simplex). Because
    ``sum_j r_j = 1``, ``k exp(t . r) = exp((t + log k) . r)``: k and t are not separately
    identifiable on the simplex, so k is absorbed into t (reported ``k = 1``).
    Fit one law per target domain. Internal ``theta = (e, t_1, ..., t_M)``, ``c = exp(e)``;
    ``log L = LSE(t . r, e)``.

    The starts are data-driven: for each of ``size`` values of ``c`` below the smallest
    observed loss, ``t`` comes from a ridge least-squares fit of ``log(L - c)`` on ``r``
    (exact for noise-free data at the right c), so the non-convex part is one dimension.
    """

    name = "mixing"

    def __init__(self, domains: Sequence[str]):
        domains = [str(d) for d in domains]
        if not domains:
            raise ValueError("MixingLaw needs at least one domain")
        self.domains = domains
        self.input_names = tuple(f"r[{d}]" for d in domains)
        self.theta_names = ("e",) + tuple(f"t[{d}]" for d in domains)
        self.param_names = ("c",) + tuple(f"t[{d}]" for d in domains)

    def _check_domain(self, X):
        bad = X < 0
        if bad.any():
            i, j = (int(v) for v in np.argwhere(bad)[0])
            raise ValueError(
                f"mixture proportion {self.input_names[j]!r} must be >= 0, got {float(X[i, j])!r} at row {i}"
            )
        s = X.sum(axis=1)
        bad = np.abs(s - 1.0) > 0.05
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"mixture proportions must sum to 1 (+-0.05), row {i} sums to {float(s[i])!r}"
            )

    def _terms(self, theta, X):
        n = X.shape[0]
        terms = np.stack([X @ theta[1:], np.full(n, theta[0])], axis=1)
        d = np.zeros((n, 2, self.num_params))
        d[:, 0, 1:] = X
        d[:, 1, 0] = 1.0
        return terms, d

    def log_predict_and_jac(self, theta, X):
        t1 = X @ theta[1:]
        e = float(theta[0])
        m = np.maximum(t1, e)
        e1, e2 = np.exp(t1 - m), np.exp(e - m)
        s = e1 + e2
        w1 = e1 / s
        jac = np.empty((X.shape[0], self.num_params))
        jac[:, 0] = e2 / s
        jac[:, 1:] = w1[:, None] * X
        return m + np.log(s), jac

    def log_predict_and_jac_batch(self, thetas, X):
        t1 = thetas[:, 1:] @ X.T  # (B, n)
        e = thetas[:, :1]
        m = np.maximum(t1, e)
        e1, e2 = np.exp(t1 - m), np.exp(e - m)
        s = e1 + e2
        w1 = e1 / s
        jac = np.concatenate([(e2 / s)[:, :, None], w1[:, :, None] * X[None, :, :]], axis=2)
        return m + np.log(s), jac

    def bounds(self):
        return [(-10.0, 3.0)] + [(-30.0, 30.0)] * len(self.domains)

    def grid_axes(self, size, X, y):
        lo = float(np.min(y))
        fr = np.linspace(0.0, 0.95, size) if size > 1 else np.array([0.5])
        return [np.log(np.maximum(fr * lo, 1e-4))]

    def grid_to_theta(self, point, X, y):
        (e,) = point
        c = float(np.exp(e))
        z = np.log(np.maximum(np.asarray(y) - c, 1e-6))
        M = X.shape[1]
        lam = 1e-3 * max(len(z), 1)
        t = np.linalg.solve(X.T @ X + lam * np.eye(M), X.T @ z)
        lo, hi = self.bounds()[1]
        return np.concatenate([[e], np.clip(t, lo, hi)])

    def to_public(self, theta):
        out = {"c": float(np.exp(theta[0]))}
        for d, t in zip(self.domains, theta[1:], strict=True):
            out[f"t[{d}]"] = float(t)
        return out

    def from_public(self, params):
        return np.array([np.log(params["c"])] + [params[f"t[{d}]"] for d in self.domains])

    def spec(self):
        return {"name": self.name, "domains": list(self.domains)}


def law_from_spec(spec: dict) -> ScalingLaw:
    """Rebuild a law from ``law.spec()`` (used by fit.json readers)."""
    name = spec.get("name")
    if name == "power":
        return PowerLaw()
    if name == "chinchilla":
        return ChinchillaLaw()
    if name == "multilingual":
        return MultilingualLaw(spec["sources"])
    if name == "mixing":
        return MixingLaw(spec["domains"])
    raise ValueError(f"unknown law {name!r}; expected power, chinchilla, multilingual or mixing")
