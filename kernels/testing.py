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


def f_cross_entropy_head(hidden, weight, target, *, bias=None, token_weight=None,
                         reduction="mean", label_smoothing=0.0, ignore_index=-100):
    """Plain F.linear + F.cross_entropy: an oracle independent of kernels/reference.py.

    Used for the extreme-logit check, so the accuracy rule does not compare the kernels
    with a formula they share. token_weight must be None (F.cross_entropy has no per-token
    weights); it is accepted so flce_outputs can call this like the kernels.
    """
    assert token_weight is None, "F.cross_entropy has no per-token weights"
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return torch.nn.functional.cross_entropy(logits, target, ignore_index=ignore_index,
                                             label_smoothing=label_smoothing,
                                             reduction=reduction)


def make_extreme_logit_inputs(n: int, h: int, v: int, *, seed: int = 0, magnitude: int = 400):
    """float64 (hidden, weight, target) whose logits reach |z| of several thousand.

    hidden holds integers in [-magnitude, magnitude] and weight entries in {-1, 0, 1}, so
    every logit is an integer below 2^24, exact in float32 as in float64: the float32 runs
    see exactly the float64 logits, and what is measured is the error of the softmax stage
    alone (at |z| ~ 3000 fp32 spacing is 2^-12, which lse - z_t would add to every loss).
    Every 5th target is ignored.
    """
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randint(-magnitude, magnitude + 1, (n, h), generator=gen).double()
    weight = torch.randint(-1, 2, (v, h), generator=gen).double()
    logits = hidden @ weight.T
    # Targets near the top of each row, so losses are small and their error shows.
    target = logits.topk(3, dim=1).indices[torch.arange(n), torch.randint(0, 3, (n,), generator=gen)]
    target[::5] = -100
    return hidden, weight, target


def check_extreme_logits_accuracy(fn, *, n, h, v, reduction="mean", label_smoothing=0.0,
                                  seed=0, magnitude=1000, device="cpu", tol=1e-6, **fn_kwargs):
    """CCE-rule check at extreme logits against an independent oracle: F.cross_entropy on
    the materialised float64 logits. `fn` in float32 must be no worse than F.cross_entropy
    in float32 (loss, grad_hidden, grad_weight). Returns [(name, kernel_err, torch_err)]."""
    hidden, weight, target = make_extreme_logit_inputs(n, h, v, seed=seed, magnitude=magnitude)
    top = float((hidden @ weight.T).abs().max())
    assert top > 3000.0, f"logits reach only |z| = {top}: raise magnitude"
    opts = dict(label_smoothing=label_smoothing)
    ref64 = flce_outputs(f_cross_entropy_head, hidden, weight, target, None, None, reduction,
                         **opts)
    low = [hidden.float().to(device), weight.float().to(device), target.to(device), None, None]
    naive = flce_outputs(f_cross_entropy_head, *low, reduction, **opts)
    got = flce_outputs(fn, *low, reduction, **opts, **fn_kwargs)
    names = ["loss", "grad_hidden", "grad_weight"]
    return [(name, *assert_no_worse_than_torch(name, g.cpu(), t.cpu(), r, tol))
            for name, g, t, r in zip(names, got, naive, ref64, strict=True)]


def check_ignored_rows_rule(fn, *, n=37, h=24, v=71, dtype=torch.float32, device="cpu",
                            **fn_kwargs):
    """The rule for ignored rows and empty reductions (kernels/reference.py), checked on `fn`.

    1. Every target ignored: "sum" is 0, "none" zeros, "mean" NaN; every gradient (hidden,
       weight, bias, token_weight) exactly 0 for each reduction.
    2. NaN and inf in ignored rows of hidden: loss and gradients equal those of the same
       inputs with those rows zeroed (bitwise), the ignored rows' grad_hidden is 0.
    3. NaN in one counted row: that token's loss is NaN and no other token's ("none").
    4. N = 0: "sum" 0, "mean" NaN, gradients of the right shapes and all 0.
    """
    hidden, weight, target, bias, tw = make_flce_inputs(n, h, v, bias=True, weights=True,
                                                        dtype=dtype)
    hidden, weight, target, bias, tw = (t.to(device) for t in (hidden, weight, target, bias, tw))
    opts = dict(label_smoothing=0.1, z_loss=1e-3, **fn_kwargs)

    def run(h_, t_, reduction):
        return flce_outputs(fn, h_, weight, t_, bias, tw[:h_.shape[0]], reduction, **opts)

    nothing = torch.full_like(target, -100)
    for reduction in ("mean", "sum", "none"):
        loss, *grads = run(hidden, nothing, reduction)
        if reduction == "mean":
            assert torch.isnan(loss), f"mean over nothing: expected NaN, got {loss}"
        else:
            assert bool((loss == 0).all()), f"{reduction} over nothing: {loss}"
        for i, grad in enumerate(grads):
            assert bool((grad == 0).all()), f"{reduction} over nothing: gradient {i} not 0"

    ignored = (target == -100).nonzero().squeeze(1)
    assert ignored.numel() >= 2
    poisoned = hidden.clone()
    poisoned[ignored[0]] = float("nan")
    poisoned[ignored[1], ::2] = float("inf")
    clean = hidden.clone()
    clean[ignored] = 0.0
    for reduction in ("mean", "sum", "none"):
        got = run(poisoned, target, reduction)
        want = run(clean, target, reduction)
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert bool(torch.isfinite(g).all()), f"{reduction}: output {i} has NaN/inf"
            assert torch.equal(g, w), f"{reduction}: output {i} differs from zeroed rows"
        assert bool((got[1][ignored] == 0).all()), f"{reduction}: ignored grad_hidden not 0"

    counted = (target != -100).nonzero().squeeze(1)[3]
    bad = hidden.clone()
    bad[counted, 0] = float("nan")
    per_token = run(bad, target, "none")[0]
    assert torch.equal(torch.isnan(per_token),
                       torch.arange(n, device=per_token.device) == counted)

    for reduction in ("mean", "sum"):
        loss, *grads = run(hidden[:0], target[:0], reduction)
        assert torch.isnan(loss) if reduction == "mean" else loss.item() == 0.0
        assert [tuple(g.shape) for g in grads] == [(0, h), (v, h), (v,), (0,)]
        assert all(bool((g == 0).all()) for g in grads)
