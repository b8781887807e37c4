"""Compute-optimal allocation: closed form == numeric; known Chinchilla numbers."""

import numpy as np
import pytest

from pipeline.scaling import ChinchillaLaw, chinchilla_optimal, compute_optimal_numeric, frontier

P = {"A": 406.4, "B": 410.7, "E": 1.69, "alpha": 0.34, "beta": 0.28}  # Hoffmann et al. eq. 10


@pytest.mark.parametrize("C", [1e19, 5.76e23, 1e26])
def test_closed_form_matches_numeric(C):
    law = ChinchillaLaw()
    theta = law.from_public(P)
    n, d = chinchilla_optimal(P, C)
    assert 6 * n * d == pytest.approx(C, rel=1e-12)
    nn, dn, _ = compute_optimal_numeric(lambda N, D: law.predict(theta, np.c_[N, D]), C)
    assert nn == pytest.approx(float(n), rel=1e-4)
    assert dn == pytest.approx(float(d), rel=1e-4)


def test_frontier_exponents_and_bands():
    C = np.geomspace(1e20, 1e24, 5)
    fr = frontier([P], C)
    slope = np.diff(np.log(fr["N_opt"])) / np.diff(np.log(C))
    np.testing.assert_allclose(slope, 0.28 / 0.62, rtol=1e-10)  # N_opt ~ C^(beta / (alpha + beta))
    reps = [P] + [P | {"alpha": a} for a in (0.33, 0.34, 0.35, 0.36)]
    fr = frontier(reps, C)
    assert np.all(fr["N_lo"] <= fr["N_opt"] * (1 + 1e-12)) and np.all(fr["N_hi"] >= fr["N_lo"])


def test_bad_budget():
    with pytest.raises(ValueError, match="budget"):
        chinchilla_optimal(P, -1.0)
