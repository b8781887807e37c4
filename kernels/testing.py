"""Accuracy checks for kernels, following the CCE rule.

A kernel computed at some dtype is compared with the float64 reference; its error must be no
worse than the error of plain PyTorch (the reference evaluated at the same dtype, i.e. the
naive materialising implementation) plus a small tolerance. Errors are measured relative to
the size of the float64 result, so one tolerance serves losses and gradients of any scale.

Used by tests/kernels/ and available to anyone adding a kernel (or wiring one into a loss).
"""

from __future__ import annotations

import torch


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref| (ref in float64); 0-size tensors have error 0."""
    if ref.numel() == 0:
        return 0.0
    diff = (x.detach().double() - ref.detach().double()).abs().max().item()
    scale = ref.detach().double().abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_no_worse_than_torch(name: str, kernel: torch.Tensor, torch_same_dtype: torch.Tensor,
                               ref64: torch.Tensor, tol: float = 1e-6) -> tuple[float, float]:
    """Assert relative_error(kernel) <= relative_error(torch_same_dtype) + tol.

    Also asserts that the shapes agree and that the float64 reference is finite, so a NaN
    reference cannot make the comparison vacuous. Returns (kernel_error, torch_error).
    """
    assert kernel.shape == ref64.shape, f"{name}: shape {tuple(kernel.shape)} vs {tuple(ref64.shape)}"
    assert bool(torch.isfinite(ref64).all()), f"{name}: the float64 reference is not finite"
    err_kernel = relative_error(kernel, ref64)
    err_torch = relative_error(torch_same_dtype, ref64)
    assert err_kernel <= err_torch + tol, (
        f"{name}: kernel error {err_kernel:.3e} > PyTorch's own error {err_torch:.3e} + {tol:.0e}")
    return err_kernel, err_torch


def make_flce_inputs(n: int, h: int, v: int, *, bias: bool = False, weights: bool = False,
                     ignore_every: int = 5, seed: int = 0, dtype=torch.float64):
    """Random (hidden, weight, target, bias, token_weight) with every `ignore_every`-th token
    ignored (-100). Logits have a spread of a few units, like a trained LM head."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) * (2.0 / h**0.5)
    target = torch.randint(0, v, (n,), generator=gen)
    if ignore_every:
        target[::ignore_every] = -100
    b = torch.randn(v, generator=gen, dtype=torch.float64) if bias else None
    w = torch.rand(n, generator=gen, dtype=torch.float64) * 2.0 if weights else None
    def cast(t):
        return (None if t is None else t.to(dtype))
    return cast(hidden), cast(weight), target, cast(b), cast(w)


def flce_outputs(fn, hidden, weight, target, bias, token_weight, reduction, **kwargs):
    """(loss, grad_hidden, grad_weight[, grad_bias][, grad_token_weight]) of `fn`.

    Inputs are cloned as leaves; for reduction="none" the backward seed is a fixed ramp so
    every per-token gradient is exercised with a different upstream value.
    """
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None
              for t in (hidden, weight, bias, token_weight)]
    h, w, b, tw = leaves
    loss = fn(h, w, target, bias=b, token_weight=tw, reduction=reduction, **kwargs)
    seed = loss if reduction != "none" else loss * torch.linspace(
        0.5, 1.5, loss.shape[0], dtype=loss.dtype, device=loss.device)
    inputs = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(seed.sum(), inputs)
    return (loss.detach(), *grads)


def check_flce_accuracy(fn, *, n, h, v, reduction, bias=False, weights=False,
                        label_smoothing=0.0, z_loss=0.0, softcap=None, seed=0,
                        device="cpu", dtype=torch.float32, tol=1e-6, **fn_kwargs):
    """CCE-rule check of `fn` (fused_linear_cross_entropy-like) at `dtype` on `device`:
    loss and every gradient against the float64 reference, no worse than PyTorch at `dtype`.
    Returns a list of (name, kernel_error, torch_error)."""
    from kernels.reference import fused_linear_cross_entropy_reference as reference

    args = make_flce_inputs(n, h, v, bias=bias, weights=weights, seed=seed)
    opts = dict(label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    ref64 = flce_outputs(reference, *args, reduction, **opts)
    low = [t.to(device=device, dtype=dtype) if t is not None and t.is_floating_point()
           else (t.to(device) if t is not None else None) for t in args]
    naive = flce_outputs(reference, *low, reduction, **opts)
    got = flce_outputs(fn, *low, reduction, **opts, **fn_kwargs)
    names = ["loss", "grad_hidden", "grad_weight"] + (["grad_bias"] if bias else []) + (
        ["grad_token_weight"] if weights else [])
    assert len(got) == len(names) == len(ref64)
    return [(name, *assert_no_worse_than_torch(name, g.cpu(), t.cpu(), r, tol))
            for name, g, t, r in zip(names, got, naive, ref64, strict=True)]


def check_contrastive_accuracy(fn, *, b, d, kind, weights, seed=0, device="cpu",
                               dtype=torch.float32, tol=1e-6, **fn_kwargs):
    """CCE-rule check of a contrastive_loss-like `fn`: loss and gradients of image, text,
    logit_scale (and logit_bias for sigmoid) against float64, no worse than PyTorch."""
    from kernels.reference import contrastive_loss_reference as reference

    gen = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.normalize(torch.randn(b, d, generator=gen, dtype=torch.float64), dim=1)
    text = torch.nn.functional.normalize(image + 0.7 * torch.randn(b, d, generator=gen, dtype=torch.float64), dim=1)
    scale = torch.tensor(10.0, dtype=torch.float64)
    bias = torch.tensor(-5.0, dtype=torch.float64) if kind == "sigmoid" else None
    w = torch.rand(b, generator=gen, dtype=torch.float64) * 2.0 if weights else None

    def run(f, dt, dev, **kw):
        leaves = [t.detach().to(device=dev, dtype=dt).requires_grad_(True)
                  for t in (image, text, scale) + ((bias,) if bias is not None else ())]
        sw = None if w is None else w.to(device=dev, dtype=dt)
        loss = f(leaves[0], leaves[1], kind=kind, logit_scale=leaves[2],
                 logit_bias=leaves[3] if bias is not None else None, sample_weight=sw, **kw)
        return (loss.detach(), *torch.autograd.grad(loss, leaves))

    ref64 = run(reference, torch.float64, "cpu")
    naive = run(reference, dtype, device)
    got = run(fn, dtype, device, **fn_kwargs)
    names = ["loss", "grad_image", "grad_text", "grad_scale"] + (["grad_bias"] if bias is not None else [])
    return [(name, *assert_no_worse_than_torch(name, g.cpu(), t.cpu(), r, tol))
            for name, g, t, r in zip(names, got, naive, ref64, strict=True)]
