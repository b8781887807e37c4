"""contrastive_loss (single process): tiled paths against float64, semantics, errors."""

import pytest
import torch
import torch.nn.functional as F

from kernels import contrastive_loss, contrastive_loss_reference
from kernels.testing import check_contrastive_accuracy


@pytest.mark.parametrize("block_size", [16, 77, 200])  # 77 = 4 * 16 + 13: uneven tiles
@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_chunked_fp32_no_worse_than_torch(kind, weights, block_size):
    results = check_contrastive_accuracy(contrastive_loss, b=77, d=19, kind=kind,
                                         weights=weights, impl="chunked",
                                         block_size=block_size)
    assert [r[0] for r in results][:4] == ["loss", "grad_image", "grad_text", "grad_scale"]


# See tests/kernels/test_fused_linear_ce.py for why half precision needs a small tolerance
# (the final rounding of gradients to the input dtype). Measured excess here: 0 (bf16, fp16).
HALF_TOL = {torch.bfloat16: 1e-3, torch.float16: 1e-4}


@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_chunked_no_worse_than_torch(dtype, kind, weights):
    check_contrastive_accuracy(contrastive_loss, b=77, d=19, kind=kind, weights=weights,
                               dtype=dtype, tol=HALF_TOL[dtype], impl="chunked", block_size=16)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_tiled_paths_save_no_b_by_b_tensor(kind):
    b, d, block = 96, 8, 32
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(b, d, generator=gen, requires_grad=True)
    y = torch.randn(b, d, generator=gen, requires_grad=True)
    bias = -1.0 if kind == "sigmoid" else None

    def saved_sizes(impl):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t,
                                                      lambda t: t):
            loss = contrastive_loss(x, y, kind=kind, logit_scale=3.0, logit_bias=bias,
                                    impl=impl, block_size=block)
        return loss, sizes

    naive_loss, naive = saved_sizes("torch")
    tiled_loss, tiled = saved_sizes("chunked")
    assert max(naive) >= b * b  # the probe sees the reference's B x B logits
    assert max(tiled) <= b * d  # features and (B,) statistics only
    torch.testing.assert_close(tiled_loss, naive_loss)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_float64_matches_reference(kind):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(45, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randn(45, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True) if kind == "sigmoid" else None
    w = torch.rand(45, generator=gen, dtype=torch.float64)
    leaves = [x, y, s] + ([b] if b is not None else [])
    outs = []
    for fn, kw in ((contrastive_loss_reference, {}),
                   (contrastive_loss, dict(impl="chunked", block_size=8)),
                   (contrastive_loss, dict(impl="torch"))):
        loss = fn(x, y, kind=kind, logit_scale=s, logit_bias=b, sample_weight=w, **kw)
        outs.append((loss, *torch.autograd.grad(loss, leaves)))
    for other in outs[1:]:
        for r, g in zip(outs[0], other, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def test_softmax_matches_clip_formula_and_float_scale():
    # Unweighted softmax == open_clip's (CE(L, arange) + CE(L.T, arange)) / 2.
    gen = torch.Generator().manual_seed(2)
    x = F.normalize(torch.randn(33, 8, generator=gen, dtype=torch.float64), dim=1)
    y = F.normalize(torch.randn(33, 8, generator=gen, dtype=torch.float64), dim=1)
    logits = 14.0 * x @ y.T
    labels = torch.arange(33)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    got = contrastive_loss(x, y, logit_scale=14.0, impl="chunked", block_size=10)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_sigmoid_matches_siglip_formula():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(21, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(21, 5, generator=gen, dtype=torch.float64)
    labels = 2 * torch.eye(21, dtype=torch.float64) - 1
    expected = -F.logsigmoid(labels * (3.0 * x @ y.T - 2.0)).sum() / 21
    got = contrastive_loss(x, y, kind="sigmoid", logit_scale=3.0, logit_bias=-2.0,
                           impl="chunked", block_size=4)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_zero_weights_remove_examples_rows_and_columns():
    # softmax: w_i = 0 drops image i's row term and text i's column term, nothing else.
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(10, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(10, 4, generator=gen, dtype=torch.float64)
    w = torch.ones(10, dtype=torch.float64)
    w[3] = 0.0
    logits = 2.0 * x @ y.T
    i2t = torch.logsumexp(logits, 1) - logits.diagonal()
    t2i = torch.logsumexp(logits, 0) - logits.diagonal()
    keep = w > 0
    expected = (i2t[keep].sum() + t2i[keep].sum()) / 20
    got = contrastive_loss(x, y, logit_scale=2.0, sample_weight=w, impl="chunked", block_size=3)
    torch.testing.assert_close(got, expected)


def _bad_contrastive():
    x = torch.randn(6, 4)
    y = torch.randn(6, 4)
    w = torch.ones(6)
    nan_w = w.clone()
    nan_w[2] = float("nan")
    return [
        ((x, y[:5]), dict(logit_scale=1.0), "must match"),
        ((x, y.double()), dict(logit_scale=1.0), "dtype"),
        ((x, y), dict(logit_scale=1.0, kind="cosine"), "kind="),
        ((x, y), dict(logit_scale=1.0, sample_weight=-w), "sample_weight must be finite"),
        ((x, y), dict(logit_scale=1.0, sample_weight=nan_w), "sample_weight must be finite"),
        ((x, y), dict(logit_scale=1.0, sample_weight=w[:3]), "sample_weight must have shape"),
        ((x, y), dict(logit_scale=torch.ones(2)), "logit_scale must be a scalar"),
        ((x, y), dict(logit_scale=float("nan")), "logit_scale must be finite"),
        ((x, y), dict(logit_scale=1.0, logit_bias=1.0), "logit_bias is only used"),
        ((x, y), dict(logit_scale=1.0, block_size=0), "block_size"),
        ((x[0], y[0]), dict(logit_scale=1.0), "image must be 2-D"),
        ((x.long(), y.long()), dict(logit_scale=1.0), "floating tensor"),
        ((x, y), dict(logit_scale=float("inf")), "logit_scale must be finite"),
        ((x, y), dict(logit_scale=1.0, kind="sigmoid", logit_bias=torch.ones(3)),
         "logit_bias must be a scalar"),
        ((x, y), dict(logit_scale=1.0, kind="sigmoid", logit_bias=torch.tensor(float("nan"))),
         "logit_bias must be finite"),
        # B = 0: softmax used to fail naming the fused CE's internals ("weight has V = 0
        # rows"), sigmoid returned NaN.
        ((x[:0], y[:0]), dict(logit_scale=1.0), r"image and text features are empty \(B=0"),
        ((x[:0], y[:0]), dict(logit_scale=1.0, kind="sigmoid", logit_bias=-1.0),
         r"image and text features are empty \(B=0"),
    ]


@pytest.mark.parametrize("impl", ["torch", "chunked"])
@pytest.mark.parametrize("case", range(len(_bad_contrastive())))
def test_bad_input_raises_clear_error(case, impl):
    args, kwargs, match = _bad_contrastive()[case]
    with pytest.raises(ValueError, match=match):
        contrastive_loss(*args, **kwargs, impl=impl)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_triton_cuda(dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    check_contrastive_accuracy(contrastive_loss, b=1031, d=67, kind="softmax", weights=True,
                               device="cuda", dtype=dtype,
                               tol=1e-6 if dtype == torch.float32 else 1e-3, impl="triton")
