import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pipeline.mixing import UniMax, unimax_allocation


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(1, 10**6), min_size=1, max_size=40),
    st.floats(0.1, 20),
    st.floats(0.01, 1.0),
)
def test_never_exceeds_max_epochs_and_spends_the_budget(sizes, max_epochs, fill):
    sizes = np.array(sizes, dtype=float)
    budget = fill * max_epochs * sizes.sum()
    assume(budget > 0)
    allocation = unimax_allocation(sizes, budget, max_epochs)
    assert (allocation <= sizes * max_epochs * (1 + 1e-9)).all()
    assert allocation.sum() == pytest.approx(budget, rel=1e-9)
    # Uniform where not capped: every uncapped source gets the same, the largest share.
    uncapped = allocation < sizes * max_epochs * (1 - 1e-9)
    if uncapped.any():
        assert np.ptp(allocation[uncapped]) <= 1e-6 * budget
        assert allocation.max() <= allocation[uncapped].max() * (1 + 1e-9)


def test_worked_example():
    # budget 300 over three sources, 1 epoch: small one capped at 10, rest split 145/145.
    plan = UniMax(budget=300, max_epochs=1).plan({"big": 1000, "mid": 200, "small": 10})
    np.testing.assert_allclose(plan.sample_probs, np.array([145, 145, 10]) / 300)


def test_infeasible_budget_raises():
    with pytest.raises(ValueError, match="exceeds max_epochs"):
        UniMax(budget=1000, max_epochs=2).plan({"a": 100, "b": 100})


@pytest.mark.parametrize("kwargs", [{"budget": 0}, {"budget": 10, "max_epochs": 0},
                                    {"budget": float("nan")}])
def test_bad_parameters_raise(kwargs):
    with pytest.raises(ValueError):
        UniMax(**kwargs)
