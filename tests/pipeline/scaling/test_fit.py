"""Fitting: recovery inside bootstrap intervals, Huber vs outliers, multi-start vs local minima."""

import numpy as np
import pytest

from pipeline.scaling import ChinchillaLaw, MultilingualLaw, PowerLaw, bootstrap, fit_law, objective
from pipeline.scaling.fit import _run_starts
from pipeline.scaling.lbfgs import batched_lbfgs

TRUE = {"A": 400.0, "B": 2000.0, "E": 1.7, "alpha": 0.34, "beta": 0.36}


def _chinchilla_data(n=150, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    N = np.exp(rng.uniform(np.log(5e7), np.log(1e10), n))
    D = np.exp(rng.uniform(np.log(1e9), np.log(3e11), n))
    X = np.c_[N, D]
    y = ChinchillaLaw().predict_public(TRUE, X) * np.exp(rng.normal(0, noise, n))
    return X, y


def test_recovers_known_parameters_inside_bootstrap_intervals():
    X, y = _chinchilla_data()
    law = ChinchillaLaw()
    fit = fit_law(law, X, y, grid_size=3)
    boot = bootstrap(fit, X, y, num_boot=60, seed=0, n_jobs=1)
    for name, true in TRUE.items():
        lo, hi = boot.ci[name]
        assert lo <= true <= hi, (name, true, lo, hi)
        assert lo <= fit.params[name] <= hi
    # The intervals say something: exponents pinned to +-0.1, E to +-0.2.
    assert boot.ci["alpha"][1] - boot.ci["alpha"][0] < 0.1
    assert boot.ci["beta"][1] - boot.ci["beta"][0] < 0.1
    assert boot.ci["E"][1] - boot.ci["E"][0] < 0.2
    # The fit is at least as good as the truth on its own objective.
    assert fit.objective <= objective(law, law.from_public(TRUE), X, y) + 1e-12


def test_bootstrap_is_deterministic_and_independent_of_jobs():
    X, y = _chinchilla_data(n=60)
    fit = fit_law(ChinchillaLaw(), X, y, grid_size=2)
    a = bootstrap(fit, X, y, num_boot=8, seed=3, n_jobs=1)
    b = bootstrap(fit, X, y, num_boot=8, seed=3, n_jobs=2)
    np.testing.assert_allclose(a.samples, b.samples, rtol=1e-10)
    c = bootstrap(fit, X, y, num_boot=8, seed=4, n_jobs=1)
    assert not np.allclose(a.samples, c.samples)


def test_huber_resists_five_percent_outliers_least_squares_does_not():
    X, y = _chinchilla_data(n=200, noise=0.005, seed=1)
    rng = np.random.default_rng(7)
    bad = rng.choice(len(y), size=10, replace=False)  # 5%
    y_out = y.copy()
    y_out[bad] *= rng.uniform(1.3, 1.8, size=10)  # diverged / mis-logged runs
    law = ChinchillaLaw()
    huber = fit_law(law, X, y_out, grid_size=3, delta=1e-3)
    lsq = fit_law(law, X, y_out, grid_size=3, delta=1e6)  # Huber with huge delta = least squares
    clean = ~np.isin(np.arange(len(y)), bad)
    truth = law.predict_public(TRUE, X)

    def err(fit):
        return float(np.max(np.abs(np.log(fit.predict(X[clean])) - np.log(truth[clean]))))

    assert err(huber) < 0.01
    assert err(lsq) > 3 * err(huber)
    assert abs(huber.params["E"] - TRUE["E"]) < 0.1
    assert abs(lsq.params["E"] - TRUE["E"]) > abs(huber.params["E"] - TRUE["E"])
    # ... and the true parameters stay inside the Huber fit's bootstrap intervals.
    boot = bootstrap(huber, X, y_out, num_boot=60, seed=0, n_jobs=1)
    for name, true in TRUE.items():
        lo, hi = boot.ci[name]
        assert lo <= true <= hi, (name, true, lo, hi)


def test_multi_start_beats_a_single_start_stuck_in_a_local_minimum():
    """From A=1, alpha=1 the N term is negligible and its gradient vanishes: L-BFGS-B converges
    (success) to a minimum that explains the data with the D term alone."""
    X, y = _chinchilla_data(n=120)
    law = ChinchillaLaw()
    single = _run_starts(
        law, X, y, 1e-3, np.array([[0.0, 12.5, 0.0, 1.0, 1.0]]), 1000, 1e-12, 1e-9
    )[0]
    grid = fit_law(law, X, y, grid_size=3)
    assert single.success
    assert single.fun > 5 * grid.objective
    assert abs(grid.params["alpha"] - TRUE["alpha"]) < 0.05
    assert grid.num_converged >= 0.9 * grid.num_starts


def test_batched_engine_matches_scipy_engine():
    X, y = _chinchilla_data(n=80, seed=5)
    law = ChinchillaLaw()
    starts = law.from_public(TRUE)[None, :] + np.array(
        [[0, 0, 0, 0, 0], [2, -2, 0.3, 0.1, -0.1], [-1, 1, -0.5, -0.05, 0.05]]
    )
    a = fit_law(law, X, y, starts=starts, method="batched", polish=0)
    b = fit_law(law, X, y, starts=starts, method="scipy")
    assert a.objective == pytest.approx(b.objective, rel=1e-6)
    np.testing.assert_allclose(a.start_objectives, b.start_objectives, rtol=1e-4)


def test_batched_lbfgs_rosenbrock_with_bounds():
    def fg(x, ids):
        a, b = x[:, 0], x[:, 1]
        f = (1 - a) ** 2 + 100 * (b - a * a) ** 2
        g = np.stack([-2 * (1 - a) - 400 * a * (b - a * a), 200 * (b - a * a)], axis=1)
        return f, g

    x0 = np.array([[-1.2, 1.0], [2.0, 2.0], [0.0, 0.0]])
    res = batched_lbfgs(fg, x0, np.array([-5.0, -5.0]), np.array([5.0, 5.0]), gtol=1e-10)
    np.testing.assert_allclose(res.x, 1.0, atol=1e-5)
    # An active bound: the minimum over a <= 0.5 is at a = 0.5, b = 0.25.
    res = batched_lbfgs(fg, x0, np.array([-5.0, -5.0]), np.array([0.5, 5.0]), gtol=1e-10)
    np.testing.assert_allclose(res.x, [[0.5, 0.25]] * 3, atol=1e-5)
    assert res.converged.all()


def test_power_law_recovery():
    rng = np.random.default_rng(2)
    x = np.geomspace(1e6, 1e10, 40)
    true = {"A": 50.0, "alpha": 0.25, "E": 2.0}
    y = PowerLaw().predict_public(true, x[:, None]) * np.exp(rng.normal(0, 0.002, 40))
    fit = fit_law(PowerLaw(), x[:, None], y, grid_size=4)
    assert fit.params["alpha"] == pytest.approx(0.25, abs=0.02)
    assert fit.params["E"] == pytest.approx(2.0, abs=0.05)
    assert fit.at_bounds() == {}


def test_undetermined_offset_is_reported_at_its_bound():
    # A pure power law has no floor: the offset E runs to its lower bound, and says so.
    x = np.geomspace(1e3, 1e6, 20)
    y = 30.0 * x**-0.2
    fit = fit_law(PowerLaw(), x[:, None], y, grid_size=3)
    assert fit.at_bounds() == {"e": "lower"}
    assert fit.to_dict()["at_bounds"] == {"e": "lower"}
    assert fit.params["alpha"] == pytest.approx(0.2, abs=1e-3)


def test_multilingual_recovery():
    law = MultilingualLaw(["en", "sw", "yo"])
    true = {"alpha": 0.3}
    for s, (b, g, li) in zip(
        law.sources, [(20, 0.2, 1.5), (30, 0.6, 2.0), (25, 0.9, 2.2)], strict=True
    ):
        true.update({f"beta[{s}]": b, f"gamma[{s}]": g, f"L_inf[{s}]": li})
    rows = [
        (n, w[i], i)
        for n in (1e7, 3e7, 1e8, 3e8, 1e9, 3e9)
        for w in ((0.6, 0.3, 0.1), (0.8, 0.15, 0.05), (0.34, 0.33, 0.33), (0.1, 0.3, 0.6))
        for i in range(3)
    ]
    X = np.array(rows, dtype=float)
    rng = np.random.default_rng(0)
    y = law.predict_public(true, X) * np.exp(rng.normal(0, 0.002, len(X)))
    fit = fit_law(law, X, y, grid_size=2)
    assert fit.params["alpha"] == pytest.approx(0.3, abs=0.05)
    for s, g in zip(law.sources, (0.2, 0.6, 0.9), strict=True):
        assert fit.params[f"gamma[{s}]"] == pytest.approx(g, abs=0.1)
    assert fit.params["L_inf[yo]"] == pytest.approx(2.2, abs=0.1)


@pytest.mark.parametrize(
    ("X", "y", "match"),
    [
        (
            np.array([[1e8, 1e9], [-1.0, 1e9]] + [[1e8, 1e9]] * 8),
            np.full(10, 3.0),
            "'N' must be > 0",
        ),
        (
            np.array([[1e8, 1e9], [1e8, 0.0]] + [[1e8, 1e9]] * 8),
            np.full(10, 3.0),
            "'D' must be > 0",
        ),
        (np.array([[1e8, 1e9]] * 10), np.r_[3.0, np.nan, np.full(8, 3.0)], "loss must be finite"),
        (np.array([[1e8, 1e9]] * 4), np.full(4, 3.0), "needs more than 5 points"),
    ],
)
def test_bad_input_raises(X, y, match):
    with pytest.raises(ValueError, match=match):
        fit_law(ChinchillaLaw(), X, y, grid_size=1)


def test_bad_delta_and_method():
    X, y = _chinchilla_data(n=20)
    with pytest.raises(ValueError, match="delta"):
        fit_law(ChinchillaLaw(), X, y, delta=0.0)
    with pytest.raises(ValueError, match="method"):
        fit_law(ChinchillaLaw(), X, y, grid_size=1, method="nelder")


# -- issue 11: parameters the data do not determine are flagged --------------------------------

def test_identical_points_leave_every_parameter_not_determined():
    from pipeline.scaling import undetermined_parameters

    X, y = np.full((4, 1), 1000.0), np.full(4, 3.2)
    fit = fit_law(PowerLaw(), X, y, grid_size=3)
    boot = bootstrap(fit, X, y, num_boot=20, seed=0, n_jobs=1)
    assert all(hi - lo == 0 for lo, hi in boot.ci.values())  # zero width: it looks "precise"
    flagged = undetermined_parameters(fit, X, y, boot)
    assert list(flagged) == ["A", "alpha", "E"]
    assert all(r.startswith("not determined: degenerate design (1 distinct input point") for r in flagged.values())


def test_a_well_posed_fit_has_nothing_flagged():
    from pipeline.scaling import undetermined_parameters

    X, y = _chinchilla_data(n=60)
    fit = fit_law(ChinchillaLaw(), X, y, grid_size=2)
    boot = bootstrap(fit, X, y, num_boot=20, seed=0, n_jobs=1)
    assert undetermined_parameters(fit, X, y, boot) == {}


def test_a_constant_second_input_leaves_its_terms_not_determined():
    # Chinchilla with one data size D for every run: B and beta only act through B / D^beta.
    from pipeline.scaling import undetermined_parameters

    X, y = _chinchilla_data(n=40)
    X[:, 1] = 1e10
    y = ChinchillaLaw().predict_public(TRUE, X)
    fit = fit_law(ChinchillaLaw(), X, y, grid_size=2)
    flagged = undetermined_parameters(fit, X, y)
    assert {"B", "beta"} <= set(flagged) and "alpha" not in flagged
