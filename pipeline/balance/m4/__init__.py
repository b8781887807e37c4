"""M4 multimodal balancing (Zhang et al.): per-example keep probabilities from a convex problem.

    from pipeline.balance.m4 import M4, m4_keep_probabilities
"""

from pipeline.balance.m4.core import M4, m4_keep_probabilities, m4_subsample, solve_sources
from pipeline.balance.m4.statistics import m4_statistics

__all__ = ["M4", "m4_keep_probabilities", "m4_statistics", "m4_subsample", "solve_sources"]
