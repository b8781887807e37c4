"""M4 entry points: `m4_keep_probabilities` (validate, solve, guard the streaming q, report),
the subsample draw, joint solves over sources, examples from table columns, and q files.

The problem is in the module doc of `pipeline/balance/m4/problem.py`; the solvers are
`streaming.py` and `exact.py`; `stage.py` applies q to a mixture plan.

Output and how it reaches training. `m4_keep_probabilities(...) -> M4Result` returns q (N,)
with before/after statistics. Two modes, the same two routes Temperature vs Upweight take:

    * mode="subsample" (the paper's): `m4_subsample(q, seed)` draws a seeded Bernoulli(q_i)
      subsample, a deterministic function of (q, seed); training sees only kept examples.
    * mode="weights": every example stays, with per-example loss weight q_i / eta (mean 1),
      which gives the loss exactly the kept distribution's expectation.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from pipeline.balance.m4.exact import solve_exact
from pipeline.balance.m4.problem import (
    DEFAULT_ENFORCEMENT,
    DEFAULT_EPS_A,
    DEFAULT_EPS_R,
    SOLVERS,
    M4Duals,
    M4InfeasibleError,
    M4Problem,
    M4Result,
    m4_objective,
)
from pipeline.balance.m4.statistics import M4Statistics, m4_statistics
from pipeline.balance.m4.streaming import Batch, fit_streaming, write_keep_probabilities
from pipeline.balance.m4.validation import _binary_matrix, validate_examples
from pipeline.storage.atomic import atomic_write

log = logging.getLogger(__name__)


def m4_keep_probabilities(attributes, labels, *, eta: float = 0.9, pi=0.5,
                          eps_r=DEFAULT_EPS_R, eps_a=DEFAULT_EPS_A, utility=None,
                          utility_weight: float = 1.0, enforcement: float = DEFAULT_ENFORCEMENT,
                          solver: str = "streaming", batch_size: int = 65536, passes: int = 10,
                          seed: int = 0, attribute_names: Sequence[str] | None = None,
                          label_names: Sequence[str] | None = None, tolerance: float = 1e-4,
                          on_violation: str = "warn") -> M4Result:
    """Solve M4 (`problem.py` module doc) and return keep probabilities with a before/after report.

    Args:
        attributes: (N, m) bool or 0/1 sensitive attributes (overlap allowed).
        labels: (N, c) bool or 0/1 labels / concept proxies (c may be 0).
        eta: mean keep rate in (0, 1]. pi: scalar or (m,) representation targets.
        eps_r: scalar or (m,) bound on |E_q[s_k] - pi_k|.
        eps_a: scalar or (m, c) bound on |E_q[(s_k - pi_k) y_r]|.
        utility: optional (N,) utilities; utility_weight: gamma (keep probability per unit u).
        enforcement: C, price per unit of constraint violation (soft constraints).
        solver: "streaming" (minibatch primal-dual, O(m c) memory) or "exact" (scipy, small N).
            When a constraint cannot be met its dual sits at the enforcement bound and q
            becomes very sensitive to the duals: there the streaming q can be clearly worse
            than the exact one (measured on a 1,000-example toy with one unmeetable bound:
            penalised objective 2.45-6.19 against the exact 2.45, depending on batch_size).
            Use "exact" for infeasible requests where N allows. A streaming q that breaks a
            constraint the data already met, is non-finite, or is worse than uniform keeping
            is replaced (`_guard_streaming`: exact re-solve with those constraints hard, else
            a move toward q = eta); `info["guard"]` and a warning say so.
        batch_size, passes, seed: streaming minibatch size, passes to fit the duals, and the
            seed of the per-pass shuffle (q depends on it only through solver noise).
        attribute_names, label_names: used in the report and messages.
        tolerance: slack (E_q units) before a constraint counts as violated in the report.
        on_violation: "warn" (log the failing constraints), "raise" (M4InfeasibleError naming
            them and how close q got) or "ignore".

    Returns:
        M4Result with q (N,) float64 in [0, 1], mean(q) = eta.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if on_violation not in ("warn", "raise", "ignore"):
        raise ValueError(f"on_violation must be 'warn', 'raise' or 'ignore', got {on_violation!r}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    s, y, u = validate_examples(attributes, labels, utility)
    problem = M4Problem.build(s.shape[1], y.shape[1], eta=eta, pi=pi, eps_r=eps_r, eps_a=eps_a,
                              utility_weight=utility_weight, enforcement=enforcement)
    n = len(s)
    if solver == "exact":
        duals, info = solve_exact(s, y, u, problem)
    else:
        def shuffled() -> Iterator[Batch]:
            order = rng.permutation(n)
            for start in range(0, n, batch_size):
                rows = np.sort(order[start:start + batch_size])  # sorted rows read faster
                yield (s[rows], y[rows]) if u is None else (s[rows], y[rows], u[rows])

        rng = np.random.default_rng(seed)
        duals, info = fit_streaming(shuffled, problem, passes=passes, check_binary=False)
    q = np.empty(n, dtype=np.float64)
    in_order = ((s[i:i + batch_size], y[i:i + batch_size]) if u is None else
                (s[i:i + batch_size], y[i:i + batch_size], u[i:i + batch_size])
                for i in range(0, n, batch_size))
    before_acc = write_keep_probabilities(in_order, duals, q)
    names = (attribute_names, label_names)
    before = before_acc.result(*names, problem.eps_r, problem.eps_a, tolerance)
    after = m4_statistics(s, y, q, problem.pi, eps_r=problem.eps_r, eps_a=problem.eps_a,
                          attribute_names=attribute_names, label_names=label_names,
                          tolerance=tolerance, batch_size=batch_size)
    if solver == "streaming":
        duals, q, after, info = _guard_streaming(s, y, u, problem, duals, q, before, after, info, names,
                                                 tolerance, batch_size)
    objective, penalized = m4_objective(q, problem, u, after)
    if solver == "exact":  # the certificate: P(q) - g(duals) >= 0, zero at the optimum
        info["gap"] = penalized - info["dual_value"]
    result = M4Result(q, duals, before, after, objective, penalized, solver, info)
    if not result.feasible and on_violation != "ignore":
        message = result.describe_violations()
        if on_violation == "raise":
            raise M4InfeasibleError(result.violations, message)
        log.warning("%s", message)
    return result


# Largest N * (m + c) the guard re-solves exactly (float64 copies: ~8 bytes each, a few times).
EXACT_FALLBACK_LIMIT = 20_000_000


def _excess(stats: M4Statistics, problem: M4Problem) -> np.ndarray:
    """(m + m*c,) |statistic| - eps, representation first, then association raveled."""
    values = np.concatenate([stats.representation, stats.association.ravel()])
    bounds = np.concatenate([problem.eps_r, problem.eps_a.ravel()])
    return np.where(np.isfinite(values), np.abs(values) - bounds, np.inf)


def _constraint_names(stats: M4Statistics, which: np.ndarray) -> list[str]:
    m, c = len(stats.attribute_names), len(stats.label_names)
    out = []
    for j in np.flatnonzero(which):
        if j < m:
            out.append(f"E[{stats.attribute_names[j]}] - pi")
        else:
            k, r = divmod(int(j - m), c)
            out.append(f"E[({stats.attribute_names[k]} - pi) * {stats.label_names[r]}]")
    return out


def _guard_streaming(s, y, u, problem: M4Problem, duals: M4Duals, q: np.ndarray, before: M4Statistics,
                     after: M4Statistics, info: dict, names: tuple, tolerance: float, batch_size: int):
    """Never return a streaming q worse than uniform keeping (q = eta) on a constraint the data
    already met, nor a non-finite one, nor one whose penalised objective is worse than q = eta's.

    The streaming solver is approximate; where its duals sit at the enforcement bound (a
    constraint that cannot be met, eps = 0 ...) q is very sensitive to them and it can break
    a constraint the data met (seen: +0.0002 -> +0.0483 at eps_r = eps_a = 0). Then:
    1. re-solve with the exact solver (where N * (m + c) <= EXACT_FALLBACK_LIMIT), with the
       constraints the data met made hard at eps + tolerance, so they cannot be traded for the
       others;
    2. if a met constraint is still broken (no exact solve, or it did not converge), move q
       toward eta along q_t = eta + t (q - eta), t in [0, 1]: mean(q_t) = eta and every E_q_t
       is linear in t, so the largest t that keeps each met constraint met is exact, and t = 0
       (uniform keeping) always qualifies.
    `info["guard"]` records what ran; a warning names the constraints.
    """
    eta = problem.eta
    met = _excess(before, problem) <= tolerance
    finite = bool(np.isfinite(q).all())
    broken = met & ~(_excess(after, problem) <= tolerance)
    uniform = m4_objective(np.full(len(q), eta), problem, u, before)[1]
    penalized = m4_objective(q, problem, u, after)[1] if finite else np.inf
    worse = not penalized <= uniform + 1e-12 * max(1.0, abs(uniform))
    if finite and not broken.any() and not worse:
        return duals, q, after, info
    if not finite:
        why = "non-finite keep probabilities"
    elif broken.any():
        why = f"it broke constraint(s) the data already met: {', '.join(_constraint_names(before, broken)[:5])}"
    else:
        why = f"its penalised objective {penalized:.6g} is worse than uniform keeping's {uniform:.6g}"
    guard: dict = {"reason": why, "steps": []}
    n, m, c = len(s), problem.num_attributes, problem.num_labels

    def statistics(weights):
        return m4_statistics(s, y, weights, problem.pi, eps_r=problem.eps_r, eps_a=problem.eps_a,
                             attribute_names=names[0], label_names=names[1], tolerance=tolerance,
                             batch_size=batch_size)

    if n * (m + c) <= EXACT_FALLBACK_LIMIT:
        bounds = np.concatenate([problem.eps_r, problem.eps_a.ravel()]) + tolerance
        exact_duals, exact_info = solve_exact(s, y, u, problem, hard_bounds=np.where(met, bounds, np.nan))
        exact_q = np.empty(n, dtype=np.float64)
        in_order = ((s[i:i + batch_size], y[i:i + batch_size]) if u is None else
                    (s[i:i + batch_size], y[i:i + batch_size], u[i:i + batch_size])
                    for i in range(0, n, batch_size))
        write_keep_probabilities(in_order, exact_duals, exact_q)
        if np.isfinite(exact_q).all():
            duals, q, after = exact_duals, exact_q, statistics(exact_q)
            guard["steps"].append("exact re-solve with met constraints hard")
            guard["exact"] = exact_info
    if not np.isfinite(q).all():
        q = np.full(n, eta)
        after = statistics(q)
        guard["steps"].append("uniform keep (q = eta)")
    broken = met & ~(_excess(after, problem) <= tolerance)
    if broken.any():
        b = np.concatenate([before.representation, before.association.ravel()])
        a = np.concatenate([after.representation, after.association.ravel()])
        limit = np.concatenate([problem.eps_r, problem.eps_a.ravel()]) + tolerance
        t = 1.0
        for j in np.flatnonzero(broken):  # |(1 - t) b + t a| <= limit, |b| <= limit at t = 0
            edge = limit[j] if a[j] > b[j] else -limit[j]
            t = min(t, max(0.0, (edge - b[j]) / (a[j] - b[j])))
        t *= 1 - 1e-9
        q = eta + t * (q - eta)
        after = statistics(q)
        guard["steps"].append(f"moved toward uniform keeping (t = {t:.4g})")
        guard["t"] = t
    log.warning("M4 streaming solver: %s; %s", why, "; then ".join(guard["steps"]))
    return duals, q, after, {**info, "guard": guard}


def m4_subsample(q, seed: int) -> np.ndarray:
    """Sorted int64 indices of a seeded Bernoulli(q_i) subsample (the paper's mode).

    A pure function of (q, seed): the same call returns the same indices on every rank.
    """
    q = np.asarray(q, dtype=np.float64)
    if q.ndim != 1:
        raise ValueError(f"q must be 1-D (N,), got shape {q.shape}")
    if not np.isfinite(q).all() or (q < 0).any() or (q > 1).any():
        raise ValueError("keep probabilities q must be in [0, 1]")
    draws = np.random.default_rng(np.random.SeedSequence([int(seed), 0x4D34])).random(len(q))
    return np.flatnonzero(draws < q)


def solve_sources(sources: Mapping[str, tuple], **kwargs) -> tuple[dict[str, np.ndarray], M4Result]:
    """Solve M4 jointly over several sources; returns ({source: q slice}, pooled result).

    Args:
        sources: {name: (attributes (n_i, m), labels (n_i, c)[, utility (n_i,)])}, all with the
            same m and c columns in the same order.
        kwargs: passed to `m4_keep_probabilities`.
    """
    if not sources:
        raise ValueError("solve_sources needs at least one source")
    names = list(sources)
    parts = [tuple(sources[name]) for name in names]
    for name, part in zip(names, parts, strict=True):
        if len(part) not in (2, 3):
            raise ValueError(f"source {name!r}: expected (attributes, labels[, utility])")
    with_utility = {len(part) == 3 for part in parts}
    if len(with_utility) > 1:
        raise ValueError("either every source or none gives a utility column")
    try:
        s = np.concatenate([np.asarray(p[0]).reshape(len(p[0]), -1) for p in parts])
        y = np.concatenate([np.asarray(p[1]) for p in parts])
    except ValueError as error:
        raise ValueError(f"sources {names} disagree on attribute/label columns: {error}") from None
    u = np.concatenate([np.asarray(p[2], dtype=np.float64) for p in parts]) if True in with_utility else None
    result = m4_keep_probabilities(s, y, utility=u, **kwargs)
    bounds = np.cumsum([0] + [len(p[0]) for p in parts])
    keep = {name: result.q[bounds[i]:bounds[i + 1]] for i, name in enumerate(names)}
    return keep, result


def examples_from_columns(table, attribute_columns: Sequence[str], label_columns: Sequence[str],
                          utility_column: str | None = None):
    """(attributes (N, m), labels (N, c), utility or None) from named columns of a table.

    `table` is anything indexable by column name with a column list (`datasets.Dataset`,
    pandas DataFrame, dict of arrays). A missing column raises ValueError naming it.
    """
    available = list(getattr(table, "column_names", None) or list(table.keys()))
    for kind, columns in (("attribute", attribute_columns), ("label", label_columns),
                          ("utility", [utility_column] if utility_column else [])):
        missing = [col for col in columns if col not in available]
        if missing:
            raise ValueError(f"missing {kind} column(s) {missing}; the table has {available}")
    if not attribute_columns:
        raise ValueError("attribute_columns is empty: M4 needs at least one sensitive attribute")
    n = len(table[attribute_columns[0]])
    attributes = np.stack([np.asarray(table[col]) for col in attribute_columns], axis=1)
    labels = (np.stack([np.asarray(table[col]) for col in label_columns], axis=1)
              if label_columns else np.zeros((n, 0), dtype=bool))
    utility = None if utility_column is None else np.asarray(table[utility_column], dtype=np.float64)
    for key, values, names in (("attribute", attributes, attribute_columns), ("label", labels, label_columns)):
        try:
            _binary_matrix(values, key + "s")
        except ValueError as error:
            column = int(str(error).split("column ")[1].split()[0])
            raise ValueError(f"{key} column {names[column]!r}: {error}") from None
    return attributes, labels, utility


# ----------------------------------------------------------------------------- q files


def save_keep_probabilities(path: str | os.PathLike, keep: Mapping[str, np.ndarray]) -> None:
    """Write {source: q} to an .npz file atomically (for `M4(keep=path)` in a config)."""
    arrays = {name: np.asarray(q, dtype=np.float64) for name, q in keep.items()}
    atomic_write(path, lambda stream: np.savez(stream, **arrays), binary=True, suffix=".npz")


def load_keep_probabilities(path: str | os.PathLike) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"M4 keep-probability file {str(path)!r} does not exist")
    with np.load(path) as data:
        return {name: data[name] for name in data.files}
