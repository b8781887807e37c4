from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.mixing import Compose, Cooldown, Temperature

SIZES = {"eng": 69_000, "fra": 1_000, "swh": 400, "kab": 104}


@settings(max_examples=100, deadline=None)
@given(
    st.floats(0.2, 20), st.floats(0.2, 20), st.floats(0.05, 0.95), st.floats(0, 1),
    st.sampled_from(["step", "linear", "cosine"]),
)
def test_equals_tau_start_before_switch(tau_start, tau_end, switch_at, fraction, shape):
    stage = Cooldown(tau_start, tau_end, switch_at, shape=shape)
    progress = fraction * switch_at * 0.999
    np.testing.assert_allclose(
        stage.plan(SIZES, progress).sample_probs, Temperature(tau_start).plan(SIZES).sample_probs
    )


@settings(max_examples=100, deadline=None)
@given(st.floats(0.2, 20), st.floats(0.2, 20), st.floats(0.05, 0.95), st.floats(0, 1))
def test_step_equals_tau_end_after_switch(tau_start, tau_end, switch_at, fraction):
    stage = Cooldown(tau_start, tau_end, switch_at)
    progress = switch_at + fraction * (1 - switch_at)
    np.testing.assert_allclose(
        stage.plan(SIZES, progress).sample_probs, Temperature(tau_end).plan(SIZES).sample_probs
    )


def test_defaults_are_the_papers_schedule():
    stage = Cooldown()
    assert (stage.tau_start, stage.tau_end, stage.switch_at, stage.shape) == (5.0, 1.0, 0.5, "step")
    assert stage.tau_at(0.49) == 5.0 and stage.tau_at(0.5) == 1.0
    assert stage.breakpoints() == (0.5,)


def test_linear_and_cosine_ramps_reach_tau_end():
    linear = Cooldown(5, 1, 0.5, shape="linear")
    cosine = Cooldown(5, 1, 0.5, shape="cosine")
    assert linear.tau_at(0.75) == pytest.approx(3.0)
    assert cosine.tau_at(0.75) == pytest.approx(3.0)
    assert cosine.tau_at(0.6) > linear.tau_at(0.6)  # cosine leaves tau_start slowly
    assert linear.tau_at(1.0) == pytest.approx(1.0) and cosine.tau_at(1.0) == pytest.approx(1.0)
    # The rare source's share falls monotonically over the ramp.
    shares = [linear.plan(SIZES, p).prob("kab") for p in np.linspace(0, 1, 21)]
    assert all(a >= b - 1e-12 for a, b in pairwise(shares))


def test_composes_inside_compose():
    plan = Compose([Cooldown()]).plan(SIZES, 0.1)
    np.testing.assert_allclose(plan.sample_probs, Temperature(5).plan(SIZES).sample_probs)


@pytest.mark.parametrize(
    "kwargs, key",
    [({"tau_start": 0}, "tau_start"), ({"tau_end": -1}, "tau_end"), ({"switch_at": 1.5}, "switch_at"),
     ({"shape": "exp"}, "shape"), ({"shape": "linear", "switch_at": 1.0}, "ramp")],
)
def test_bad_parameters_raise(kwargs, key):
    with pytest.raises(ValueError, match=key):
        Cooldown(**kwargs)
