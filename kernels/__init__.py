"""Fused loss kernels with exact PyTorch twins; imports nothing from pipeline/.

Functional API (each takes `impl="auto"|"torch"|"chunked"|"triton"`; "auto" means Triton on
CUDA tensors and the chunked PyTorch path otherwise, decided per call from the tensors, never
from environment variables at import time):

    fused_linear_cross_entropy(hidden (N, H), weight (V, H), target (N,), ...)
    contrastive_loss(image (B, D), text (B, D), *, kind, logit_scale, ...)

and their plain references (the specification; they materialise N x V / B x B):

    fused_linear_cross_entropy_reference, contrastive_loss_reference
"""

from kernels.contrastive import contrastive_loss
from kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from kernels.reference import contrastive_loss_reference, fused_linear_cross_entropy_reference

__all__ = [
    "contrastive_loss",
    "contrastive_loss_reference",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_reference",
]
