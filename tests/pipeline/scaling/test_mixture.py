"""Data mixing law fits and the mixture optimiser on synthetic laws with known optima."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.scaling import (
    MixingLaw,
    epoch_caps,
    fit_law,
    mixing_loss_fn,
    optimise_mixture,
    project_capped_simplex,
)

DOMAINS = ["web", "code", "books"]
# Per target domain: c and t (k absorbed, see MixingLaw).
TRUE = [(1.5, [0.8, 1.2, 1.0]), (1.2, [1.1, -0.9, 0.9]), (2.0, [0.5, 0.6, -1.2])]


def _synthetic(n=60, noise=0.003, seed=0):
    rng = np.random.default_rng(seed)
    R = rng.dirichlet(np.ones(3) * 0.8, n)
    law = MixingLaw(DOMAINS)
    ys = []
    for c, t in TRUE:
        p = {"c": c} | {f"t[{d}]": v for d, v in zip(DOMAINS, t, strict=True)}
        ys.append(law.predict_public(p, R) * np.exp(rng.normal(0, noise, n)))
    return law, R, ys


def _simplex_grid(step=0.005):
    k = int(round(1 / step))
    pts = [(i, j, k - i - j) for i in range(k + 1) for j in range(k + 1 - i)]
    return np.array(pts, dtype=float) / k


def test_mixing_law_recovery_and_optimum():
    law, R, ys = _synthetic()
    fits = [fit_law(law, R, y, grid_size=4) for y in ys]
    # c and t trade off along a shallow valley, so check the law, not each parameter.
    grid = _simplex_grid(0.05)
    truth = _true_loss()
    for i, fit in enumerate(fits):
        pred = fit.predict(grid)
        np.testing.assert_allclose(pred, [truth(r)[i] for r in grid], rtol=0.01)
        assert fit.params["c"] == pytest.approx(TRUE[i][0], abs=0.3)
    # The optimiser finds the optimum of the (fitted) law: compare with a dense simplex grid.
    v = np.array([1.0, 2.0, 0.5])
    loss = mixing_loss_fn(fits)
    res = optimise_mixture(loss, 3, target_weights=v, num_starts=6)
    grid = _simplex_grid()
    vals = np.array([v @ loss(r) for r in grid])
    assert res.objective <= vals.min() + 1e-9
    np.testing.assert_allclose(res.r, grid[np.argmin(vals)], atol=0.01)
    assert res.violation < 1e-9
    # ... and that optimum is the true law's optimum (to grid resolution).
    true_fits_loss = _true_loss()
    true_vals = np.array([v @ true_fits_loss(r) for r in grid])
    np.testing.assert_allclose(res.r, grid[np.argmin(true_vals)], atol=0.03)


def _true_loss():
    def loss(r):
        return np.array([c + np.exp(np.dot(t, r)) for c, t in TRUE])

    return loss


def test_epoch_caps_bind_and_infeasible_caps_raise():
    loss = _true_loss()
    v = np.array([1.0, 2.0, 0.5])
    free = optimise_mixture(loss, 3, target_weights=v)
    j = int(np.argmax(free.r))
    caps = np.ones(3)
    caps[j] = free.r[j] / 2
    capped = optimise_mixture(loss, 3, target_weights=v, caps=caps)
    assert capped.r[j] == pytest.approx(caps[j], abs=1e-7)
    assert j in capped.at_cap
    assert capped.objective >= free.objective - 1e-12
    # brute force over the capped simplex
    grid = _simplex_grid()
    grid = grid[np.all(grid <= caps + 1e-12, axis=1)]
    assert capped.objective <= min(v @ loss(r) for r in grid) + 1e-9
    with pytest.raises(ValueError, match="infeasible"):
        optimise_mixture(loss, 3, caps=[0.3, 0.3, 0.3])


def test_epoch_caps_arithmetic():
    caps = epoch_caps(tokens=[1e9, 1e8, 5e10], budget=1e10, max_epochs=4)
    np.testing.assert_allclose(caps, [0.4, 0.04, 1.0])
    with pytest.raises(ValueError, match=r"tokens\[1\]"):
        epoch_caps([1.0, -1.0], 10.0, 1)


@settings(max_examples=50, deadline=None)
@given(
    v=st.lists(st.floats(-3, 3), min_size=4, max_size=4),
    caps=st.lists(st.floats(0.05, 1.0), min_size=4, max_size=4),
)
def test_projection_lands_on_the_capped_simplex(v, caps):
    caps = np.array(caps)
    if caps.sum() < 1:
        caps = caps / caps.sum()
    r = project_capped_simplex(np.array(v), caps)
    assert r.sum() == pytest.approx(1.0, abs=1e-9)
    assert np.all(r >= 0) and np.all(r <= caps + 1e-12)
    # It is the closest such point: no feasible pairwise move gets closer.
    for i, j in itertools.permutations(range(4), 2):
        eps = min(1e-3, r[i], caps[j] - r[j])
        if eps > 1e-9:
            moved = r.copy()
            moved[i] -= eps
            moved[j] += eps
            assert np.sum((moved - v) ** 2) >= np.sum((r - v) ** 2) - 1e-12


def test_mixing_law_input_validation():
    law = MixingLaw(DOMAINS)
    with pytest.raises(ValueError, match="sum to 1"):
        law.check_inputs(np.array([[0.5, 0.1, 0.1]]))
    with pytest.raises(ValueError, match=r"r\[code\]"):
        law.check_inputs(np.array([[0.6, -0.1, 0.5]]))
