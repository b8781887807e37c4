"""Laws: closed-form Jacobians match finite differences, batch == single, public round trip."""

import numpy as np
import pytest

from pipeline.scaling import ChinchillaLaw, MixingLaw, MultilingualLaw, PowerLaw, law_from_spec


def _cases():
    rng = np.random.default_rng(0)
    n = 23
    yield PowerLaw(), np.exp(rng.uniform(10, 20, (n, 1))), np.array([5.0, 0.4, 0.3])
    yield (
        ChinchillaLaw(),
        np.exp(np.c_[rng.uniform(17, 23, n), rng.uniform(20, 26, n)]),
        np.array([6.0, 7.5, 0.5, 0.34, 0.28]),
    )
    ml = MultilingualLaw(["en", "sw"])
    Xm = np.c_[np.exp(rng.uniform(15, 21, n)), rng.uniform(0.05, 1, n), rng.integers(0, 2, n)]
    yield ml, Xm, np.array([0.3, 3.0, 0.4, 0.5, 2.5, 0.8, 0.7])
    mx = MixingLaw(["a", "b", "c"])
    yield mx, rng.dirichlet(np.ones(3), n), np.array([0.2, 0.5, -1.0, 1.5])


@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: c[0].name)
def test_jacobian_matches_finite_differences(case):
    law, X, theta = case
    X, _ = law.check_inputs(X)
    lp, jac = law.log_predict_and_jac(theta, X)
    assert np.allclose(lp, law.log_predict(theta, X))
    eps = 1e-6
    for j in range(law.num_params):
        tp, tm = theta.copy(), theta.copy()
        tp[j] += eps
        tm[j] -= eps
        fd = (law.log_predict(tp, X) - law.log_predict(tm, X)) / (2 * eps)
        np.testing.assert_allclose(jac[:, j], fd, rtol=1e-5, atol=1e-7, err_msg=law.theta_names[j])
    # batch == single
    thetas = np.stack([theta, theta + 0.01])
    lpb, jacb = law.log_predict_and_jac_batch(thetas, X)
    np.testing.assert_allclose(lpb[0], lp, rtol=1e-12)
    np.testing.assert_allclose(jacb[0], jac, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lpb[1], law.log_predict(theta + 0.01, X), rtol=1e-12)
    # public round trip and spec round trip
    np.testing.assert_allclose(law.from_public(law.to_public(theta)), theta, rtol=1e-12)
    assert law_from_spec(law.spec()).theta_names == law.theta_names


def test_chinchilla_prediction_is_the_formula():
    law = ChinchillaLaw()
    p = {"A": 406.4, "B": 410.7, "E": 1.69, "alpha": 0.34, "beta": 0.28}
    N, D = 7e10, 1.4e12
    expected = 1.69 + 406.4 / N**0.34 + 410.7 / D**0.28
    assert law.predict_public(p, np.array([[N, D]]))[0] == pytest.approx(expected, rel=1e-12)


def test_multilingual_weight_changes_only_the_factor():
    """Fernandes et al.: at fixed weight, L - L_inf is a power law in N with the shared alpha."""
    law = MultilingualLaw(["en", "yo"])
    p = {
        "alpha": 0.3,
        "beta[en]": 20,
        "gamma[en]": 0.2,
        "L_inf[en]": 1.5,
        "beta[yo]": 25,
        "gamma[yo]": 0.9,
        "L_inf[yo]": 2.2,
    }
    Ns = np.array([1e7, 1e9])
    for w in (0.05, 0.5, 1.0):
        X = np.c_[Ns, np.full(2, w), np.ones(2)]
        red = law.predict_public(p, X) - 2.2
        slope = np.log(red[1] / red[0]) / np.log(Ns[1] / Ns[0])
        assert slope == pytest.approx(-0.3, rel=1e-9)


def test_init_grid_size():
    law = ChinchillaLaw()
    X = np.array([[1e8, 1e9]] * 10)
    assert law.init_grid(4, X, np.ones(10)).shape == (4**5, 5)
    with pytest.raises(ValueError, match="grid size"):
        law.init_grid(0, X, np.ones(10))
