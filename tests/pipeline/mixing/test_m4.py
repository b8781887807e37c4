"""M4 balancing: constraints met on planted data, streaming vs exact, the stage, bad input."""

import numpy as np
import pytest
from scipy.optimize import minimize

from pipeline.balance.m4 import (
    M4,
    M4InfeasibleError,
    M4Problem,
    examples_from_columns,
    fit_streaming,
    load_keep_probabilities,
    m4_keep_probabilities,
    m4_subsample,
    save_keep_probabilities,
    solve_sources,
    write_keep_probabilities,
)
from pipeline.balance.m4.statistics import m4_statistics
from pipeline.mixing import Compose, Temperature


def planted(n, m=2, c=5, seed=0, skew=0.55, association=0.3, overlap=False):
    """Attributes over-represented at rate `skew`; label r is associated with attribute r % m."""
    rng = np.random.default_rng(seed)
    s = rng.random((n, m)) < skew
    if overlap:  # a third attribute that is the intersection of the first two
        s = np.concatenate([s, (s[:, 0] & s[:, 1])[:, None]], axis=1)
    base = rng.uniform(0.05, 0.3, c)
    p = base + association * base * (2 * s[:, np.arange(c) % m] - 1)
    y = rng.random((n, c)) < p
    return s, y


EPS = {"eps_r": 0.02, "eps_a": 0.005}
STREAM = {"batch_size": 2048, "passes": 10}


@pytest.fixture(scope="module")
def planted_results():
    s, y = planted(20000)
    streaming = m4_keep_probabilities(s, y, **EPS, **STREAM, on_violation="raise")
    exact = m4_keep_probabilities(s, y, **EPS, solver="exact", on_violation="raise")
    return s, y, streaming, exact


def test_planted_data_meets_every_bound_in_expectation(planted_results):
    s, y, streaming, exact = planted_results
    assert len(streaming.before.violations) >= 8  # the planted skew really violates the bounds
    for result in (streaming, exact):
        assert result.feasible, result.describe_violations()
        assert np.all(np.abs(result.after.representation) <= EPS["eps_r"] + 1e-4)
        assert np.all(np.abs(result.after.association) <= EPS["eps_a"] + 1e-4)
        assert result.q.mean() == pytest.approx(0.9, abs=1e-9)
        assert result.q.min() >= 0 and result.q.max() <= 1
        assert result.after.kept_fraction == pytest.approx(0.9, abs=1e-9)
        assert 0.7 * len(s) < result.after.effective_sample_size <= len(s)
        # The enforcement default is above every optimal dual: the soft constraints act as hard.
        assert np.abs(result.duals.lambda_a).max() < result.duals.problem.dual_bound


def test_seeded_subsample_meets_bounds_within_sampling_error(planted_results):
    s, y, streaming, _ = planted_results
    kept = m4_subsample(streaming.q, seed=3)
    np.testing.assert_array_equal(kept, m4_subsample(streaming.q, seed=3))  # deterministic
    assert abs(len(kept) - streaming.q.sum()) < 4 * np.sqrt((streaming.q * (1 - streaming.q)).sum())
    stats = m4_statistics(s[kept], y[kept], pi=0.5)
    n = len(kept)
    d = s[kept] - 0.5
    se_r = d.std(0) / np.sqrt(n)
    se_a = (d[:, :, None] * y[kept][:, None, :]).std(0) / np.sqrt(n)
    assert np.all(np.abs(stats.representation) <= EPS["eps_r"] + 4 * se_r)
    assert np.all(np.abs(stats.association) <= EPS["eps_a"] + 4 * se_a)
    # and the unbalanced data is far outside those bands
    before = m4_statistics(s, y)
    assert np.abs(before.representation).max() > EPS["eps_r"] + 4 * se_r.max()


def test_streaming_objective_within_one_percent_of_exact(planted_results):
    _, _, streaming, exact = planted_results
    assert exact.info["converged"] or exact.info["gap"] < 1e-6
    assert abs(streaming.objective - exact.objective) <= 0.01 * exact.objective
    np.testing.assert_allclose(streaming.q, exact.q, atol=0.05)


def test_streaming_from_an_iterator_of_minibatches(planted_results):
    """The O(m c) route: minibatches from a callable, q written into a preallocated array."""
    s, y, _, exact = planted_results
    problem = M4Problem.build(2, 5, **EPS)
    chunks = [(s[i:i + 2500], y[i:i + 2500]) for i in range(0, len(s), 2500)]
    duals, info = fit_streaming(lambda: iter(chunks), problem, passes=10)
    assert info["batches"] == 10 * len(chunks) and info["examples_per_pass"] == len(s)
    q = np.empty(len(s))
    before = write_keep_probabilities(iter(chunks), duals, q).result()
    np.testing.assert_allclose(before.representation, exact.before.representation)
    assert q.mean() == pytest.approx(0.9, abs=1e-9)
    np.testing.assert_allclose(duals.keep_probabilities(s[:100], y[:100]), q[:100], atol=1e-6)
    after = m4_statistics(s, y, q, eps_r=0.02, eps_a=0.005, tolerance=1e-4)
    assert after.violations == ()
    with pytest.raises(ValueError, match="same examples every pass"):
        calls = iter([chunks, chunks[:-1]])
        fit_streaming(lambda: iter(next(calls)), problem, passes=2)
    with pytest.raises(ValueError, match="passes must be an integer >= 1"):
        fit_streaming(lambda: iter(chunks), problem, passes=0)


def test_exact_solver_matches_a_generic_primal_qp():
    """The dual solver's q against scipy SLSQP on the primal QP with slack variables."""
    s, y = planted(40, m=1, c=2, seed=4, skew=0.7)
    problem = M4Problem.build(1, 2, eta=0.8, eps_r=0.05, eps_a=0.02, enforcement=5.0)
    result = m4_keep_probabilities(s, y, eta=0.8, eps_r=0.05, eps_a=0.02, enforcement=5.0,
                                   solver="exact", on_violation="ignore")
    a = np.concatenate([s - 0.5, (s - 0.5) * y], axis=1).astype(float)  # (N, 3)
    eps = np.array([0.05, 0.02, 0.02])
    n, k = len(a), a.shape[1]

    def objective(v):
        q, slack = v[:n], v[n:]
        return 0.5 * np.mean((q - 0.8) ** 2) + problem.enforcement * slack.sum()

    cons = [{"type": "eq", "fun": lambda v: v[:n].mean() - 0.8},
            {"type": "ineq", "fun": lambda v: eps + v[n:] - a.T @ v[:n] / (n * 0.8)},
            {"type": "ineq", "fun": lambda v: eps + v[n:] + a.T @ v[:n] / (n * 0.8)}]
    primal = minimize(objective, np.concatenate([np.full(n, 0.8), np.full(k, 0.1)]), method="SLSQP",
                      bounds=[(0, 1)] * n + [(0, None)] * k, constraints=cons,
                      options={"maxiter": 1000, "ftol": 1e-12})
    assert primal.success, primal.message
    assert result.penalized_objective == pytest.approx(primal.fun, rel=1e-5)
    np.testing.assert_allclose(result.q, primal.x[:n], atol=1e-4)


def test_overlapping_attributes():
    s, y = planted(20000, seed=1, overlap=True, association=0.15)
    assert (s.sum(1) > 1).mean() > 0.2  # many examples carry several attributes
    pi = [0.5, 0.5, 0.25]  # the intersection's balanced rate
    streaming = m4_keep_probabilities(s, y, pi=pi, **EPS, **STREAM, on_violation="raise")
    exact = m4_keep_probabilities(s, y, pi=pi, **EPS, solver="exact", on_violation="raise")
    assert len(streaming.before.violations) > 5
    assert streaming.after.representation.shape == (3,)
    assert streaming.after.association.shape == (3, 5)
    assert abs(streaming.objective - exact.objective) <= 0.01 * exact.objective


def test_balanced_data_keeps_eta_everywhere():
    # A full factorial design: every attribute/label combination equally often, so every
    # statistic is exactly 0 and uniform keeping is optimal.
    grid = np.array(np.meshgrid(*[[0, 1]] * 5, indexing="ij")).reshape(5, -1).T  # (32, 5)
    data = np.tile(grid, (50, 1)).astype(bool)
    s, y = data[:, :2], data[:, 2:]
    for solver in ("streaming", "exact"):
        result = m4_keep_probabilities(s, y, eta=0.85, solver=solver, batch_size=256)
        np.testing.assert_allclose(result.q, 0.85, atol=1e-12)
    # Random data inside the bounds: also q = eta exactly.
    rng = np.random.default_rng(5)
    s, y = rng.random((20000, 2)) < 0.5, rng.random((20000, 4)) < 0.2
    result = m4_keep_probabilities(s, y, eps_r=0.05, eps_a=0.02)
    assert result.before.violations == ()
    np.testing.assert_allclose(result.q, 0.9, atol=1e-12)


def test_utility_prefers_high_utility_examples():
    s, y = planted(5000, seed=2, association=0.15)
    utility = np.random.default_rng(2).random(5000) * 0.2
    loose = {"eps_r": 0.03, "eps_a": 0.01}
    result = m4_keep_probabilities(s, y, **loose, utility=utility, solver="exact", on_violation="raise")
    plain = m4_keep_probabilities(s, y, **loose, solver="exact", on_violation="raise")
    assert result.feasible
    assert np.corrcoef(result.q - plain.q, utility)[0, 1] > 0.5


def test_infeasible_request_names_the_failing_constraint():
    s, y = planted(5000, seed=3, skew=0.8)
    with pytest.raises(M4InfeasibleError) as caught:
        m4_keep_probabilities(s, y, **EPS, solver="exact", on_violation="raise",
                              attribute_names=["gender", "age"])
    message = str(caught.value)
    assert "representation E[gender] - pi" in message and "exceeds by" in message
    worst = caught.value.violations[0]
    assert worst.kind == "representation" and worst.excess > 0
    # It got as close as it could: much closer than the data, not worse.
    result = m4_keep_probabilities(s, y, **EPS, solver="exact", on_violation="ignore")
    # Dropping 10% can at best bring E[s0] from 0.80 to (0.80 - 0.10) / 0.90 = 0.778.
    assert np.all(np.abs(result.after.representation) < np.abs(result.before.representation) - 0.015)
    assert np.all(np.abs(result.after.representation) < 0.7 / 0.9 - 0.5 + 0.01)
    # With eta = 1 nothing can be dropped, so the report equals the data's.
    full = m4_keep_probabilities(s, y, eta=1.0, **EPS, on_violation="ignore")
    np.testing.assert_allclose(full.q, 1.0)
    assert len(full.violations) == len(full.before.violations)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"eta": 0.0}, r"eta .* \(0, 1\]"),
    ({"eta": 1.5}, r"eta .* \(0, 1\]"),
    ({"eta": float("nan")}, r"eta"),
    ({"eps_r": -0.01}, r"eps_r must be finite and >= 0"),
    ({"eps_a": -1.0}, r"eps_a must be finite and >= 0"),
    ({"eps_a": np.zeros((3, 3))}, r"eps_a must be a scalar or broadcast"),
    ({"pi": 1.2}, r"pi must be in \[0, 1\]"),
    ({"pi": [0.5, 0.5, 0.5]}, r"pi must be a scalar or have shape \(2,\)"),
    ({"enforcement": 0}, r"enforcement must be > 0"),
    ({"solver": "cvx"}, r"solver must be one of"),
    ({"utility": np.ones(3)}, r"utility must have shape \(100,\)"),
])
def test_bad_parameters_raise_clear_errors(kwargs, match):
    s, y = planted(100)
    with pytest.raises(ValueError, match=match):
        m4_keep_probabilities(s, y, **kwargs)


def test_bad_data_raise_clear_errors():
    s, y = planted(100)
    bad = s.astype(float)
    bad[7, 1] = 0.5
    with pytest.raises(ValueError, match=r"attributes must be binary \(0/1\): column 1 has value 0.5 at row 7"):
        m4_keep_probabilities(bad, y)
    with pytest.raises(ValueError, match="attributes has 100 rows but labels has 99"):
        m4_keep_probabilities(s, y[:99])
    with pytest.raises(ValueError, match="at least one sensitive attribute"):
        m4_keep_probabilities(np.zeros((100, 0)), y)
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict({"gender": s[:, 0].astype(int), "dog": y[:, 0], "cat": y[:, 1]})
    attributes, labels, utility = examples_from_columns(table, ["gender"], ["dog", "cat"])
    np.testing.assert_array_equal(attributes[:, 0], s[:, 0])
    np.testing.assert_array_equal(labels, y[:, :2])
    assert utility is None
    table = {"gender": s[:, 0].astype(int), "dog": y[:, 0], "cat": y[:, 1]}
    with pytest.raises(ValueError, match=r"missing attribute column\(s\) \['age'\]"):
        examples_from_columns(table, ["gender", "age"], ["dog"])
    table["gender"] = table["gender"] * 2
    with pytest.raises(ValueError, match="attribute column 'gender'.*binary"):
        examples_from_columns(table, ["gender"], ["dog", "cat"])


def test_stage_subsample_and_weights_modes(tmp_path):
    rng = np.random.default_rng(0)
    sources = {name: planted(n, seed=i, association=0.15) for i, (name, n) in enumerate({"en": 6000, "fr": 3000, "sw": 1000}.items())}
    keep, pooled = solve_sources(sources, eps_r=0.03, eps_a=0.01, solver="exact")
    assert pooled.feasible
    sizes = {"en": 6000, "fr": 3000, "sw": 1000, "text_only": 500}
    stage = M4(keep, mode="subsample", seed=7)
    plan = Compose([Temperature(1.0), stage]).plan(sizes)
    assert set(plan.example_keep) == {"en", "fr", "sw"}
    for name, mask in plan.example_keep.items():
        assert mask.dtype == np.bool_ and mask.shape == (sizes[name],)
        np.testing.assert_array_equal(mask, M4(keep, seed=7).masks[name])  # deterministic
    kept = {name: plan.example_keep.get(name, np.ones(n, bool)).sum() for name, n in sizes.items()}
    expected = np.array([kept[n] for n in plan.sources], float)
    np.testing.assert_allclose(plan.sample_probs, expected / expected.sum())  # proportional to kept
    # The pooled kept subsample is balanced within sampling error.
    s = np.concatenate([sources[n][0][plan.example_keep[n]] for n in keep])
    y = np.concatenate([sources[n][1][plan.example_keep[n]] for n in keep])
    assert np.abs(m4_statistics(s, y).representation).max() < 0.03 + 4 * 0.5 / np.sqrt(len(s))
    # weights mode: probabilities untouched, per-example weights average to 1 over the pool.
    weighted = M4(keep, mode="weights").plan({k: sizes[k] for k in keep})
    assert weighted.example_keep is None
    pooled_weights = np.concatenate([weighted.example_weights[n] for n in keep])
    assert pooled_weights.mean() == pytest.approx(1.0)
    np.testing.assert_allclose(weighted.sample_probs, [0.6, 0.3, 0.1])
    # Keep file round trip (config route) and errors.
    path = tmp_path / "keep.npz"
    save_keep_probabilities(path, keep)
    loaded = load_keep_probabilities(path)
    assert all(np.array_equal(loaded[n], keep[n]) for n in keep)
    np.testing.assert_array_equal(M4(str(path), seed=7).masks["en"], stage.masks["en"])
    with pytest.raises(ValueError, match=r"unknown source\(s\) \['sw'\]"):
        stage.plan({"en": 6000, "fr": 3000})
    with pytest.raises(ValueError, match="mode must be one of"):
        M4(keep, mode="drop")
    with pytest.raises(ValueError, match="does not exist"):
        M4(str(tmp_path / "missing.npz"))
    with pytest.raises(ValueError, match="must be in \\[0, 1\\]"):
        M4({"en": np.array([0.5, 1.5])})
    del rng


# -- issue 11: the streaming solver never breaks what the data already met ------------------------

def _met_then_broken(result, tolerance=1e-4):
    from pipeline.balance.m4.api import _excess

    problem = result.duals.problem
    met = _excess(result.before, problem) <= tolerance
    return met, met & (_excess(result.after, problem) > tolerance)


def test_streaming_keeps_a_constraint_the_data_met_at_eps_zero(caplog):
    # Attribute s0 is balanced in the data (E[s0] - pi = 0.0000); eps = 0 everywhere makes
    # every other constraint unmeetable, and the streaming duals then traded s0 away
    # (E[s0] - pi = -0.0255 before this guard); the guard re-solves exactly with s0 hard.
    s, y = planted(2000, seed=1, skew=0.5)
    with caplog.at_level("WARNING", logger="pipeline.balance.m4.api"):
        result = m4_keep_probabilities(s, y, eps_r=0.0, eps_a=0.0, batch_size=2048, on_violation="ignore")
    met, broken = _met_then_broken(result)
    assert met[0] and not broken.any()
    assert abs(result.after.representation[0]) <= 1e-4
    assert "broke constraint(s) the data already met: E[s0] - pi" in caplog.text
    assert result.info["guard"]["steps"] == ["exact re-solve with met constraints hard"]
    assert np.isclose(result.q.mean(), 0.9) and result.q.min() >= 0 and result.q.max() <= 1
    uniform = m4_keep_probabilities(s, y, eta=1.0, eps_r=0.0, eps_a=0.0, on_violation="ignore")
    assert result.penalized_objective < uniform.penalized_objective  # still balances the rest


def test_streaming_guard_without_exact_moves_toward_uniform(monkeypatch):
    import pipeline.balance.m4.api as m4

    monkeypatch.setattr(m4, "EXACT_FALLBACK_LIMIT", 0)  # as if N were too large to solve exactly
    s, y = planted(2000, seed=1, skew=0.5)
    result = m4_keep_probabilities(s, y, eps_r=0.0, eps_a=0.0, batch_size=2048, on_violation="ignore")
    met, broken = _met_then_broken(result)
    assert met[0] and not broken.any()
    assert 0 <= result.info["guard"]["t"] < 1
    assert np.isclose(result.q.mean(), 0.9)


def test_streaming_infeasible_request_still_names_the_failing_constraint():
    s, y = planted(5000, seed=3, skew=0.8)
    with pytest.raises(M4InfeasibleError) as caught:
        m4_keep_probabilities(s, y, eps_r=0.0, eps_a=0.0, batch_size=2048, on_violation="raise",
                              attribute_names=["gender", "age"])
    assert "representation E[gender] - pi" in str(caught.value) and "exceeds by" in str(caught.value)
