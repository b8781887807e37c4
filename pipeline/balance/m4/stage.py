"""The `M4` mixing stage: keep probabilities (from `api.py`) applied to a mixture plan.

As a mixing stage, `M4(keep={source: q}, mode=..., seed=...)` (q solved jointly over the
concatenated sources, e.g. with `solve_sources`) refines the plan of the stages to its left:

    subsample: plan.example_keep[source] = (num_documents,) bool mask of the kept examples;
               sample_probs[source] *= kept fraction of source (renormalised), so a
               proportional plan stays proportional to the *kept* sizes and the pooled kept
               data is what M4 balanced.
    weights:   plan.example_weights[source] = (num_documents,) float64 q / eta_pooled,
               multiplied into the per-token loss weight of each example's tokens;
               sample_probs and per-source loss_weights unchanged.

Sources the stage has no q for are left untouched (no entry in example_keep/weights). The
masks are drawn once in __init__ (seeded per source name), so `apply` stays a pure, cheap
function of (sizes, progress) like every other stage.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping

import numpy as np

from pipeline.balance.m4.api import load_keep_probabilities, m4_subsample
from pipeline.balance.m4.problem import MODES
from pipeline.mixing.base import MixingStage
from pipeline.mixing.plan import MixturePlan, validate_sizes


class M4(MixingStage):
    """Mixing stage applying M4 keep probabilities per example (module doc for the contract).

    Args:
        keep: {source: (num_documents,) q in [0, 1]}, or a path to an .npz written by
            `save_keep_probabilities`.
        mode: "subsample" (seeded Bernoulli draw; plan.example_keep) or "weights"
            (plan.example_weights = q / pooled mean q).
        seed: seed of the subsample draw (per source: seeded by (seed, crc32(name))).
        reweight_sources: in subsample mode, scale each source's sampling probability by its
            kept fraction (default True; False keeps the left stage's probabilities).
    """

    def __init__(self, keep: Mapping[str, np.ndarray] | str | os.PathLike, mode: str = "subsample",
                 seed: int = 0, reweight_sources: bool = True):
        if mode not in MODES:
            raise ValueError(f"M4 mode must be one of {MODES}, got {mode!r}")
        raw = load_keep_probabilities(keep) if isinstance(keep, str | os.PathLike) else dict(keep)
        if not raw:
            raise ValueError("M4 stage needs keep probabilities for at least one source")
        self.keep: dict[str, np.ndarray] = {}
        for name, q in raw.items():
            q = np.asarray(q, dtype=np.float64)
            if q.ndim != 1 or len(q) == 0:
                raise ValueError(f"M4 keep probabilities for source {name!r} must be 1-D and non-empty, got shape {q.shape}")
            if not np.isfinite(q).all() or (q < 0).any() or (q > 1).any():
                raise ValueError(f"M4 keep probabilities for source {name!r} must be in [0, 1]")
            self.keep[name] = q
        self.mode = mode
        self.seed = int(seed)
        self.reweight_sources = bool(reweight_sources)
        self.masks = {name: self._mask(name, q) for name, q in self.keep.items()} if mode == "subsample" else {}
        pooled = np.concatenate(list(self.keep.values()))
        self.pooled_keep_rate = float(pooled.mean())
        if mode == "weights" and self.pooled_keep_rate == 0:
            raise ValueError("M4 keep probabilities are all zero: nothing to weight")

    def _mask(self, name: str, q: np.ndarray) -> np.ndarray:
        mask = np.zeros(len(q), dtype=bool)
        mask[m4_subsample(q, (self.seed << 32) ^ zlib.crc32(name.encode()))] = True
        if not mask.any():
            raise ValueError(f"M4 subsample of source {name!r} keeps no example (seed {self.seed})")
        return mask

    def kept_fraction(self, source: str) -> float:
        """Fraction of the source's examples kept (drawn mask in subsample mode, mean q otherwise)."""
        if source not in self.keep:
            return 1.0
        return float(self.masks[source].mean()) if self.mode == "subsample" else float(self.keep[source].mean())

    def depends_on_progress(self) -> bool:
        return False  # the plan is the same at every step

    def apply(self, sizes: Mapping[str, float], progress: float, previous: MixturePlan | None) -> MixturePlan:
        names, array = validate_sizes(sizes)
        unknown = sorted(set(self.keep) - set(names))
        if unknown:
            raise ValueError(f"M4 has keep probabilities for unknown source(s) {unknown}; sources are {list(names)}")
        if previous is None:
            probs, weights = array / array.sum(), np.ones(len(names))
        else:
            probs, weights = previous.sample_probs, previous.loss_weights
        if self.mode == "weights":
            example_weights = {name: q / self.pooled_keep_rate for name, q in self.keep.items()}
            return MixturePlan(names, probs, weights, example_weights=example_weights)
        if self.reweight_sources:
            probs = probs * np.array([self.kept_fraction(name) for name in names])
            probs = probs / probs.sum()
        return MixturePlan(names, probs, weights, example_keep=dict(self.masks))

    def __repr__(self) -> str:
        return (f"M4(sources={sorted(self.keep)}, mode={self.mode!r}, seed={self.seed}, "
                f"reweight_sources={self.reweight_sources})")
