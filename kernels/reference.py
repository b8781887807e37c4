"""Plain PyTorch references: the executable specification of both losses.

Both references live in one file so the whole specification reads in one place; the fast
paths (kernels/fused_linear_cross_entropy.py, kernels/contrastive.py) must match them, tests
compare against them evaluated in float64, and `impl="torch"` runs them directly. They
materialise the full logits (N x V, B x B), so they are for tests, small inputs and debugging.

Shape legend:
    N  tokens (rows of hidden)          H  hidden size
    V  vocabulary size (rows of weight)  B  batch size (image/text pairs)
    D  embedding size

Precision: float16/bfloat16 inputs are multiplied in their own dtype (fp32 accumulation inside
the matmul, as F.linear does) and everything after the matmul runs in float32; the loss is
returned in float32. float32 and float64 inputs run in their own dtype throughout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._validation import check_contrastive_inputs, check_flce_inputs


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for an input dtype: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    token_weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    reduction: str = "mean",
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted cross-entropy of a linear head; the specification (materialises N x V).

    For each token i with target t_i != ignore_index:

        z_i    = hidden_i @ weight.T + bias                       (V,) logits
        z_i    = softcap * tanh(z_i / softcap)                    if softcap is not None
        lse_i  = log(sum_j exp(z_ij))
        CE_i   = lse_i - z_i[t_i]                                 (-log p(t_i))
        S_i    = lse_i - mean_j z_ij                              (mean_j -log p_ij)
        l_i    = (1 - ls) * CE_i + ls * S_i + z_loss * lse_i**2
        out_i  = token_weight_i * l_i                             (token_weight = 1 if None)

    Ignored tokens have out_i = 0 and are not counted. Reductions:
    "none" -> out (N,); "sum" -> sum_i out_i; "mean" -> sum_i out_i / normalizer, where the
    normalizer defaults to the number of non-ignored tokens. Pass a global token count as
    normalizer so that summing the losses of micro-batches (or ranks) gives the global mean.
    Weights do not renormalise the mean: sum_i w_i l_i is divided by the token count, not by
    sum_i w_i.

    Ignored rows and empty reductions (the same rule in every implementation: this
    reference, the chunked path and the Triton path):
      * an ignored token contributes exactly 0 to the loss and to every gradient (hidden,
        weight, bias, token_weight), whatever its hidden row holds: a NaN or inf there does
        not leak (its row never enters the logits). F.cross_entropy differs here: a NaN
        logit row with an ignored target gives a NaN gradient row (log_softmax's backward
        computes 0 * NaN), which then spreads into grad_weight.
      * nothing counted (every target ignored, or N = 0): "sum" is 0, "none" is zeros, and
        "mean" with the default normalizer returns NaN (0 / 0, as F.cross_entropy), while
        every gradient is exactly 0 (as F.cross_entropy's): the NaN is added as a constant
        and the 0 / 0 never reaches autograd.
      * NaN/inf appears in the loss and gradients only where a counted token's logits are
        non-finite (or the weight/bias, which every counted token uses).

    Precision: the per-token terms come from log_softmax (logits minus their row maximum,
    minus log of the sum), so at extreme logits (|z| in the thousands, where fp32 spacing
    is 2^-12 or coarser) the loss and gradients are as accurate as F.cross_entropy's;
    lse - z_t would lose the spacing of lse.

    With token_weight=None, z_loss=0 and softcap=None this is exactly
    F.cross_entropy(logits, target, ignore_index=..., label_smoothing=..., reduction=...).

    Args:
        hidden: (N, H) float.
        weight: (V, H) same dtype as hidden.
        target: (N,) integer class ids in [0, V) or ignore_index.
        bias: optional (V,).
        token_weight: optional (N,) finite, >= 0 per-token loss multipliers.
        normalizer: optional positive float or scalar tensor (reduction="mean" only).

    Returns:
        A scalar, or (N,) for reduction="none"; float32 for half inputs, else input dtype.
    """
    check_flce_inputs(hidden, weight, target, bias, token_weight, ignore_index,
                      label_smoothing, z_loss, softcap, reduction, normalizer)
    dtype = acc_dtype(hidden.dtype)
    keep = target != ignore_index
    # Ignored rows are zeroed before the matmul, so a non-finite value there cannot reach
    # the logits (nor, through 0 * NaN, any gradient).
    hidden = torch.where(keep[:, None], hidden, hidden.new_zeros(()))
    logits = F.linear(hidden, weight, bias).to(dtype)  # (N, V): the memory this file spends
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    safe_target = torch.where(keep, target, torch.zeros_like(target)).long()
    log_p = F.log_softmax(logits, dim=-1)  # (N, V)
    ce = -log_p.gather(1, safe_target[:, None])[:, 0]
    per_token = (1.0 - label_smoothing) * ce
    if label_smoothing:
        per_token = per_token - label_smoothing * log_p.mean(dim=-1)
    if z_loss:
        per_token = per_token + z_loss * torch.logsumexp(logits, dim=-1).square()
    if token_weight is not None:
        per_token = per_token * token_weight.to(dtype)
    per_token = torch.where(keep, per_token, torch.zeros_like(per_token))
    return reduce_per_token(per_token, keep, reduction, normalizer)


def reduce_per_token(per_token: torch.Tensor, keep: torch.Tensor, reduction: str,
                     normalizer: float | torch.Tensor | None) -> torch.Tensor:
    """Apply `reduction` to per-token losses (N,) that are already 0 where ~keep.

    Shared by every implementation so the rule is written once (see mean_denominator).
    """
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    denominator, nan_if_empty = mean_denominator(keep, normalizer)
    total = total / denominator
    return total if nan_if_empty is None else total + nan_if_empty.to(total.dtype)


def mean_denominator(keep: torch.Tensor, normalizer: float | torch.Tensor | None):
    """(denominator, nan_if_empty) of reduction="mean": loss = sum / denominator (+ nan_if_empty).

    Without a normalizer the denominator is the count of kept tokens, clamped to >= 1, and
    nan_if_empty is a constant tensor that is NaN when that count is 0 and 0 otherwise: the
    loss is then NaN (as F.cross_entropy) while the gradient reaching the per-token losses
    is 0 (a plain sum / 0 would send 1/0 = inf, and inf * 0 = NaN, into every gradient).
    """
    if normalizer is not None:
        return normalizer, None
    count = keep.sum()
    return count.clamp(min=1), torch.where(count > 0, 0.0, float("nan"))


def contrastive_loss_reference(
    image: torch.Tensor,
    text: torch.Tensor,
    *,
    kind: str = "softmax",
    logit_scale: float | torch.Tensor,
    logit_bias: float | torch.Tensor | None = None,
    sample_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric contrastive loss of paired features; the specification (materialises B x B).

    L = logit_scale * image @ text.T (+ logit_bias for sigmoid), a (B, B) matrix whose
    diagonal holds the matching pairs. logit_scale is the multiplier itself (pass
    `log_scale.exp()` for CLIP's parametrisation). Features are used as given (normalise
    them first if you want cosine similarities). w = sample_weight (ones if None).

    kind="softmax" (CLIP / InfoNCE):
        i2t_i = logsumexp_j L_ij - L_ii         (image i against every text)
        t2i_j = logsumexp_i L_ij - L_jj         (text j against every image)
        loss  = sum_i w_i * (i2t_i + t2i_i) / (2 B)
    kind="sigmoid" (SigLIP): z_ij = +1 on the diagonal, -1 elsewhere,
        loss  = sum_ij c_ij * -log sigmoid(z_ij * L_ij) / B,   c_ij = (w_i + w_j) / 2
    i.e. half of pair (i, j) belongs to image i's row and half to text j's column, each
    weighted by its own example's weight. Normalisation by B follows the SigLIP paper.
    Weights do not renormalise: with w = 1 both reduce to the published losses.

    Args:
        image: (B, D) float.
        text: (B, D) same dtype.
        logit_scale: python float or scalar tensor (may require grad).
        logit_bias: python float or scalar tensor; sigmoid only (None means 0).
        sample_weight: optional (B,) finite, >= 0.

    Returns:
        A scalar; float32 for half inputs, else the input dtype.
    """
    check_contrastive_inputs(image, text, kind, logit_scale, logit_bias, sample_weight, None)
    dtype = acc_dtype(image.dtype)
    b = image.shape[0]
    logits = (image.to(dtype) @ text.to(dtype).T) * logit_scale  # (B, B)
    w = (torch.ones(b, dtype=dtype, device=image.device) if sample_weight is None
         else sample_weight.to(dtype))
    if kind == "softmax":
        diag = logits.diagonal()
        i2t = torch.logsumexp(logits, dim=1) - diag
        t2i = torch.logsumexp(logits, dim=0) - diag
        return (w * (i2t + t2i)).sum() / (2 * b)
    if logit_bias is not None:
        logits = logits + logit_bias
    sign = 2.0 * torch.eye(b, dtype=dtype, device=image.device) - 1.0
    pair_weight = (w[:, None] + w[None, :]) / 2
    return (pair_weight * -F.logsigmoid(sign * logits)).sum() / b
