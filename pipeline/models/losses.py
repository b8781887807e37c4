"""Model losses (token cross-entropy, contrastive), with the implementation chosen by config.

`loss.impl` selects how (hidden, LM-head weight, labels) become per-token cross-entropy:
  * ``torch``: logits = hidden @ weight.T, then `F.cross_entropy` (materialises N x V);
  * ``fused``: `kernels.fused_linear_cross_entropy` (chunked on CPU, Triton on CUDA),
    which never materialises N x V.
and, for paired image/text features, how `contrastive_loss` runs:
  * ``torch``: the plain reference (materialises the B x B, or B_local x B_global, logits);
  * ``fused``: `kernels.contrastive_loss` (tiled; Triton softmax on CUDA).
Both give the same value and gradients (tests/pipeline/test_losses.py). Never chosen from an
environment variable at import time.

The training objective of a step is sum_i w_i * CE_i / N_global, where w_i is the plan's
loss weight on target token i and N_global the number of target tokens in the *global*
batch (all micro-batches, all ranks): upweighting then means the same thing at any
gradient accumulation or world size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

IMPLS = ("torch", "fused")


@dataclass
class LossConfig:
    impl: str = "torch"
    label_smoothing: float = 0.0
    z_loss: float = 0.0

    def __post_init__(self) -> None:
        if self.impl not in IMPLS:
            raise ValueError(f"loss.impl must be one of {IMPLS}, got {self.impl!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"loss.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.z_loss < 0:
            raise ValueError(f"loss.z_loss must be >= 0, got {self.z_loss}")


def torch_token_losses(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                       label_smoothing: float = 0.0, z_loss: float = 0.0,
                       ignore_index: int = -100) -> torch.Tensor:
    """(N,) per-token loss (0 at ignored tokens). hidden (N, H), weight (V, H).

    float32 for float16/bfloat16/float32 inputs (half logits are upcast before the softmax),
    float64 for float64 inputs (so tests can compare implementations exactly).
    """
    logits = hidden @ weight.t()
    if logits.dtype != torch.float64:
        logits = logits.float()
    losses = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none",
                             label_smoothing=label_smoothing)
    if z_loss:
        losses = losses + z_loss * torch.logsumexp(logits, dim=-1).square() * (labels != ignore_index)
    return losses


class TokenLossHead(nn.Module):
    """Per-token losses from hidden states and the (tied) LM-head weight.

    A module of its own so that, under DeepSpeed ZeRO-3, the partitioned embedding weight
    can be registered as an external parameter of this module and is gathered for its
    forward (and its gradient routed back to the owner's partition).
    """

    def __init__(self, config: LossConfig):
        super().__init__()
        self.config = config

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                token_weights: torch.Tensor | None = None, reduction: str = "sum") -> torch.Tensor:
        """Args:
            hidden: (N, H) final hidden states; weight: (V, H); labels: (N,), -100 = ignore.
            token_weights: (N,) loss weight per token (None: 1).
            reduction: "sum" (scalar sum of weighted losses) or "none" ((N,) weighted).
        """
        cfg = self.config
        if cfg.impl == "fused":
            from kernels import fused_linear_cross_entropy

            return fused_linear_cross_entropy(
                hidden, weight, labels, token_weight=token_weights, label_smoothing=cfg.label_smoothing,
                z_loss=cfg.z_loss, reduction=reduction,
            )
        losses = torch_token_losses(hidden, weight, labels, cfg.label_smoothing, cfg.z_loss)
        if token_weights is not None:
            losses = losses * token_weights
        return losses.sum() if reduction == "sum" else losses


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, *, kind: str = "softmax",
                     logit_scale: float | torch.Tensor, logit_bias: float | torch.Tensor | None = None,
                     sample_weight: torch.Tensor | None = None, impl: str = "torch",
                     group=None) -> torch.Tensor:
    """Symmetric contrastive loss (CLIP softmax or SigLIP sigmoid) of paired features.

    Semantics: `kernels.reference.contrastive_loss_reference` (weighted, normalised by the
    global batch B). `impl` is `loss.impl`: "torch" materialises the logits, "fused" runs the
    tiled kernel. With a process `group`, each rank passes its own (B_local, D) features and
    gets the global loss; see kernels/contrastive.py for the gradient contract (this rank's
    feature gradients are exact; a DDP average over ranks scales every gradient by 1/world).

    Args:
        image, text: (B_local, D) float features (normalise them first for cosine logits).
        kind: "softmax" | "sigmoid".
        logit_scale: the multiplier itself (e.g. `log_scale.exp()`), float or scalar tensor.
        logit_bias: sigmoid only (None: 0).
        sample_weight: optional (B_local,) finite, >= 0 per-pair weights (no gradient).
        impl: "torch" | "fused" (the `loss.impl` config value).
        group: torch.distributed process group, or None for a single process.

    Returns:
        Scalar loss (float32 for half inputs).
    """
    if impl not in IMPLS:
        raise ValueError(f"loss.impl must be one of {IMPLS}, got {impl!r}")
    from kernels import contrastive_loss as kernel

    return kernel(image, text, kind=kind, logit_scale=logit_scale, logit_bias=logit_bias,
                  sample_weight=sample_weight, group=group,
                  impl="torch" if impl == "torch" else "auto")
