"""M4 balancing of image-text training sources (`balance=m4`), before the sampler is built.

Reads the sensitive attributes and labels of every *training* row (the held-out rows are
left alone), solves M4 jointly over the selected sources (`pipeline.balance.m4.solve_sources`),
then applies it as an `M4` mixing stage after the configured mixture's stages, through the
plan like any stage (`pipeline.config.data.build_sampler_for(..., then=stage)`):

* ``mode: subsample`` (the paper's): the stage's seeded Bernoulli(q) masks are the plan's
  ``example_keep``; the sampler draws only kept rows (an index map over each source's kept
  training indices), and the mixing stages see the kept counts as the sources' sizes, so a
  temperature or proportional mixture is computed over the kept data (the stage itself
  leaves the probabilities alone: ``reweight_sources=False``).
* ``mode: weights``: every row stays; the plan's ``example_weights`` (q / mean(q)) multiply
  each row's loss weight in the collator.

The before/after data statistics (every representation and association statistic, kept
fraction, effective sample size, unmet constraints) are logged and returned as the report.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pipeline.data.split import SourceSplit

log = logging.getLogger(__name__)

METHODS = ("none", "m4")
_SOLVER_KEYS = ("eta", "pi", "eps_r", "eps_a", "enforcement", "solver", "batch_size", "passes", "on_violation")


def training_examples(corpus, names: Sequence[str], split: SourceSplit) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{source: (attributes (n_train, m) uint8, labels (n_train, c) uint8)} in training order."""
    out = {}
    for name in names:
        rows = split.train_rows(name, np.arange(split.train[name]))
        table = corpus.dataset(name).select_columns(["attributes", "labels"]).with_format("numpy")
        picked = table[rows.tolist()]
        out[name] = (np.asarray(picked["attributes"], dtype=np.uint8).reshape(len(rows), -1),
                     np.asarray(picked["labels"], dtype=np.uint8).reshape(len(rows), -1))
    return out


def _plain(value: Any) -> Any:
    """OmegaConf lists to Python lists (numpy cannot read ListConfig)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, ListConfig | DictConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _summary(stats) -> dict[str, float]:
    """Every statistic (`M4Statistics.as_dict`) plus the worst representation/association."""
    return {**stats.as_dict(), "max_abs_representation": stats.max_abs_representation,
            "max_abs_association": stats.max_abs_association, "kept_fraction": stats.kept_fraction}


def balance_split(balance: Mapping[str, Any], corpus, names: Sequence[str], split: SourceSplit,
                  info: Mapping[str, Any], seed: int = 0):
    """Apply ``cfg.balance`` to the training rows of `names`.

    Returns:
        (split, stage, report): `split` unchanged (rows keep their training indices), the
        `M4` stage to apply after the mixture's stages, and the M4 report dict (in subsample
        mode with ``kept_rows``: {source: kept count}, the sizes the mixture stages see).
    """
    from pipeline.balance.m4 import M4, solve_sources

    method = balance.get("method", "none")
    if method not in METHODS:
        raise ValueError(f"balance.method must be one of {METHODS}, got {method!r}")
    mode = balance.get("mode", "subsample")
    unknown = sorted(set(balance) - {"method", "mode", "seed", *_SOLVER_KEYS})
    if unknown:
        raise ValueError(f"unknown balance option(s) {unknown}; known: method, mode, seed, {', '.join(_SOLVER_KEYS)}")
    kwargs = {k: _plain(balance[k]) for k in _SOLVER_KEYS if k in balance and balance[k] is not None}
    examples = training_examples(corpus, names, split)
    keep, result = solve_sources(examples, attribute_names=info["attribute_names"],
                                 label_names=info["label_names"], seed=int(seed), **kwargs)
    stage = M4(keep, mode=mode, seed=int(seed if balance.get("seed") is None else balance["seed"]),
               reweight_sources=False)
    report = {"before": _summary(result.before), "after": _summary(result.after),
              "feasible": result.feasible, "solver": result.solver, "mode": mode,
              "kept_fraction_per_source": {n: stage.kept_fraction(n) for n in names}}
    log.info("M4 balancing (%s, mode=%s): data statistics before\n%s\nafter\n%s", result.solver, mode,
             result.before.format(), result.after.format())
    if mode == "subsample":
        report["kept_rows"] = {n: int(stage.masks[n].sum()) for n in names}
    return split, stage, report
