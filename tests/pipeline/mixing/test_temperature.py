import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.mixing import Proportional, Temperature, temperature_probs

sizes_strategy = st.dictionaries(
    st.text("abcdefghij", min_size=1, max_size=4),
    st.integers(min_value=1, max_value=10**9),
    min_size=1,
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(sizes_strategy, st.floats(min_value=0.05, max_value=1000))
def test_probabilities_sum_to_one_and_are_positive(sizes, tau):
    plan = Temperature(tau).plan(sizes)
    assert plan.sample_probs.sum() == pytest.approx(1.0, abs=1e-12)
    assert (plan.sample_probs >= 0).all()
    assert (plan.loss_weights == 1).all()


@settings(max_examples=100, deadline=None)
@given(sizes_strategy)
def test_tau_one_is_proportional(sizes):
    plan = Temperature(1.0).plan(sizes)
    expected = np.array(list(sizes.values()), dtype=float)
    np.testing.assert_allclose(plan.sample_probs, expected / expected.sum(), rtol=1e-9)
    np.testing.assert_allclose(Proportional().plan(sizes).sample_probs, plan.sample_probs)


@settings(max_examples=100, deadline=None)
@given(sizes_strategy, st.floats(min_value=1.0, max_value=20), st.floats(min_value=1.01, max_value=3))
def test_smallest_share_rises_with_tau(sizes, tau, factor):
    smallest = min(sizes, key=sizes.get)
    low = Temperature(tau).plan(sizes).prob(smallest)
    high = Temperature(tau * factor).plan(sizes).prob(smallest)
    assert high >= low - 1e-12


def test_large_tau_approaches_uniform():
    sizes = {"eng": 10**7, "fra": 10**5, "swh": 10}
    probs = Temperature(1e6).plan(sizes).sample_probs
    np.testing.assert_allclose(probs, 1 / 3, atol=1e-4)


def test_known_values_and_maximum_clip():
    probs = temperature_probs(np.array([100.0, 1.0]), tau=2.0)
    np.testing.assert_allclose(probs, [10 / 11, 1 / 11])
    clipped = Temperature(1.0, maximum=10).plan({"a": 100, "b": 10}).sample_probs
    np.testing.assert_allclose(clipped, [0.5, 0.5])


def test_tiny_tau_does_not_overflow():
    probs = Temperature(1e-3).plan({"a": 10**9, "b": 10**8}).sample_probs
    assert np.isfinite(probs).all() and probs[0] == pytest.approx(1.0)


@pytest.mark.parametrize("tau", [0, -1, float("nan"), float("inf")])
def test_bad_tau_raises(tau):
    with pytest.raises(ValueError, match="tau"):
        Temperature(tau)


@pytest.mark.parametrize(
    "sizes, message",
    [
        ({}, "no sources"),
        ({"eng": 10, "swh": 0}, "'swh' has zero documents"),
        ({"eng": 10, "swh": float("nan")}, "'swh'"),
        ({"eng": 10, "swh": -3}, "'swh'"),
    ],
)
def test_bad_sizes_raise(sizes, message):
    with pytest.raises(ValueError, match=message):
        Temperature(2.0).plan(sizes)


def test_progress_outside_unit_interval_raises():
    with pytest.raises(ValueError, match="progress"):
        Temperature(2.0).plan({"a": 1}, progress=1.5)
