import numpy as np
import pytest

from pipeline.mixing import Compose, Cooldown, Manual, MixturePlan, OrderMatters, Temperature

SIZES = {"eng": 1000, "fra": 100, "swh": 10}


def test_manual_set_and_multiply():
    plan = Manual({"eng": 2, "fra": 1, "swh": 1}).plan(SIZES)
    np.testing.assert_allclose(plan.sample_probs, [0.5, 0.25, 0.25])
    dropped = Compose([Temperature(2), Manual({"fra": 0}, mode="multiply")]).plan(SIZES)
    assert dropped.prob("fra") == 0 and dropped.sample_probs.sum() == pytest.approx(1)


def test_manual_loss_weights_multiply():
    plan = Compose([Temperature(1), Manual({}, mode="multiply", loss_weights={"swh": 3})]).plan(SIZES)
    assert plan.weight("swh") == 3 and plan.weight("eng") == 1


@pytest.mark.parametrize(
    "weights, message",
    [
        ({"eng": 1, "fra": 1, "swh": float("nan")}, "'swh'"),
        ({"eng": 1, "fra": 1, "swh": -1}, "'swh'"),
        ({"eng": 1, "fra": 1, "swh": 1, "xho": 1}, "unknown source 'xho'"),
        ({"eng": 1, "fra": 1}, "missing for source 'swh'"),
        ({"eng": 0, "fra": 0, "swh": 0}, "all sampling masses are zero"),
    ],
)
def test_manual_bad_weights_raise(weights, message):
    with pytest.raises(ValueError, match=message):
        Manual(weights).plan(SIZES)


def test_order_matters_two_phases():
    stage = OrderMatters(switch_at=0.3, high_resource=["eng"])
    assert stage.plan(SIZES, 0.1).as_dict()["fra"]["prob"] == 0
    assert stage.plan(SIZES, 0.1).prob("eng") == 1
    np.testing.assert_allclose(stage.plan(SIZES, 0.5).sample_probs, [1000 / 1110, 100 / 1110, 10 / 1110])
    by_size = OrderMatters(switch_at=0.3, min_size=100, tau=2).plan(SIZES, 0.0)
    assert by_size.prob("swh") == 0 and by_size.prob("fra") > 0
    with pytest.raises(ValueError, match="unknown source 'xho'"):
        OrderMatters(high_resource=["xho"]).plan(SIZES)


def test_compose_breakpoints_and_type_check():
    stage = Compose([OrderMatters(0.2, min_size=100), Cooldown(5, 1, 0.6)])
    assert stage.breakpoints() == (0.2, 0.6)
    with pytest.raises(ValueError, match="not a MixingStage"):
        Compose([Temperature(1), "upweight"])


def test_plan_rejects_all_zero_and_nan():
    with pytest.raises(ValueError, match="zero"):
        MixturePlan.from_weights(("a", "b"), np.zeros(2))
    with pytest.raises(ValueError, match="'b'"):
        MixturePlan(("a", "b"), np.array([1.0, np.nan]), np.ones(2))
