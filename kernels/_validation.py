"""Input checks shared by every implementation of the kernels' losses.

All implementations (the reference, the chunked PyTorch path, the Triton path) call the same
checks, so a bad input raises the same `ValueError` whichever `impl` is selected. Checks that
look at tensor values (targets in range, weights finite and non-negative) read one scalar back
from the device; on a GPU that is one synchronisation per call, negligible next to the loss.

Shape legend: N tokens, H hidden size, V vocabulary size, B batch, D embedding size.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("auto", "torch", "chunked", "triton")


def check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")


def _check_float_matrix(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating tensor, got dtype {x.dtype}")


def check_weights(name: str, w: torch.Tensor | None, n: int, like: torch.Tensor) -> None:
    """Per-row weights: shape (n,), floating, same device, finite and >= 0."""
    if w is None:
        return
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or None, got {type(w).__name__}")
    if w.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(w.shape)}")
    if w.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating tensor, got dtype {w.dtype}")
    if w.device != like.device:
        raise ValueError(f"{name} is on {w.device} but the features are on {like.device}")
    if n and bool((~torch.isfinite(w) | (w < 0)).any()):
        bad = w[~torch.isfinite(w) | (w < 0)][0].item()
        raise ValueError(f"{name} must be finite and >= 0; found {bad}")


def check_flce_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    token_weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    reduction: str,
    normalizer: float | torch.Tensor | None,
) -> None:
    """Raise ValueError naming the first bad argument of fused_linear_cross_entropy."""
    _check_float_matrix("hidden", hidden)
    _check_float_matrix("weight", weight)
    n, h = hidden.shape
    v, hw = weight.shape
    if h != hw:
        raise ValueError(f"hidden is (N, H) = {tuple(hidden.shape)} but weight is (V, H) = "
                         f"{tuple(weight.shape)}: H differs ({h} vs {hw})")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"hidden has dtype {hidden.dtype} but weight has {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"hidden is on {hidden.device} but weight is on {weight.device}")
    if v == 0:
        raise ValueError("weight has V = 0 rows: the vocabulary is empty")
    if not isinstance(target, torch.Tensor) or target.shape != (n,):
        shape = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise ValueError(f"target must have shape (N,) = ({n},), got {shape}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise ValueError(f"target must be an integer tensor, got dtype {target.dtype}")
    if target.device != hidden.device:
        raise ValueError(f"target is on {target.device} but hidden is on {hidden.device}")
    if n:
        kept = target[target != ignore_index]
        if kept.numel() and bool(((kept < 0) | (kept >= v)).any()):
            bad = kept[(kept < 0) | (kept >= v)][0].item()
            raise ValueError(f"target value {bad} is out of range [0, V={v}) and is not "
                             f"ignore_index={ignore_index}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (v,):
            shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias must have shape (V,) = ({v},), got {shape}")
        if bias.dtype != hidden.dtype:
            raise ValueError(f"bias has dtype {bias.dtype} but hidden has {hidden.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")
    check_weights("token_weight", token_weight, n, hidden)
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not float(z_loss) >= 0.0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if softcap is not None and not float(softcap) > 0.0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {REDUCTIONS}")
    if normalizer is not None:
        if reduction != "mean":
            raise ValueError(f"normalizer is only used with reduction='mean', got "
                             f"reduction={reduction!r}")
        value = normalizer if not isinstance(normalizer, torch.Tensor) else None
        if isinstance(normalizer, torch.Tensor):
            if normalizer.numel() != 1:
                raise ValueError(f"normalizer must be a scalar, got shape "
                                 f"{tuple(normalizer.shape)}")
            value = normalizer.detach().double().item()
        if not (value is not None and float(value) > 0.0 and float(value) < float("inf")):
            raise ValueError(f"normalizer must be finite and > 0, got {value}")


def check_contrastive_inputs(
    image: torch.Tensor,
    text: torch.Tensor,
    kind: str,
    logit_scale: float | torch.Tensor,
    logit_bias: float | torch.Tensor | None,
    sample_weight: torch.Tensor | None,
    block_size: int | None,
) -> None:
    """Raise ValueError naming the first bad argument of contrastive_loss."""
    _check_float_matrix("image", image)
    _check_float_matrix("text", text)
    if image.shape != text.shape:
        raise ValueError(f"image is (B, D) = {tuple(image.shape)} but text is "
                         f"{tuple(text.shape)}: they must match")
    if image.dtype != text.dtype:
        raise ValueError(f"image has dtype {image.dtype} but text has {text.dtype}")
    if image.device != text.device:
        raise ValueError(f"image is on {image.device} but text is on {text.device}")
    if image.shape[0] == 0:
        # Checked here, not left to the kernels: softmax would fail inside the fused
        # cross-entropy naming its internal arguments, sigmoid would return 0 / 0 = NaN.
        raise ValueError(f"image and text features are empty (B=0, shape "
                         f"{tuple(image.shape)}): a contrastive loss needs at least one pair")
    if kind not in ("softmax", "sigmoid"):
        raise ValueError(f"kind={kind!r} is not 'softmax' or 'sigmoid'")
    for name, s in (("logit_scale", logit_scale), ("logit_bias", logit_bias)):
        if isinstance(s, torch.Tensor):
            if s.numel() != 1:
                raise ValueError(f"{name} must be a scalar, got shape {tuple(s.shape)}")
            if not bool(torch.isfinite(s.detach()).all()):
                raise ValueError(f"{name} must be finite, got {s.detach().item()}")
        elif s is not None and not float("-inf") < float(s) < float("inf"):
            raise ValueError(f"{name} must be finite, got {s}")
    if kind == "softmax" and logit_bias is not None:
        raise ValueError("logit_bias is only used by kind='sigmoid' (a constant added to "
                         "every softmax logit cancels out); pass logit_bias=None")
    check_weights("sample_weight", sample_weight, image.shape[0], image)
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")
