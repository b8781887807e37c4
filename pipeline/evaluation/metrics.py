"""Per-source metrics, synchronised across ranks (torchmetrics sum states).

Names follow `stage/name[/source]`: ``val/loss/lang=swh``, ``data/tokens/lang=swh``,
``val/chrf/lang=deu-eng`` (chrF per parallel source, sacrebleu, 0-100, not chrF++).
"""

from __future__ import annotations

from collections.abc import Sequence

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


# chrF as sacrebleu computes it: character n-grams up to 6, no word n-grams (chrF, not
# chrF++), recall weighted by beta = 2, on a 0-100 scale.
CHRF_CHAR_ORDER, CHRF_WORD_ORDER, CHRF_BETA = 6, 0, 2


def corpus_chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu's corpus chrF (0-100, not chrF++) of hypotheses against one reference each.

    Statistics are summed over every sentence, empty and zero-overlap hypotheses included
    (torchmetrics 1.9's CHRFScore drops zero-overlap sentences, inflating the score).
    """
    from sacrebleu.metrics import CHRF

    if len(hypotheses) != len(references):
        raise ValueError(f"chrF: {len(hypotheses)} hypotheses for {len(references)} references")
    metric = CHRF(char_order=CHRF_CHAR_ORDER, word_order=CHRF_WORD_ORDER, beta=CHRF_BETA)
    return float(metric.corpus_score(list(hypotheses), [list(references)]).score)


def gather_objects(items: list) -> list:
    """Every rank's `items` concatenated (rank order), on every rank; `items` itself when not
    distributed. A collective: every rank must call it (DDP and DeepSpeed both initialise
    torch.distributed, so Lightning's strategies need nothing else)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(items)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(items))
    return [item for part in gathered for item in part]
