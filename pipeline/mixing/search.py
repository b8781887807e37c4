"""Candidate mixtures for a mixture search (RegMix, Liu et al. 2024; Ye et al. 2024): pure, seeded.

A search trains small proxy models on K random mixtures, fits a law from mixture to loss and
optimises it (`pipeline/cli/search_mixture.py`). This module draws the K mixtures:

    r_k ~ Dirichlet(concentration * prior),  then  r_k <- capped(r_k)

over *domains*: single sources, or named groups of sources (`group_domains`) whose mass is
split inside the group in proportion to size (`expand_to_sources`). The prior defaults to
temperature sampling over the domain sizes (p_i ~ n_i^(1/tau)); a larger concentration keeps
the draws nearer the prior. With a budget, each domain's probability is capped at
``max_epochs * size_i / budget`` (so a small domain is not repeated more than `max_epochs`
times in the planned run) and the mass above a cap is given to the uncapped domains in
proportion to their draw (water-filling, repeated until no cap is exceeded).

Everything counts draws (documents or examples), like `Manual` weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from pipeline.mixing.plan import validate_sizes
from pipeline.mixing.temperature import temperature_probs

__all__ = [
    "apply_caps",
    "check_num_mixtures",
    "draw_mixtures",
    "epoch_caps",
    "expand_to_sources",
    "group_domains",
    "law_parameters",
    "min_mixtures",
    "prior_probs",
]


def law_parameters(num_domains: int) -> int:
    """Parameters per target of the laws a search fits: the data mixing law has c and one
    t per domain (1 + M); the linear regressions have M (no intercept on the simplex)."""
    return int(num_domains) + 1


def min_mixtures(num_domains: int, num_held_out: int = 0) -> int:
    """The smallest K a search can fit: more proxies than the law's 1 + M parameters (a fit
    needs more points than parameters), plus the held-out ones."""
    return law_parameters(num_domains) + 1 + int(num_held_out)


def check_num_mixtures(num_mixtures: int, num_domains: int, num_held_out: int = 0) -> None:
    """K must fit the law (1 + M parameters per target, more points than that) after holding
    out `num_held_out` proxies.

    Raises:
        ValueError: K too small (the message gives the smallest K that works).
    """
    if isinstance(num_mixtures, bool) or not isinstance(num_mixtures, int | np.integer):
        raise ValueError(f"number of mixtures K must be an integer, got {num_mixtures!r}")
    if num_held_out < 0:
        raise ValueError(f"held-out proxies must be >= 0, got {num_held_out}")
    need = min_mixtures(num_domains, num_held_out)
    if num_mixtures < need:
        raise ValueError(
            f"K={num_mixtures} mixtures is too few: the mixing law has {law_parameters(num_domains)} parameters "
            f"per target over {num_domains} domains (a fit needs more proxies than that) and {num_held_out} "
            f"proxies are held out, so K >= {need}")


def group_domains(sources: Sequence[str], groups: Mapping[str, Sequence[str]] | None,
                  rest: str = "rest") -> dict[str, list[str]]:
    """{domain: member sources}. No groups: one domain per source. Groups: each group is a
    domain, and the sources no group names form one more domain called `rest`.

    Raises:
        ValueError: a group naming an unknown source, a source in two groups, an empty group,
            or a group called like the `rest` domain while sources are left over.
    """
    sources = list(sources)
    if not groups:
        return {name: [name] for name in sources}
    known, seen, domains = set(sources), {}, {}
    for name, members in groups.items():
        members = list(members)
        if not members:
            raise ValueError(f"group {name!r} has no sources")
        for source in members:
            if source not in known:
                raise ValueError(f"group {name!r} names unknown source {source!r}; sources are {sources}")
            if source in seen:
                raise ValueError(f"source {source!r} is in group {seen[source]!r} and in group {name!r}")
            seen[source] = name
        domains[str(name)] = members
    left = [s for s in sources if s not in seen]
    if left:
        if rest in domains:
            raise ValueError(f"group {rest!r} is also the name of the leftover sources' domain {left}; rename it")
        domains[rest] = left
    return domains


def expand_to_sources(domain_probs: Mapping[str, float], domains: Mapping[str, Sequence[str]],
                      sizes: Mapping[str, float]) -> dict[str, float]:
    """{source: probability}: each domain's probability split over its sources in proportion to size."""
    out = {}
    for domain, members in domains.items():
        total = sum(float(sizes[s]) for s in members)
        for source in members:
            out[source] = float(domain_probs[domain]) * float(sizes[source]) / total
    return out


def prior_probs(sizes: Mapping[str, float], prior: Mapping[str, float] | None = None,
                tau: float = 1.0) -> np.ndarray:
    """(M,) prior over the domains of `sizes` (in their order): `prior` normalised, or
    temperature sampling p_i ~ size_i^(1/tau) when `prior` is None.

    Raises:
        ValueError: a prior naming an unknown domain or missing one, a negative or
            non-finite mass, masses summing to 0, or a bad tau.
    """
    names, array = validate_sizes(sizes)
    if prior is None:
        return temperature_probs(array, tau)
    unknown = sorted(set(prior) - set(names))
    if unknown:
        raise ValueError(f"prior names unknown source/domain {unknown[0]!r}; domains are {list(names)}")
    missing = [n for n in names if n not in prior]
    if missing:
        raise ValueError(f"prior has no mass for domain {missing[0]!r}; give every domain of {list(names)}")
    masses = np.array([float(prior[n]) for n in names])
    for name, mass in zip(names, masses, strict=True):
        if not math.isfinite(mass) or mass < 0:
            raise ValueError(f"prior mass for {name!r} must be finite and >= 0, got {float(mass)!r}")
    if masses.sum() <= 0:
        raise ValueError("prior masses sum to 0")
    return masses / masses.sum()


def epoch_caps(sizes: np.ndarray, budget: float, max_epochs: float) -> np.ndarray:
    """(M,) caps ``min(1, max_epochs * size_i / budget)`` (all in draws).

    Raises:
        ValueError: budget or max_epochs not finite and > 0, or caps summing to < 1
            (no mixture spends the budget without passing over some domain too often).
    """
    budget, max_epochs = float(budget), float(max_epochs)
    if not (math.isfinite(budget) and budget > 0):
        raise ValueError(f"budget must be a finite number > 0, got {budget!r}")
    if not (math.isfinite(max_epochs) and max_epochs > 0):
        raise ValueError(f"max_epochs must be a finite number > 0, got {max_epochs!r}")
    caps = np.minimum(max_epochs * np.asarray(sizes, dtype=float) / budget, 1.0)
    if caps.sum() < 1.0 - 1e-12:
        raise ValueError(
            f"budget {budget:g} exceeds max_epochs={max_epochs:g} passes over all data "
            f"({max_epochs * float(np.sum(sizes)):g}); raise max_epochs or lower the budget")
    return caps


def apply_caps(probs: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """`probs` with every p_i <= cap_i: capped entries fixed at their cap, the rest renormalised
    to the remaining mass in proportion to their values (by remaining room when they are all
    zero), repeated until nothing exceeds its cap. Requires ``sum(caps) >= 1``."""
    p = np.asarray(probs, dtype=float).copy()
    caps = np.asarray(caps, dtype=float)
    fixed = np.zeros(len(p), dtype=bool)
    for _ in range(len(p) + 1):
        over = (p > caps * (1 + 1e-12)) & ~fixed
        if not over.any():
            break
        fixed |= over
        p[fixed] = caps[fixed]
        free = ~fixed
        remaining = 1.0 - p[fixed].sum()
        mass = p[free].sum()
        if mass > 0:
            p[free] *= remaining / mass
        else:  # everything free drew ~0: spread by the room left under each cap
            room = caps[free]
            p[free] = remaining * room / room.sum()
    assert np.all(p <= caps * (1 + 1e-9)) and abs(p.sum() - 1.0) < 1e-9, (p, caps)
    return p


def draw_mixtures(sizes: Mapping[str, float], num_mixtures: int, *, seed: int,
                  prior: Mapping[str, float] | None = None, tau: float = 1.0,
                  concentration: float | None = None, budget: float | None = None,
                  max_epochs: float | None = None, num_held_out: int = 0) -> np.ndarray:
    """(K, M) candidate mixtures over the domains of `sizes` (in their order), rows summing to 1.

    Args:
        sizes: {domain: size in draws}, > 0.
        num_mixtures: K; more than the law's parameters (1 + M), plus `num_held_out`.
        seed: the draws are a function of (seed, arguments) only.
        prior: {domain: mass} the draws centre on; None: temperature sampling at `tau`.
        tau: temperature of the default prior.
        concentration: Dirichlet concentration (sum of its parameters), > 0; None: M.
        budget, max_epochs: both or neither; caps p_i <= max_epochs * size_i / budget.
        num_held_out: proxies the search holds out to measure the fits (only for the check on K).

    Raises:
        ValueError: K too small, a bad prior (unknown or missing domain), a non-positive
            concentration, tau, budget or max_epochs, or caps that cannot sum to 1.
    """
    names, array = validate_sizes(sizes)
    check_num_mixtures(num_mixtures, len(names), num_held_out)
    p0 = prior_probs(sizes, prior, tau)
    alpha_total = float(len(names) if concentration is None else concentration)
    if not (math.isfinite(alpha_total) and alpha_total > 0):
        raise ValueError(f"Dirichlet concentration must be a finite number > 0, got {concentration!r}")
    if (budget is None) != (max_epochs is None):
        raise ValueError("epoch caps need both budget and max_epochs (or neither)")
    caps = None if budget is None else epoch_caps(array, budget, max_epochs)
    # A zero prior mass would be a zero Dirichlet parameter (undefined): such domains stay at 0.
    support = p0 > 0
    alpha = alpha_total * p0[support]
    rng = np.random.default_rng(seed)
    draws = np.zeros((num_mixtures, len(names)))
    for k in range(num_mixtures):
        r = rng.dirichlet(alpha) if support.sum() > 1 else np.ones(1)
        if not np.all(np.isfinite(r)) or r.sum() <= 0:  # extreme concentrations: fall back to the prior
            r = p0[support]
        row = np.zeros(len(names))
        row[support] = r / r.sum()
        draws[k] = row if caps is None else apply_caps(row, caps)
    return draws
