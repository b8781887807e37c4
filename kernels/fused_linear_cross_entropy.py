"""Fused linear + weighted cross-entropy that never materialises the N x V logits.

Shape legend:
    N  tokens (rows of hidden)            H  hidden size
    V  vocabulary size (rows of weight)   C  rows per chunk (chunked path)
    BN, BV, BH  Triton tile sizes over N, V and H

Why: the logits of N = 8192 tokens over V = 256k classes are N * V * 4 B = 8 GiB in fp32,
and autograd keeps them (plus softmax and grad buffers of the same size) alive from forward
to backward. Both paths here keep only (N,) statistics between forward and backward and
recompute the logits block by block in backward (CCE-style). Nothing is filtered: the
gradient is the exact gradient of the loss in `kernels/reference.py`.

Layout of this file (one op per file): input checks are shared (kernels/_validation.py),
then the chunked PyTorch path (the CPU path), then the Triton kernels, their launchers and
autograd Function, then the functional entry point with `impl=` selection.

Precision: fp16/bf16 inputs are multiplied in their dtype with fp32 accumulation and every
statistic (max, sum of exp, lse, per-token loss) and every cross-chunk gradient sum is fp32;
the loss is returned in fp32. float64 inputs stay float64 on the chunked path.
"""

from __future__ import annotations

import torch

from kernels._validation import check_flce_inputs, check_impl
from kernels.reference import acc_dtype, fused_linear_cross_entropy_reference

try:  # Triton is a dependency, but the chunked path must work where it cannot be imported.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    HAS_TRITON = False

# Chunked path: rows per chunk C = CHUNK_ELEMENTS // V, so one (C, V) buffer holds at most
# 2**21 elements = 8 MiB in fp32 (C = 65 rows at V = 32000, 8 rows at V = 256k). Backward
# keeps at most two such buffers alive (the probabilities/gradient of the logits, and
# 1 - tanh^2 when softcap is on; plus a half-size copy for fp16/bf16 inputs), so the extra
# memory is ~16-20 MiB whatever N is, plus the outputs themselves (grad_weight V x H in
# fp32, grad_hidden N x H) and the BLAS library's own scratch (measured ~40 MiB on CPU at
# H = 512, V = 32000). At N = 4096, V = 32000 the naive path instead keeps the (N, V)
# logits, log-softmax and its gradient alive: 3 x 0.5 GiB. Larger chunks (2**23 elements)
# were not faster on CPU and cost more peak (glibc keeps freed 32 MiB blocks in its heap).
CHUNK_ELEMENTS = 1 << 21


def default_chunk_size(num_rows: int, vocab: int) -> int:
    """Rows per chunk so that one (C, V) fp32 buffer is at most CHUNK_ELEMENTS elements."""
    return max(1, min(num_rows, CHUNK_ELEMENTS // max(vocab, 1)))


# ---------------------------------------------------------------------------------------
# Chunked PyTorch path
# ---------------------------------------------------------------------------------------


def _chunk_logits(h_c, weight, bias, dtype):
    """(C, V) logits of a chunk in the accumulation dtype (the matmul accumulates in fp32)."""
    if bias is None:
        z = h_c @ weight.T
    else:
        z = torch.addmm(bias, h_c, weight.T)
    return z if z.dtype == dtype else z.to(dtype)


def _chunks(keep: torch.Tensor, chunk_size: int):
    """Yield (start, end, rows) with rows = indices of non-ignored tokens in [start, end)."""
    n = keep.shape[0]
    for start in range(0, n, chunk_size):
        end = min(n, start + chunk_size)
        rows = keep[start:end].nonzero().squeeze(1) + start
        if rows.numel():
            yield start, end, rows


def _rows_of(hidden, start, end, rows):
    # Ignored tokens (padding) are dropped before the matmul: no flops spent on them.
    if rows.numel() == end - start:
        return hidden[start:end]
    return hidden.index_select(0, rows)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Chunked over N; forward saves lse (N,), backward recomputes each (C, V) block.

    forward(hidden (N, H), weight (V, H), bias (V,) | None, target (N,),
            token_weight (N,) | None, ignore_index, label_smoothing, z_loss, softcap,
            chunk_size) -> per-token weighted loss (N,) in the accumulation dtype, 0 where
    ignored. Reductions are applied outside, so backward receives a per-token gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, token_weight, ignore_index,
                label_smoothing, z_loss, softcap, chunk_size):
        dtype = acc_dtype(hidden.dtype)
        n, _v = hidden.shape[0], weight.shape[0]
        keep = target != ignore_index
        loss = torch.zeros(n, dtype=dtype, device=hidden.device)  # unweighted l_i
        lse = torch.zeros(n, dtype=dtype, device=hidden.device)
        ls = float(label_smoothing)
        for start, end, rows in _chunks(keep, chunk_size):
            z = _chunk_logits(_rows_of(hidden, start, end, rows), weight, bias, dtype)  # (C, V)
            if softcap is not None:
                z.div_(softcap).tanh_().mul_(softcap)
            t = target.index_select(0, rows).long()
            z_target = z.gather(1, t[:, None])[:, 0]
            z_mean = z.mean(dim=1) if ls > 0.0 else None
            m = z.amax(dim=1)
            lse_c = z.sub_(m[:, None]).exp_().sum(dim=1).log_().add_(m)  # z is consumed here
            l_c = (1.0 - ls) * (lse_c - z_target)
            if ls > 0.0:
                l_c = l_c + ls * (lse_c - z_mean)
            if z_loss:
                l_c = l_c + z_loss * lse_c.square()
            loss.index_copy_(0, rows, l_c)
            lse.index_copy_(0, rows, lse_c)
            del z
        out = loss if token_weight is None else loss * token_weight.to(dtype)
        ctx.save_for_backward(hidden, weight, bias, target, token_weight, lse, loss)
        ctx.config = (ignore_index, ls, float(z_loss), softcap, chunk_size)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, target, token_weight, lse, loss = ctx.saved_tensors
        ignore_index, ls, z_loss, softcap, chunk_size = ctx.config
        need_h, need_w, need_b, _, need_tw = ctx.needs_input_grad[:5]
        dtype = acc_dtype(hidden.dtype)
        low_precision = hidden.dtype != dtype
        v = weight.shape[0]
        g = grad_out.to(dtype)
        if token_weight is not None:
            g = g * token_weight.to(dtype)  # d out_i / d l_i = w_i
        grad_h = torch.zeros_like(hidden) if need_h else None
        # Cross-chunk sums are kept in the accumulation dtype (fp32 for bf16 inputs).
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(v, dtype=dtype, device=weight.device) if need_b else None
        keep = target != ignore_index
        if need_h or need_w or need_b:
            for start, end, rows in _chunks(keep, chunk_size):
                h_c = _rows_of(hidden, start, end, rows)
                z = _chunk_logits(h_c, weight, bias, dtype)  # (C, V), the one big buffer
                dcap = None
                if softcap is not None:
                    z.div_(softcap).tanh_()
                    dcap = 1.0 - z.square()  # d softcap(x) / dx, second (C, V) buffer
                    z.mul_(softcap)
                g_c = g.index_select(0, rows)
                lse_c = lse.index_select(0, rows)
                # dl_i/dz_ij = (1 + 2 z_loss lse_i) p_ij - (1 - ls) [j = t_i] - ls / V
                dz = z.sub_(lse_c[:, None]).exp_()
                dz.mul_((g_c * (1.0 + 2.0 * z_loss * lse_c))[:, None])
                if ls > 0.0:
                    dz.sub_((g_c * (ls / v))[:, None])
                t = target.index_select(0, rows).long()
                dz.scatter_add_(1, t[:, None], (-(1.0 - ls) * g_c)[:, None])
                if dcap is not None:
                    dz.mul_(dcap)
                    del dcap
                if grad_b is not None:
                    grad_b += dz.sum(dim=0)
                dz_in = dz.to(hidden.dtype) if low_precision else dz
                if grad_h is not None:
                    grad_h.index_copy_(0, rows, dz_in @ weight)
                if grad_w is not None:
                    # fp32 product for half inputs: a bf16 product per chunk would round
                    # each chunk's partial sum (C x H upcast is small next to C x V).
                    grad_w.addmm_(dz.T, h_c.to(dtype) if low_precision else h_c)
                del z, dz, dz_in
        grad_tw = None
        if need_tw:
            grad_tw = (grad_out.to(dtype) * loss).to(token_weight.dtype)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, grad_tw, None, None, None, None, None


# ---------------------------------------------------------------------------------------
# Triton path
# ---------------------------------------------------------------------------------------

# Tiles: forward holds one (BN, BV) fp32 logits tile per program; backward one (BN, BV) tile
# plus (BN, BH) / (BV, BH) partial products. Nothing of size N x V exists at any time.
TRITON_BLOCKS_CUDA = (64, 128, 32)  # (BN, BV, BH): unmeasured this session (no GPU)
TRITON_BLOCKS_INTERPRETER = (16, 16, 16)  # tiny tiles so the tests cover many partial tiles

if HAS_TRITON:

    @triton.jit
    def _tanh(x):
        # tanh from exp, stable for large |x| (tl has no portable tanh across backends).
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(x >= 0, t, -t)

    @triton.jit
    def _logits_tile(h_ptr, w_ptr, b_ptr, rn, rv, mask_n, mask_v, H, stride_hn, stride_hh,
                     stride_wv, stride_wh, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr):
        acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            rh = h0 + tl.arange(0, BLOCK_H)
            mask_h = rh < H
            a = tl.load(h_ptr + rn[:, None] * stride_hn + rh[None, :] * stride_hh,
                        mask=mask_n[:, None] & mask_h[None, :], other=0.0)
            b = tl.load(w_ptr + rv[None, :] * stride_wv + rh[:, None] * stride_wh,
                        mask=mask_v[None, :] & mask_h[:, None], other=0.0)
            acc += tl.dot(a, b, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rv, mask=mask_v, other=0.0).to(tl.float32)[None, :]
        return acc

    @triton.jit
    def _flce_fwd_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, zt_ptr, zsum_ptr, N, V, H,
                         stride_hn, stride_hh, stride_wv, stride_wh, softcap,
                         HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                         PRECISION: tl.constexpr):
        # One program per BN rows; online log-sum-exp over V tiles. Writes (N,) statistics:
        # lse, the target logit and the sum of logits (for label smoothing).
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = rn < N
        tgt = tl.load(t_ptr + rn, mask=mask_n, other=-1)
        m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        s = tl.zeros([BLOCK_N], dtype=tl.float32)
        zt = tl.zeros([BLOCK_N], dtype=tl.float32)
        zsum = tl.zeros([BLOCK_N], dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            rv = v0 + tl.arange(0, BLOCK_V)
            mask_v = rv < V
            z = _logits_tile(h_ptr, w_ptr, b_ptr, rn, rv, mask_n, mask_v, H, stride_hn,
                             stride_hh, stride_wv, stride_wh, HAS_BIAS, BLOCK_N, BLOCK_V,
                             BLOCK_H, PRECISION)
            if HAS_SOFTCAP:
                z = softcap * _tanh(z / softcap)
            zt += tl.sum(tl.where(rv[None, :] == tgt[:, None], z, 0.0), axis=1)
            zsum += tl.sum(tl.where(mask_v[None, :], z, 0.0), axis=1)
            z = tl.where(mask_v[None, :], z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=1))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
            m = m_new
        tl.store(lse_ptr + rn, m + tl.log(s), mask=mask_n)
        tl.store(zt_ptr + rn, zt, mask=mask_n)
        tl.store(zsum_ptr + rn, zsum, mask=mask_n)

    @triton.jit
    def _flce_bwd_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, coef_ptr, tcoef_ptr, scoef_ptr,
                         gh_ptr, gw_ptr, gb_ptr, N, V, H, stride_hn, stride_hh, stride_wv,
                         stride_wh, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                         NEED_GH: tl.constexpr, NEED_GW: tl.constexpr, NEED_GB: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                         PRECISION: tl.constexpr):
        # One program per (BN, BV) tile: recompute the logits tile, form dL/dz in registers,
        # and atomically add its contributions to grad_hidden, grad_weight and grad_bias
        # (fp32 buffers). Atomics make GPU summation order, hence the last bits, vary.
        pid_n = tl.program_id(0)
        pid_v = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rv = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_n = rn < N
        mask_v = rv < V
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rn, rv, mask_n, mask_v, H, stride_hn,
                         stride_hh, stride_wv, stride_wh, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H,
                         PRECISION)
        if HAS_SOFTCAP:
            th = _tanh(z / softcap)
            z = softcap * th
        tgt = tl.load(t_ptr + rn, mask=mask_n, other=-1)
        lse = tl.load(lse_ptr + rn, mask=mask_n, other=0.0)
        coef = tl.load(coef_ptr + rn, mask=mask_n, other=0.0)
        tcoef = tl.load(tcoef_ptr + rn, mask=mask_n, other=0.0)
        scoef = tl.load(scoef_ptr + rn, mask=mask_n, other=0.0)
        p = tl.exp(z - lse[:, None])
        dz = p * coef[:, None] - scoef[:, None]
        dz -= tl.where(rv[None, :] == tgt[:, None], tcoef[:, None], 0.0)
        if HAS_SOFTCAP:
            dz = dz * (1.0 - th * th)
        dz = tl.where(mask_n[:, None] & mask_v[None, :], dz, 0.0)
        if NEED_GB:
            tl.atomic_add(gb_ptr + rv, tl.sum(dz, axis=0), mask=mask_v)
        dz_in = dz.to(h_ptr.dtype.element_ty)
        for h0 in range(0, H, BLOCK_H):
            rh = h0 + tl.arange(0, BLOCK_H)
            mask_h = rh < H
            if NEED_GH:
                w = tl.load(w_ptr + rv[:, None] * stride_wv + rh[None, :] * stride_wh,
                            mask=mask_v[:, None] & mask_h[None, :], other=0.0)
                gh = tl.dot(dz_in, w, input_precision=PRECISION)  # (BN, BH)
                tl.atomic_add(gh_ptr + rn[:, None] * H + rh[None, :], gh,
                              mask=mask_n[:, None] & mask_h[None, :])
            if NEED_GW:
                h = tl.load(h_ptr + rn[:, None] * stride_hn + rh[None, :] * stride_hh,
                            mask=mask_n[:, None] & mask_h[None, :], other=0.0)
                gw = tl.dot(tl.trans(dz_in), h, input_precision=PRECISION)  # (BV, BH)
                tl.atomic_add(gw_ptr + rv[:, None] * H + rh[None, :], gw,
                              mask=mask_v[:, None] & mask_h[None, :])


def triton_interpreted() -> bool:
    """True when this process decorated the kernels with Triton's CPU interpreter.

    Triton reads TRITON_INTERPRET when `@triton.jit` runs, i.e. when this module is first
    imported; setting the variable later has no effect in this process.
    """
    return HAS_TRITON and type(_flce_fwd_kernel).__name__ == "InterpretedFunction"


def triton_unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the Triton path cannot run on these inputs, or None when it can."""
    if not HAS_TRITON:
        return "triton is not importable"
    if triton_interpreted():
        if dtype != torch.float32:
            return (f"the Triton CPU interpreter (TRITON_INTERPRET=1) supports float32 only, "
                    f"got {dtype}")
        return None
    if device.type != "cuda":
        return (f"tensors are on {device}; Triton needs CUDA tensors, or TRITON_INTERPRET=1 "
                f"set before kernels/ is first imported (float32 only)")
    if dtype == torch.float64:
        return "the Triton path takes float32/bfloat16/float16, not float64"
    return None


def _blocks() -> tuple[int, int, int]:
    return TRITON_BLOCKS_INTERPRETER if triton_interpreted() else TRITON_BLOCKS_CUDA


class TritonLinearCrossEntropy(torch.autograd.Function):
    """Same contract as ChunkedLinearCrossEntropy, computed by the Triton kernels."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, token_weight, ignore_index,
                label_smoothing, z_loss, softcap):
        n, h = hidden.shape
        v = weight.shape[0]
        bn, bv, bh = _blocks()
        keep = target != ignore_index
        tgt = torch.where(keep, target, torch.full_like(target, -1)).to(torch.int32)
        stats = torch.empty(3, n, dtype=torch.float32, device=hidden.device)
        lse, z_target, z_sum = stats[0], stats[1], stats[2]
        precision = "ieee"  # exact fp32 products (no TF32); bf16 dots accumulate in fp32
        bias_arg = bias if bias is not None else hidden  # dummy pointer when HAS_BIAS=False
        if n:
            _flce_fwd_kernel[(triton.cdiv(n, bn),)](
                hidden, weight, bias_arg, tgt, lse, z_target, z_sum, n, v, h,
                hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                float(softcap) if softcap is not None else 1.0,
                HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
                BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, PRECISION=precision)
        ls = float(label_smoothing)
        loss = (1.0 - ls) * (lse - z_target) + ls * (lse - z_sum / v) + z_loss * lse.square()
        loss = torch.where(keep, loss, torch.zeros_like(loss))
        out = loss if token_weight is None else loss * token_weight.float()
        ctx.save_for_backward(hidden, weight, bias, tgt, token_weight, lse, loss)
        ctx.config = (ls, float(z_loss), softcap, precision)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, tgt, token_weight, lse, loss = ctx.saved_tensors
        ls, z_loss, softcap, precision = ctx.config
        need_h, need_w, need_b, _, need_tw = ctx.needs_input_grad[:5]
        n, h = hidden.shape
        v = weight.shape[0]
        bn, bv, bh = _blocks()
        g = grad_out.float() * (tgt >= 0)
        if token_weight is not None:
            g = g * token_weight.float()
        coef = g * (1.0 + 2.0 * z_loss * lse)
        tcoef = g * (1.0 - ls)
        scoef = g * (ls / v)
        dev = hidden.device
        gh = torch.zeros(n, h, dtype=torch.float32, device=dev) if need_h else None
        gw = torch.zeros(v, h, dtype=torch.float32, device=dev) if need_w else None
        gb = torch.zeros(v, dtype=torch.float32, device=dev) if need_b else None
        if n and (need_h or need_w or need_b):
            _flce_bwd_kernel[(triton.cdiv(n, bn), triton.cdiv(v, bv))](
                hidden, weight, bias if bias is not None else hidden, tgt, lse, coef, tcoef,
                scoef, gh if need_h else lse, gw if need_w else lse, gb if need_b else lse,
                n, v, h, hidden.stride(0), hidden.stride(1), weight.stride(0),
                weight.stride(1), float(softcap) if softcap is not None else 1.0,
                HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
                NEED_GH=bool(need_h), NEED_GW=bool(need_w), NEED_GB=bool(need_b),
                BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, PRECISION=precision)
        grad_tw = (grad_out.float() * loss).to(token_weight.dtype) if need_tw else None
        return (gh.to(hidden.dtype) if need_h else None,
                gw.to(weight.dtype) if need_w else None,
                gb.to(bias.dtype) if need_b else None,
                None, grad_tw, None, None, None, None)


# ---------------------------------------------------------------------------------------
# Functional entry point
# ---------------------------------------------------------------------------------------


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """The implementation `impl` means for these inputs; raises if "triton" cannot run."""
    check_impl(impl)
    if impl == "auto":
        usable = device.type == "cuda" and triton_unavailable_reason(device, dtype) is None
        return "triton" if usable else "chunked"
    if impl == "triton":
        reason = triton_unavailable_reason(device, dtype)
        if reason is not None:
            raise RuntimeError(f"impl='triton' cannot run: {reason}. Use impl='chunked' "
                               f"(or 'auto') instead.")
    return impl


def fused_linear_cross_entropy(
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
    impl: str = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Weighted cross-entropy of `hidden @ weight.T + bias` without the (N, V) logits.

    Semantics are those of `kernels.reference.fused_linear_cross_entropy_reference` (read
    its docstring): per-token l_i = (1 - ls) CE_i + ls * mean_j(-log p_ij) + z_loss lse_i^2
    on optionally softcapped logits, times token_weight_i; ignored tokens give 0 and are
    not counted; "mean" divides the weighted sum by `normalizer` (default: the number of
    non-ignored tokens; pass a global count for gradient accumulation / data parallelism).

    Args:
        hidden: (N, H) float16/bfloat16/float32/float64.
        weight: (V, H) same dtype and device.
        target: (N,) integer, in [0, V) or ignore_index.
        bias: optional (V,).
        token_weight: optional (N,), finite and >= 0 (gets a gradient if it requires one).
        ignore_index: target value that marks tokens to skip.
        label_smoothing: in [0, 1], as in F.cross_entropy.
        z_loss: coefficient of lse^2 (>= 0).
        softcap: logits become softcap * tanh(logits / softcap) before everything.
        reduction: "mean" | "sum" | "none" ((N,) with zeros at ignored tokens).
        normalizer: positive float or scalar tensor, reduction="mean" only.
        impl: "auto" (triton on CUDA, chunked otherwise) | "torch" (the reference, N x V) |
            "chunked" (PyTorch, chunks of rows) | "triton" (raises if it cannot run).
        chunk_size: rows per chunk for impl="chunked" (default: 2**21 // V, i.e. one
            (C, V) fp32 buffer <= 8 MiB).

    Returns:
        Scalar (or (N,) for "none"); float32 for half inputs, else the input dtype.
    """
    check_flce_inputs(hidden, weight, target, bias, token_weight, ignore_index,
                      label_smoothing, z_loss, softcap, reduction, normalizer)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    kind = resolve_impl(impl, hidden.device, hidden.dtype)
    if kind == "torch":
        return fused_linear_cross_entropy_reference(
            hidden, weight, target, bias=bias, token_weight=token_weight,
            ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
            softcap=softcap, reduction=reduction, normalizer=normalizer)
    if kind == "chunked":
        chunk = chunk_size or default_chunk_size(hidden.shape[0], weight.shape[0])
        per_token = ChunkedLinearCrossEntropy.apply(
            hidden, weight, bias, target, token_weight, ignore_index, label_smoothing,
            z_loss, softcap, chunk)
    else:
        per_token = TritonLinearCrossEntropy.apply(
            hidden, weight, bias, target, token_weight, ignore_index, label_smoothing,
            z_loss, softcap)
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    if normalizer is None:
        normalizer = (target != ignore_index).sum()
    return total / normalizer
