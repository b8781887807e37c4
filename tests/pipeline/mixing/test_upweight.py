"""Upweighting: same full-batch objective as temperature sampling, no lower variance."""

import numpy as np
import pytest

from pipeline.mixing import Compose, Cooldown, Temperature, Upweight


def _toy_problem(seed: int, sizes: dict[str, int], dim: int = 4):
    """Per-source least-squares data; returns per-example gradient arrays at a fixed theta."""
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=dim)
    grads = {}
    for k, (name, n) in enumerate(sizes.items()):
        x = rng.normal(size=(n, dim))
        y = x @ rng.normal(loc=k, size=dim) + rng.normal(size=n)  # sources disagree
        grads[name] = 2 * (x @ theta - y)[:, None] * x  # (n, dim) per-example gradients
    return grads


SIZES = {"eng": 2000, "fra": 300, "swh": 40, "kab": 7}


@pytest.mark.parametrize("tau", [2.0, 5.0, 100.0])
def test_full_batch_gradient_equals_temperature_sampling(tau):
    grads = _toy_problem(0, SIZES)
    sampled = Temperature(tau).plan(SIZES)
    upweighted = Upweight(tau=tau).plan(SIZES)
    mean_grad = {name: g.mean(0) for name, g in grads.items()}
    full_sampled = sum(sampled.prob(s) * sampled.weight(s) * mean_grad[s] for s in SIZES)
    full_upweighted = sum(upweighted.prob(s) * upweighted.weight(s) * mean_grad[s] for s in SIZES)
    np.testing.assert_allclose(full_upweighted, full_sampled, rtol=1e-10, atol=1e-12)
    # Sampling stays proportional and the mean loss weight stays 1.
    total = sum(SIZES.values())
    np.testing.assert_allclose(upweighted.sample_probs, [n / total for n in SIZES.values()])
    assert upweighted.expected_loss_weight() == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("tau", [2.0, 5.0])
def test_minibatch_gradient_variance_is_not_lower(seed, tau):
    """Exact single-example estimator variance (trace of covariance), no Monte Carlo."""
    grads = _toy_problem(seed, SIZES)

    def variance(plan):
        second, first = 0.0, 0.0
        for name, g in grads.items():
            scaled = plan.weight(name) * g
            second += plan.prob(name) * (scaled**2).sum(1).mean()
            first = first + plan.prob(name) * scaled.mean(0)
        return second - (first**2).sum()

    assert variance(Upweight(tau=tau).plan(SIZES)) >= variance(Temperature(tau).plan(SIZES))


def test_upweight_follows_the_schedule_to_its_left():
    stage = Compose([Cooldown(5, 1, 0.5), Upweight()])
    early, late = stage.plan(SIZES, 0.2), stage.plan(SIZES, 0.8)
    target = Temperature(5).plan(SIZES).sample_probs
    np.testing.assert_allclose(early.sample_probs * early.loss_weights, target)
    np.testing.assert_allclose(late.loss_weights, 1.0)  # after cooldown: plain proportional
    np.testing.assert_allclose(early.sample_probs, late.sample_probs)


def test_upweight_alone_without_tau_raises():
    with pytest.raises(ValueError, match="first stage"):
        Upweight().plan(SIZES)
