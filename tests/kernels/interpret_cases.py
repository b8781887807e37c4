"""Triton kernels under the CPU interpreter (TRITON_INTERPRET=1), float32, tiny shapes.

Not collected directly (the file name does not match test_*.py): test_triton_interpret.py
runs it in a fresh `python -m pytest` subprocess with TRITON_INTERPRET=1 in its environment.
Triton decides interpreter vs compiler when `@triton.jit` runs, i.e. when
kernels/fused_linear_cross_entropy.py is first imported, so the variable must be set before
any kernels import in that process; a subprocess is the only way that holds whatever else
the main pytest process has imported (Lightning, other tests importing kernels, ...). The
line below also sets it, for someone running this file alone by path.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels import contrastive_loss, fused_linear_cross_entropy  # noqa: E402
from kernels.fused_linear_cross_entropy import triton_interpreted  # noqa: E402
from kernels.testing import (  # noqa: E402
    check_contrastive_accuracy,
    check_extreme_logits_accuracy,
    check_flce_accuracy,
    check_ignored_rows_rule,
    make_flce_inputs,
)

if not triton_interpreted():
    pytest.skip("kernels were imported before TRITON_INTERPRET=1 was set in this process; "
                "run via tests/kernels/test_triton_interpret.py", allow_module_level=True)

# N=37, H=24, V=71 with 16-wide tiles: every dimension has a ragged last tile.
TINY = dict(n=37, h=24, v=71)
EVERYTHING = dict(weights=True, bias=True, label_smoothing=0.2, z_loss=1e-3, softcap=2.0)
SINGLE = {
    "token_weight": dict(weights=True),
    "label_smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(z_loss=1e-3),
    "softcap": dict(softcap=3.0),
    "bias": dict(bias=True),
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", ["plain", "everything"])
def test_triton_flce(option, reduction):
    opts = EVERYTHING if option == "everything" else {}
    check_flce_accuracy(fused_linear_cross_entropy, **TINY, reduction=reduction, **opts,
                        impl="triton")


@pytest.mark.parametrize("option", list(SINGLE))
def test_triton_flce_single_option(option):
    check_flce_accuracy(fused_linear_cross_entropy, **TINY, reduction="mean",
                        **SINGLE[option], impl="triton")


def test_triton_equals_chunked_and_handles_strided_inputs():
    hidden, weight, target, bias, tw = make_flce_inputs(**TINY, bias=True, weights=True,
                                                        dtype=torch.float32)
    # Column-major views: the kernels read through strides, no copy is assumed.
    hidden_t = hidden.T.contiguous().T
    weight_t = weight.T.contiguous().T
    assert not hidden_t.is_contiguous() and not weight_t.is_contiguous()
    a = fused_linear_cross_entropy(hidden_t, weight_t, target, bias=bias, token_weight=tw,
                                   softcap=2.0, reduction="none", impl="triton")
    b = fused_linear_cross_entropy(hidden, weight, target, bias=bias, token_weight=tw,
                                   softcap=2.0, reduction="none", impl="chunked")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_triton_micro_batches_with_global_normalizer_equal_full_batch():
    hidden, weight, target, _, tw = make_flce_inputs(**TINY, weights=True, dtype=torch.float32)
    opts = dict(label_smoothing=0.1, z_loss=1e-3, impl="triton")

    def run(rows, normalizer=None):
        h = hidden[rows].clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        loss = fused_linear_cross_entropy(h, w, target[rows], token_weight=tw[rows],
                                          normalizer=normalizer, **opts)
        return (loss.detach(), *torch.autograd.grad(loss, [h, w]))

    full = run(slice(0, None))
    count = (target != -100).sum()
    parts = [run(slice(0, 20), count), run(slice(20, None), count)]  # uneven: 20 + 17
    torch.testing.assert_close(parts[0][0] + parts[1][0], full[0])
    torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]]), full[1])
    torch.testing.assert_close(parts[0][2] + parts[1][2], full[2])


def test_triton_ignored_rows_and_empty_reductions_rule():
    # Every target ignored with "mean" used to give 1/0 = inf upstream and NaN gradients
    # everywhere; a NaN in an ignored row used to make grad_weight all NaN.
    check_ignored_rows_rule(fused_linear_cross_entropy, **TINY, impl="triton")


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_extreme_logits_no_worse_than_f_cross_entropy(reduction, label_smoothing):
    check_extreme_logits_accuracy(fused_linear_cross_entropy, n=37, h=16, v=71,
                                  reduction=reduction, label_smoothing=label_smoothing,
                                  impl="triton")


@pytest.mark.parametrize("weights", [False, True])
def test_triton_contrastive_softmax(weights):
    check_contrastive_accuracy(contrastive_loss, b=21, d=24, kind="softmax", weights=weights,
                               impl="triton")


def test_interpreter_refuses_what_it_cannot_run():
    hidden, weight, target, _, _ = make_flce_inputs(5, 4, 6)  # float64
    with pytest.raises(RuntimeError, match="float32 only"):
        fused_linear_cross_entropy(hidden, weight, target, impl="triton")
    with pytest.raises(RuntimeError, match="float32 only"):
        fused_linear_cross_entropy(hidden.bfloat16(), weight.bfloat16(), target, impl="triton")
    # "auto" never picks the interpreter for CPU tensors: it is for tests, not training.
    from kernels.fused_linear_cross_entropy import resolve_impl

    assert resolve_impl("auto", hidden.device, torch.float32) == "chunked"


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(SINGLE))
def test_triton_flce_all_options_slow(option, reduction):
    check_flce_accuracy(fused_linear_cross_entropy, **TINY, reduction=reduction,
                        **SINGLE[option], impl="triton")


@pytest.mark.slow
def test_triton_flce_odd_shape_slow():
    check_flce_accuracy(fused_linear_cross_entropy, n=423, h=67, v=1013, reduction="none",
                        **EVERYTHING, impl="triton")
