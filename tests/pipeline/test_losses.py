"""pipeline.models.losses: `loss.impl=torch` and `loss.impl=fused` give the same losses and gradients."""

import pytest
import torch
import torch.nn.functional as F

from pipeline.models.losses import LossConfig, TokenLossHead, contrastive_loss


def _features(b=29, d=11, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(b, d, generator=gen, dtype=torch.float64), dim=1)
    text = F.normalize(image + 0.5 * torch.randn(b, d, generator=gen, dtype=torch.float64), dim=1)
    weight = torch.rand(b, generator=gen, dtype=torch.float64) + 0.25
    return image.to(dtype), text.to(dtype), weight.to(dtype)


def _contrastive(impl, kind, image, text, weight):
    leaves = [image.clone().requires_grad_(True), text.clone().requires_grad_(True),
              torch.tensor(7.0, dtype=image.dtype, requires_grad=True)]
    if kind == "sigmoid":
        leaves.append(torch.tensor(-4.0, dtype=image.dtype, requires_grad=True))
    loss = contrastive_loss(leaves[0], leaves[1], kind=kind, logit_scale=leaves[2],
                            logit_bias=leaves[3] if kind == "sigmoid" else None,
                            sample_weight=weight, impl=impl)
    return (loss.detach(), *torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_contrastive_fused_equals_torch(kind, weighted):
    image, text, weight = _features()
    weight = weight if weighted else None
    torch_out = _contrastive("torch", kind, image, text, weight)
    fused_out = _contrastive("fused", kind, image, text, weight)
    for t, f in zip(torch_out, fused_out, strict=True):
        torch.testing.assert_close(f, t, rtol=1e-12, atol=1e-12)


def test_contrastive_torch_is_the_published_clip_loss():
    image, text, _ = _features(b=17)
    logits = 7.0 * image @ text.T
    labels = torch.arange(17)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    for impl in ("torch", "fused"):
        got = contrastive_loss(image, text, kind="softmax", logit_scale=7.0, impl=impl)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_contrastive_rejects_unknown_impl_and_bad_input():
    image, text, weight = _features(b=5, dtype=torch.float32)
    with pytest.raises(ValueError, match="loss.impl must be one of"):
        contrastive_loss(image, text, logit_scale=1.0, impl="triton")
    with pytest.raises(ValueError, match="sample_weight must be finite and >= 0"):
        contrastive_loss(image, text, logit_scale=1.0, sample_weight=-weight, impl="fused")


def _token_inputs(n=203, h=24, v=157, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) / h**0.5
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[::7] = -100
    token_weights = torch.rand(n, generator=gen, dtype=torch.float64) * 2
    return hidden, weight, labels, token_weights


def _head(impl, reduction, hidden, weight, labels, token_weights, **loss):
    head = TokenLossHead(LossConfig(impl=impl, **loss))
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = head(h, w, labels, token_weights, reduction=reduction)
    seed = out if reduction == "sum" else out * torch.linspace(0.5, 1.5, out.shape[0], dtype=out.dtype)
    return (out.detach(), *torch.autograd.grad(seed.sum(), [h, w]))


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("loss", [{}, dict(label_smoothing=0.1, z_loss=1e-3)], ids=["plain", "smooth_zloss"])
@pytest.mark.parametrize("weighted", [False, True])
def test_token_loss_head_fused_equals_torch(weighted, loss, reduction):
    hidden, weight, labels, token_weights = _token_inputs()
    token_weights = token_weights if weighted else None
    torch_out = _head("torch", reduction, hidden, weight, labels, token_weights, **loss)
    fused_out = _head("fused", reduction, hidden, weight, labels, token_weights, **loss)
    for t, f in zip(torch_out, fused_out, strict=True):  # float64: both exact
        torch.testing.assert_close(f, t, rtol=1e-12, atol=1e-12)


def test_token_loss_head_float32_fused_no_worse_than_torch():
    """At the training dtype both paths stay within PyTorch's own float32 error of float64."""
    from kernels.testing import relative_error

    hidden, weight, labels, token_weights = _token_inputs(n=411, h=40, v=1013, seed=1)
    opts = dict(label_smoothing=0.1, z_loss=1e-3)
    exact = _head("fused", "sum", hidden, weight, labels, token_weights, **opts)
    low = [hidden.float(), weight.float(), labels, token_weights.float()]
    torch32 = _head("torch", "sum", *low, **opts)
    fused32 = _head("fused", "sum", *low, **opts)
    assert fused32[0].dtype == torch32[0].dtype == torch.float32
    for name, e, t, f in zip(["loss", "grad_hidden", "grad_weight"], exact, torch32, fused32, strict=True):
        assert relative_error(f, e) <= relative_error(t, e) + 1e-6, name
