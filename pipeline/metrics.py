"""Per-source metrics, synchronised across ranks (torchmetrics sum states).

Names follow `stage/name[/source]`: ``val/loss/lang=swh``, ``data/tokens/lang=swh``.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class PerSourceSum(Metric):
    """Sums of a per-token (or per-row) quantity and of counts, per source.

    update(values (N,), sources (N,) in [0, S), mask (N,) bool) adds masked values and
    counts; compute() returns (sums (S,), counts (S,)) summed over every rank.
    """

    full_state_update = False

    def __init__(self, num_sources: int, **kwargs):
        super().__init__(**kwargs)
        self.num_sources = num_sources
        self.add_state("sums", torch.zeros(num_sources, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(num_sources, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor, sources: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        values, sources = values.reshape(-1), sources.reshape(-1)
        keep = sources >= 0 if mask is None else mask.reshape(-1) & (sources >= 0)
        index = sources[keep]
        self.sums.index_add_(0, index, values[keep].detach().to(torch.float64))
        self.counts.index_add_(0, index, torch.ones_like(index, dtype=torch.float64))

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sums, self.counts

    def per_source(self) -> tuple[torch.Tensor, torch.Tensor]:
        """compute() as (S,) tensors: torchmetrics squeezes a one-source (1,) result to 0-d."""
        sums, counts = self.compute()
        return sums.reshape(-1), counts.reshape(-1)


def source_key(name: str) -> str:
    """The metric suffix of a source: ``lang=swh`` (parallel sources: ``lang=deu-eng``)."""
    return f"lang={name}"
