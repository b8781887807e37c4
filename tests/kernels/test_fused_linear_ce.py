"""fused_linear_cross_entropy: chunked path and reference against float64, semantics, errors.

The Triton path runs the same accuracy checks under TRITON_INTERPRET=1 in
tests/kernels/test_triton_interpret.py (a subprocess; see there why).
"""

import pytest
import torch
import torch.nn.functional as F

from kernels import fused_linear_cross_entropy, fused_linear_cross_entropy_reference
from kernels.fused_linear_cross_entropy import default_chunk_size, triton_interpreted
from kernels.testing import (
    assert_no_worse_than_torch,
    check_extreme_logits_accuracy,
    check_flce_accuracy,
    check_ignored_rows_rule,
    flce_outputs,
    make_flce_inputs,
)

ODD = dict(n=423, h=67, v=1013)
OPTIONS = {
    "plain": {},
    "token_weight": dict(weights=True),
    "label_smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(z_loss=1e-3),
    "softcap": dict(softcap=3.0),
    "bias": dict(bias=True),
    "everything": dict(weights=True, bias=True, label_smoothing=0.2, z_loss=1e-4, softcap=2.5),
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_chunked_fp32_no_worse_than_torch(option, reduction):
    # chunk_size=100 leaves a ragged last chunk (423 = 4 * 100 + 23); every 5th token ignored.
    results = check_flce_accuracy(fused_linear_cross_entropy, **ODD, reduction=reduction,
                                  **OPTIONS[option], impl="chunked", chunk_size=100)
    assert len(results) >= 3


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunked_float64_matches_reference(reduction):
    args = make_flce_inputs(**ODD, bias=True, weights=True)
    opts = dict(label_smoothing=0.1, z_loss=1e-3, softcap=4.0)
    ref = flce_outputs(fused_linear_cross_entropy_reference, *args, reduction, **opts)
    got = flce_outputs(fused_linear_cross_entropy, *args, reduction, **opts, impl="chunked",
                       chunk_size=64)
    for r, g in zip(ref, got, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_matches_f_cross_entropy(impl, reduction, label_smoothing):
    hidden, weight, target, bias, _ = make_flce_inputs(**ODD, bias=True)
    expected = F.cross_entropy(F.linear(hidden, weight, bias), target, ignore_index=-100,
                               label_smoothing=label_smoothing, reduction=reduction)
    got = fused_linear_cross_entropy(hidden, weight, target, bias=bias, reduction=reduction,
                                     label_smoothing=label_smoothing, impl=impl)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_custom_ignore_index_and_all_ignored():
    hidden, weight, target, _, _ = make_flce_inputs(20, 8, 30, ignore_every=0)
    target[:5] = 7
    got = fused_linear_cross_entropy(hidden, weight, target, ignore_index=7, impl="chunked")
    torch.testing.assert_close(got, F.cross_entropy(hidden @ weight.T, target, ignore_index=7))
    # Nothing kept: "sum" is 0, "none" is all zeros, "mean" is NaN exactly like F.cross_entropy.
    target[:] = -100
    assert fused_linear_cross_entropy(hidden, weight, target, reduction="sum").item() == 0.0
    assert not fused_linear_cross_entropy(hidden, weight, target, reduction="none").any()
    assert torch.isnan(fused_linear_cross_entropy(hidden, weight, target))


@pytest.mark.parametrize("impl,kwargs", [
    ("torch", {}),
    ("chunked", {}),
    ("chunked", dict(chunk_size=5)),  # many chunks, the last one ragged
])
def test_ignored_rows_and_empty_reductions_rule(impl, kwargs):
    # The rule of kernels/reference.py's docstring; the Triton path runs the same check in
    # tests/kernels/interpret_cases.py.
    check_ignored_rows_rule(fused_linear_cross_entropy, impl=impl, **kwargs)


def test_nan_in_ignored_row_leaks_in_f_cross_entropy_but_not_here():
    # Why the rule is stated: plain PyTorch spreads an ignored row's NaN into grad_weight.
    hidden, weight, target, _, _ = make_flce_inputs(20, 8, 30, dtype=torch.float32)
    hidden[0] = float("nan")  # target[0] is ignored (every 5th)
    assert target[0] == -100
    w = weight.clone().requires_grad_(True)
    torch_grad = torch.autograd.grad(F.cross_entropy(hidden @ w.T, target), w)[0]
    assert bool(torch.isnan(torch_grad).all())
    for impl in ("torch", "chunked"):
        w = weight.clone().requires_grad_(True)
        loss = fused_linear_cross_entropy(hidden, w, target, impl=impl)
        assert bool(torch.isfinite(torch.autograd.grad(loss, w)[0]).all()), impl


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_extreme_logits_no_worse_than_f_cross_entropy(impl, reduction, label_smoothing):
    # |z| up to several thousand; the oracle is F.cross_entropy in float64 on the same
    # (exactly representable) logits, not kernels/reference.py.
    check_extreme_logits_accuracy(fused_linear_cross_entropy, n=423, h=16, v=1013,
                                  reduction=reduction, label_smoothing=label_smoothing,
                                  impl=impl, chunk_size=100)


def test_extreme_logits_check_catches_the_lse_formula():
    # The formula the kernels used before (p = exp(z - lse), CE = lse - z_t) was 30-500x
    # less accurate than F.cross_entropy at |z| ~ 3000; the check must reject it.
    def lse_formula(hidden, weight, target, *, reduction, bias=None, token_weight=None,
                    label_smoothing=0.0):
        z = hidden @ weight.T
        keep = target != -100
        lse = torch.logsumexp(z, dim=1)
        ce = lse - z.gather(1, target.clamp(min=0)[:, None])[:, 0]
        per_token = torch.where(keep, ce, 0.0)
        return per_token if reduction == "none" else per_token.sum() / keep.sum()

    with pytest.raises(AssertionError, match="grad_hidden"):
        check_extreme_logits_accuracy(lse_formula, n=423, h=16, v=1013, reduction="mean")


@pytest.mark.parametrize("ignored", [True, False])  # index chunks / slice chunks
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunked_handles_strided_inputs(reduction, ignored):
    hidden, weight, target, bias, tw = make_flce_inputs(37, 24, 71, bias=True, weights=True,
                                                        ignore_every=5 if ignored else 0)
    hidden_t, weight_t = hidden.T.contiguous().T, weight.T.contiguous().T
    assert not hidden_t.is_contiguous() and not weight_t.is_contiguous()
    opts = dict(softcap=3.0, label_smoothing=0.1)
    got = flce_outputs(fused_linear_cross_entropy, hidden_t, weight_t, target, bias, tw,
                       reduction, impl="chunked", chunk_size=10, **opts)
    ref = flce_outputs(fused_linear_cross_entropy_reference, hidden, weight, target, bias, tw,
                       reduction, **opts)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def test_default_chunk_size_has_a_byte_budget_and_a_row_floor():
    # 32 MiB / (4 * 32000) = 262 rows, rounded down to a multiple of 32: BLAS ran the
    # logits product 1.5x slower at 262 rows than at 256 (docs/BENCHMARKS.md).
    assert default_chunk_size(4096, 32000) == 256
    assert default_chunk_size(10**6, 1000) == 8384  # 8388 rounded down to a multiple of 32
    assert default_chunk_size(4096, 65536) == 256  # the floor: 64 MiB
    assert default_chunk_size(4096, 262144) == 256
    assert default_chunk_size(10**6, 8192) == 1024
    assert default_chunk_size(100, 65536) == 100  # never more rows than there are
    assert default_chunk_size(0, 10) == 1


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_sum_path_scales_by_upstream_gradient_and_skips_frozen_inputs(reduction):
    # Gradients are formed in forward; backward multiplies them by the upstream factor.
    hidden, weight, target, bias, tw = make_flce_inputs(**ODD, bias=True, weights=True)
    opts = dict(token_weight=tw.clone().requires_grad_(True), reduction=reduction,
                label_smoothing=0.1, z_loss=1e-3, softcap=4.0)
    outs = []
    for impl in ("torch", "chunked"):
        h = hidden.clone().requires_grad_(True)  # weight and bias frozen
        loss = fused_linear_cross_entropy(h, weight, target, bias=bias, impl=impl, **opts)
        outs.append(torch.autograd.grad(-2.5 * loss, [h, opts["token_weight"]]))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_sum_path_no_grad_and_second_backward():
    hidden, weight, target, _, _ = make_flce_inputs(50, 8, 30)
    h = hidden.clone().requires_grad_(True)
    with torch.no_grad():
        value = fused_linear_cross_entropy(h, weight, target, impl="chunked")
    loss = fused_linear_cross_entropy(h, weight, target, impl="chunked")
    assert value.item() == loss.item()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


@pytest.mark.parametrize("weights", [False, True])
def test_micro_batches_with_global_normalizer_equal_full_batch(weights):
    hidden, weight, target, _, token_weight = make_flce_inputs(**ODD, weights=weights)
    opts = dict(label_smoothing=0.1, z_loss=1e-4)
    full = flce_outputs(fused_linear_cross_entropy, hidden, weight, target, None, token_weight,
                        "mean", **opts, impl="chunked")
    count = (target != -100).sum()
    bounds = [0, 100, 300, 423]  # uneven micro-batches
    grad_h = torch.zeros_like(hidden)
    grad_w = torch.zeros_like(weight)
    total = 0.0
    for variant in ("normalizer", "sum"):
        total, grad_w = 0.0, torch.zeros_like(weight)
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            tw = None if token_weight is None else token_weight[lo:hi]
            kw = (dict(reduction="mean", normalizer=count) if variant == "normalizer"
                  else dict(reduction="sum"))
            h = hidden[lo:hi].clone().requires_grad_(True)
            w = weight.clone().requires_grad_(True)
            loss = fused_linear_cross_entropy(h, w, target[lo:hi], token_weight=tw, **opts,
                                              impl="chunked", **kw)
            if variant == "sum":
                loss = loss / count
            loss.backward()
            total += loss.item()
            grad_h[lo:hi] = h.grad
            grad_w += w.grad
        torch.testing.assert_close(torch.tensor(total, dtype=torch.float64), full[0])
        torch.testing.assert_close(grad_h, full[1])
        torch.testing.assert_close(grad_w, full[2])


def test_float_normalizer_equals_tensor_normalizer():
    hidden, weight, target, _, _ = make_flce_inputs(50, 8, 30)
    a = fused_linear_cross_entropy(hidden, weight, target, normalizer=123.0)
    b = fused_linear_cross_entropy(hidden, weight, target, normalizer=torch.tensor(123))
    s = fused_linear_cross_entropy(hidden, weight, target, reduction="sum")
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, s / 123.0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunked_saves_no_n_by_v_tensor(reduction):
    n, v = 256, 512
    hidden, weight, target, _, _ = make_flce_inputs(n, 16, v, dtype=torch.float32)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    saved_chunked, saved_naive = [], []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_chunked.append(t.numel()) or t,
                                                  lambda t: t):
        loss = fused_linear_cross_entropy(hidden, weight, target, impl="chunked", chunk_size=32,
                                          reduction=reduction)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_naive.append(t.numel()) or t,
                                                  lambda t: t):
        naive = fused_linear_cross_entropy(hidden, weight, target, impl="torch",
                                           reduction=reduction)
    # The probe sees the reference's N x V logits, so it would catch the chunked path.
    assert max(saved_naive) >= n * v
    # "none": the inputs and (N,) statistics; "mean": (N,) losses only (its gradients,
    # computed in forward, are the outputs of backward, held on ctx).
    assert max(saved_chunked) == (v * 16 if reduction == "none" else n)
    torch.testing.assert_close(loss, naive)


def test_accuracy_rule_rejects_a_small_bug():
    # A gradient off by 1e-4 relative must fail the rule: the tolerance is not vacuous.
    hidden, weight, target, _, _ = make_flce_inputs(**ODD)
    ref = flce_outputs(fused_linear_cross_entropy_reference, hidden, weight, target, None,
                       None, "mean")
    low = [t.float() for t in (hidden, weight)]
    naive = flce_outputs(fused_linear_cross_entropy_reference, *low, target, None, None, "mean")
    with pytest.raises(AssertionError, match="grad_weight"):
        assert_no_worse_than_torch("grad_weight", naive[2] * (1 + 1e-4), naive[2], ref[2])


def test_impl_selection():
    hidden, weight, target, _, _ = make_flce_inputs(30, 8, 20, dtype=torch.float32)
    ref = fused_linear_cross_entropy_reference(hidden, weight, target)
    for impl in ("auto", "torch", "chunked"):
        torch.testing.assert_close(fused_linear_cross_entropy(hidden, weight, target, impl=impl),
                                   ref)
    if not triton_interpreted():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            fused_linear_cross_entropy(hidden, weight, target, impl="triton")
    with pytest.raises(ValueError, match="impl="):
        fused_linear_cross_entropy(hidden, weight, target, impl="cuda")


# Half precision: gradients are returned in the input dtype, so both PyTorch's and our
# result carry a final rounding of up to half an ulp (relative 2^-9 for bf16, 2^-12 for
# fp16); two correct fp32-accumulated computations that differ in the last fp32 bits can
# round an element to neighbouring half values. The tolerance is a fraction of that step:
# 1e-3 (bf16) and 1e-4 (fp16). Measured worst excess over PyTorch, all cases below: bf16
# 3.8e-4, fp16 5.2e-5.
HALF_TOL = {torch.bfloat16: 1e-3, torch.float16: 1e-4}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", ["plain", "everything"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_chunked_no_worse_than_torch(dtype, option, reduction):
    # CPU half matmuls: fp32 accumulation inside, statistics and cross-chunk sums in fp32.
    results = check_flce_accuracy(fused_linear_cross_entropy, **ODD, reduction=reduction,
                                  **OPTIONS[option], dtype=dtype, tol=HALF_TOL[dtype],
                                  impl="chunked", chunk_size=100)
    assert results[0][0] == "loss"


def test_half_precision_returns_fp32_loss_and_input_dtype_gradients():
    hidden, weight, target, _, tw = make_flce_inputs(40, 8, 50, weights=True,
                                                     dtype=torch.bfloat16)
    got = flce_outputs(fused_linear_cross_entropy, hidden, weight, target, None, tw, "none",
                       impl="chunked", chunk_size=7)
    assert [t.dtype for t in got] == [torch.float32] + [torch.bfloat16] * 3
    # Same semantics as the reference at bf16 (logits from a bf16 matmul, everything after
    # it in fp32): the per-token losses agree to fp32 precision, not just bf16's 2^-9.
    spec = fused_linear_cross_entropy_reference(hidden, weight, target, token_weight=tw,
                                                reduction="none")
    assert spec.dtype == torch.float32
    torch.testing.assert_close(got[0], spec, rtol=1e-6, atol=1e-6)


def _bad_inputs():
    h, w, t, b, tw = make_flce_inputs(10, 4, 6, dtype=torch.float32, weights=True, bias=True)
    bad_t = t.clone()
    bad_t[3] = 6
    neg_t = t.clone()
    neg_t[2] = -1
    nan_w = tw.clone()
    nan_w[1] = float("nan")
    neg_w = tw.clone()
    neg_w[0] = -0.5
    return [
        ((h, w[:, :3], t), {}, "H differs"),
        ((h, w.double(), t), {}, "dtype"),
        ((h, w, t[:9]), {}, r"target must have shape \(N,\)"),
        ((h, w, t.float()), {}, "integer"),
        ((h, w, bad_t), {}, "target value 6 is out of range"),
        ((h, w, neg_t), {}, "target value -1 is out of range"),
        ((h, w, t), dict(token_weight=nan_w), "token_weight must be finite"),
        ((h, w, t), dict(token_weight=neg_w), "token_weight must be finite and >= 0"),
        ((h, w, t), dict(token_weight=tw[:5]), "token_weight must have shape"),
        ((h, w, t), dict(bias=b[:5]), "bias must have shape"),
        ((h, w, t), dict(reduction="avg"), "reduction"),
        ((h, w, t), dict(normalizer=0.0), "normalizer must be finite and > 0"),
        ((h, w, t), dict(normalizer=5.0, reduction="sum"), "normalizer is only used"),
        ((h, w, t), dict(label_smoothing=1.5), "label_smoothing"),
        ((h, w, t), dict(softcap=0.0), "softcap"),
        ((h, w, t), dict(z_loss=-1.0), "z_loss"),
        ((h[0], w, t), {}, "hidden must be 2-D"),
        ((h, w[:0], t), {}, "vocabulary is empty"),
        ((h.long(), w.long(), t), {}, "floating tensor"),
        ((h, w, t), dict(bias=b.double()), "bias has dtype"),
        ((h, w, t), dict(token_weight=torch.ones(10, dtype=torch.long)), "token_weight must be a floating"),
        ((h, w, t), dict(normalizer=float("nan")), "normalizer must be finite and > 0"),
        ((h, w, t), dict(normalizer=torch.ones(2)), "normalizer must be a scalar"),
        ((h, w, t), dict(normalizer=-3.0), "normalizer must be finite and > 0"),
    ]


@pytest.mark.parametrize("impl", ["torch", "chunked"])
@pytest.mark.parametrize("case", range(len(_bad_inputs())))
def test_bad_input_raises_clear_error(case, impl):
    args, kwargs, match = _bad_inputs()[case]
    with pytest.raises(ValueError, match=match):
        fused_linear_cross_entropy(*args, **kwargs, impl=impl)


def test_bad_chunk_size_raises():
    h, w, t, _, _ = make_flce_inputs(10, 4, 6, dtype=torch.float32)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        fused_linear_cross_entropy(h, w, t, impl="chunked", chunk_size=0)


@pytest.mark.slow
@pytest.mark.parametrize("chunk_size", [1, 7, 423, None])
def test_chunk_sizes_slow(chunk_size):
    check_flce_accuracy(fused_linear_cross_entropy, **ODD, reduction="sum",
                        **OPTIONS["everything"], impl="chunked", chunk_size=chunk_size)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("option", ["plain", "everything"])
def test_triton_cuda(dtype, option):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    for reduction in ("mean", "none"):
        check_flce_accuracy(fused_linear_cross_entropy, n=1031, h=257, v=4099,
                            reduction=reduction, **OPTIONS[option], device="cuda",
                            dtype=dtype, tol=tol, impl="triton")
