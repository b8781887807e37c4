"""M4 multimodal balancing: per-example keep probabilities from a convex problem.

Alabdulmohsin et al., "CLIP the Bias", ICLR 2024.

    from pipeline.balance.m4 import M4, m4_keep_probabilities

Modules, each importing only from those listed above it (the maths: `problem`'s module doc):

    validation   input checks: binary attributes and labels, utility, pi, eps
    statistics   representation/association statistics of a weighted dataset, violations
    problem      M4Problem, M4Duals (the solution), M4Result, M4InfeasibleError, the objective
    streaming    the streaming dual solver (default): fit_streaming, write_keep_probabilities
    exact        the exact dual solver for small N (scipy L-BFGS-B): solve_exact
    api          m4_keep_probabilities (with the streaming guard), m4_subsample,
                 solve_sources, examples_from_columns, save/load_keep_probabilities
    stage        the M4 mixing stage
"""

from pipeline.balance.m4.api import (
    examples_from_columns,
    load_keep_probabilities,
    m4_keep_probabilities,
    m4_subsample,
    save_keep_probabilities,
    solve_sources,
)
from pipeline.balance.m4.exact import solve_exact
from pipeline.balance.m4.problem import M4Duals, M4InfeasibleError, M4Problem, M4Result
from pipeline.balance.m4.stage import M4
from pipeline.balance.m4.statistics import M4Statistics, m4_statistics
from pipeline.balance.m4.streaming import fit_streaming, write_keep_probabilities

__all__ = [
    "M4",
    "M4Duals",
    "M4InfeasibleError",
    "M4Problem",
    "M4Result",
    "M4Statistics",
    "examples_from_columns",
    "fit_streaming",
    "load_keep_probabilities",
    "m4_keep_probabilities",
    "m4_statistics",
    "m4_subsample",
    "save_keep_probabilities",
    "solve_exact",
    "solve_sources",
    "write_keep_probabilities",
]
