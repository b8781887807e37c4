"""Scaling-law fits for mixture sweeps: laws, robust multi-start fitting, bootstrap intervals,
held-out error, compute-optimal allocation, a mixture optimiser, and plots.

    from pipeline.scaling import ChinchillaLaw, fit_law, bootstrap
    fit = fit_law(ChinchillaLaw(), X, y)            # X: (n, 2) = N, D; y: loss
    boot = bootstrap(fit, X, y, num_boot=1000)      # percentile 95% intervals in boot.ci

Plots live in ``pipeline.scaling.plots`` (imports matplotlib) and are not imported here.
"""

from pipeline.scaling.bootstrap import BootstrapResult, bootstrap
from pipeline.scaling.fit import (
    DEFAULT_DELTA,
    FitResult,
    fit_law,
    huber,
    objective,
    undetermined_parameters,
)
from pipeline.scaling.io import LAWS, Table, read_tables, table_from_frame
from pipeline.scaling.laws import (
    ChinchillaLaw,
    MixingLaw,
    MultilingualLaw,
    PowerLaw,
    ScalingLaw,
    law_from_spec,
)
from pipeline.scaling.mixture import (
    MixtureResult,
    epoch_caps,
    mixing_loss_fn,
    multilingual_loss_fn,
    optimise_mixture,
    project_capped_simplex,
)
from pipeline.scaling.optimal import chinchilla_optimal, compute_optimal_numeric, frontier
from pipeline.scaling.validation import errors, kfold_error, leave_out_error

__all__ = [
    "undetermined_parameters",
    "DEFAULT_DELTA",
    "LAWS",
    "BootstrapResult",
    "ChinchillaLaw",
    "FitResult",
    "MixingLaw",
    "MixtureResult",
    "MultilingualLaw",
    "PowerLaw",
    "ScalingLaw",
    "Table",
    "bootstrap",
    "chinchilla_optimal",
    "compute_optimal_numeric",
    "epoch_caps",
    "errors",
    "fit_law",
    "frontier",
    "huber",
    "kfold_error",
    "law_from_spec",
    "leave_out_error",
    "mixing_loss_fn",
    "multilingual_loss_fn",
    "objective",
    "optimise_mixture",
    "project_capped_simplex",
    "read_tables",
    "table_from_frame",
]
