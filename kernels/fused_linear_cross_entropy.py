"""Fused linear + weighted cross-entropy that never materialises the N x V logits.

Shape legend:
    N  tokens (rows of hidden)            H  hidden size
    V  vocabulary size (rows of weight)   C  rows per chunk (chunked path)
    BN, BV, BH  Triton tile sizes over N, V and H

Why: the logits of N = 8192 tokens over V = 256k classes are N * V * 4 B = 8 GiB in fp32,
and autograd keeps them (plus softmax and grad buffers of the same size) alive from forward
to backward. Nothing of size N x V is kept: the Triton path and the chunked path with
reduction="none" keep (N,) statistics (row max m, and s or log s) and recompute the logits
block by block in backward (CCE-style); the chunked path with "sum"/"mean" computes the
gradients block by block during forward (Liger-style: its backward only scales them).
Nothing is filtered: the gradient is the exact gradient of the loss in
`kernels/reference.py`, which also states the rule for ignored rows and empty means.

Layout of this file (one op per file): input checks are shared (kernels/_validation.py),
then the chunked PyTorch path (the CPU path), then the Triton kernels, their launchers and
autograd Function, then the functional entry point with `impl=` selection.

Precision: fp16/bf16 inputs are multiplied in their dtype with fp32 accumulation and every
statistic (max, sum of exp, per-token loss) and every cross-chunk gradient sum is fp32;
the loss is returned in fp32. float64 inputs stay float64 on the chunked path. Losses and
probabilities are formed from z - m and log s as log_softmax does, never from lse = m +
log s: at |z| ~ 3000 fp32 spacing is 2^-12, and exp(z - lse) or lse - z_t carried that
error into every gradient (measured 450-500x F.cross_entropy's error before the change).
"""

from __future__ import annotations

import torch

from kernels._validation import check_flce_inputs, check_impl
from kernels.reference import (
    acc_dtype,
    fused_linear_cross_entropy_reference,
    mean_denominator,
    reduce_per_token,
)

try:  # Triton is a dependency, but the chunked path must work where it cannot be imported.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    HAS_TRITON = False

# Chunked path: C = max(MIN_CHUNK_ROWS, CHUNK_BYTES // (4 V)) non-ignored rows per chunk,
# rounded down to a multiple of CHUNK_ROW_MULTIPLE, capped at N. One (C, V) fp32 buffer is
# allocated per call and reused by every chunk (plus a second one for 1 - tanh^2 when
# softcap is on): <= 32 MiB at V <= 32768 (C = 256 at V = 32000: 31.25 MiB), C = 256 rows
# above (64 MiB at V = 65536, 256 MiB at V = 262144). Why a multiple of 32: the logits
# product writes a (V, C) block with leading dimension C, and BLAS ran the forward product
# at C = 262 (the unrounded 32 MiB size at V = 32000) 1.5x slower than at C = 256, 264 or
# 512, and than one full-N product (N = 3686, H = 512, one thread: 3.14 s vs 1.98-2.10 s
# for the 14-15 chunks; the other two products were unaffected); that was CCE's one-thread lead
# at V = 32000 (docs/BENCHMARKS.md, "Issue 15, CPU against CCE"). Why a row
# floor: each chunk runs three (C, H) x (H, V)-sized matmuls, and at 32-65 rows (the old
# 8 MiB budget at V = 65536) BLAS runs well below its large-matrix speed and the many small
# ops pay thread-pool barriers on a shared machine (measured 2.2x naive there). Why reuse
# one buffer: a fresh 32 MiB tensor per chunk is a fresh mmap, and its page faults cost up
# to the chunk's whole forward matmul (measured 1.15-1.9x on the 2-core VM).
# Extra memory besides the buffer: the outputs (grad_weight V x H in fp32, grad_hidden
# N x H), (N,) statistics, and BLAS scratch. At N = 4096, V = 32000 the naive loss keeps
# (N, V) logits, log-softmax and its gradient: 3 x 0.5 GiB.
CHUNK_BYTES = 32 << 20
MIN_CHUNK_ROWS = 256
CHUNK_ROW_MULTIPLE = 32


def default_chunk_size(num_rows: int, vocab: int) -> int:
    """Rows per chunk: a (C, V) fp32 buffer of at most CHUNK_BYTES, C a multiple of
    CHUNK_ROW_MULTIPLE, but at least MIN_CHUNK_ROWS rows (and never more than num_rows)."""
    rows = CHUNK_BYTES // (4 * max(vocab, 1)) // CHUNK_ROW_MULTIPLE * CHUNK_ROW_MULTIPLE
    return max(1, min(num_rows, max(MIN_CHUNK_ROWS, rows)))


# ---------------------------------------------------------------------------------------
# Chunked PyTorch path
# ---------------------------------------------------------------------------------------


def _kept_chunks(keep: torch.Tensor, chunk_size: int):
    """Yield the rows of each chunk: a slice when no token is ignored, else an index tensor
    of up to chunk_size non-ignored tokens (ignored rows are never read: no flops spent on
    padding, and a NaN in an ignored row cannot reach anything)."""
    n = keep.shape[0]
    if bool(keep.all()):
        for start in range(0, n, chunk_size):
            yield slice(start, min(n, start + chunk_size))
        return
    kept = keep.nonzero().squeeze(1)
    for start in range(0, kept.numel(), chunk_size):
        yield kept[start:start + chunk_size]


def _take(x: torch.Tensor, rows) -> torch.Tensor:
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def _put(dst: torch.Tensor, rows, src: torch.Tensor) -> None:
    if isinstance(rows, slice):
        dst[rows] = src
    else:
        dst.index_copy_(0, rows, src)


class _Buffers:
    """The (C, V) fp32 buffers one call reuses for every chunk (see CHUNK_BYTES).

    The logits buffer is stored transposed, (V, C) contiguous, and used through its (C, V)
    view: BLAS forms weight @ h_c.T (no operand transposed) faster than h_c @ weight.T
    (measured at V = 65536, C = 256, H = 512, one thread: 352 vs 487 ms median of 5),
    the row reductions over the strided view cost a little more (69 vs 52 ms), and
    grad_weight's product then reads dz.T contiguously.
    """

    def __init__(self, chunk_size, vocab, dtype, device, softcap):
        self.z_t = torch.empty(vocab, chunk_size, dtype=dtype, device=device)
        self.dcap_t = (torch.empty(vocab, chunk_size, dtype=dtype, device=device)
                       if softcap is not None else None)

    @staticmethod
    def _view(buf, c):
        # The first V * c elements as a contiguous (V, c) block, seen as (c, V).
        return buf.view(-1)[:buf.shape[0] * c].view(buf.shape[0], c).T

    def dcap(self, c):
        """(c, V) buffer for d softcap / dz, or None when softcap is off."""
        return None if self.dcap_t is None else self._view(self.dcap_t, c)

    def logits(self, h_c, weight, bias):
        """(C, V) logits of a chunk (a view of the reused (V, C) buffer)."""
        z = self._view(self.z_t, h_c.shape[0])
        if h_c.dtype != z.dtype:  # fp16/bf16: half matmul (fp32 accumulation), then upcast
            z.T.copy_(weight @ h_c.T if bias is None else torch.addmm(bias[:, None], weight, h_c.T))
        elif bias is None:
            torch.mm(weight, h_c.T, out=z.T)
        else:
            torch.addmm(bias[:, None], weight, h_c.T, out=z.T)
        return z


def _chunk_loss(z, t, ls, z_loss, softcap, dcap):
    """Per-token loss of a chunk; turns the logits z (C, V) into e = exp(z - m) in place.

    Returns (l (C,), m (C,), s (C,)) with m the row maximum and s = sum_j e_j, so
    p = e / s and lse = m + log s. The loss is formed as log_softmax does, from z - m and
    log s (both small near the maximum), never as lse - z_t: at |z| ~ 3000 fp32 spacing is
    2^-12 and lse - z_t would carry that absolute error into a loss of any size. When
    dcap is given (softcap on), it receives d softcap(x) / dx = 1 - tanh^2.
    """
    if softcap is not None:
        z.div_(softcap).tanh_()
        if dcap is not None:
            torch.mul(z, z, out=dcap).neg_().add_(1.0)
        z.mul_(softcap)
    z_t = z.gather(1, t[:, None])[:, 0]
    m = z.amax(dim=1)
    z.sub_(m[:, None])
    shifted_mean = z.mean(dim=1) if ls > 0.0 else None  # mean_j (z_j - m)
    s = z.exp_().sum(dim=1)
    log_s = s.log()
    loss = (m - z_t).add_(log_s)  # -log p_t = (m - z_t) + log s
    if ls > 0.0:
        # (1 - ls) (-log p_t) + ls mean_j(-log p_j), with -log p_j = log s - (z_j - m)
        loss = loss.mul_(1.0 - ls).add_(ls * (log_s - shifted_mean))
    if z_loss:
        loss = loss.add_(z_loss * (m + log_s).square())
    return loss, m, s


def _chunk_dlogits(e, t, g, m, s, ls, z_loss, dcap):
    """In place: e = exp(z - m) (C, V) -> g_i dl_i/dz_ij, for upstream gradients g (C,).

    dl_i/dz_ij = (1 + 2 z_loss lse_i) p_ij - (1 - ls) [j = t_i] - ls / V, times
    d softcap / dz when softcap is on; p = e / s is never formed on its own.
    """
    v = e.shape[1]
    coef = g / s
    if z_loss:
        coef = coef * (1.0 + 2.0 * z_loss * (m + s.log()))
    e.mul_(coef[:, None])
    if ls > 0.0:
        e.sub_((g * (ls / v))[:, None])
    e.scatter_add_(1, t[:, None], (-(1.0 - ls) * g)[:, None])
    if dcap is not None:
        e.mul_(dcap)
    return e


def _chunk_grads(dz, rows, h_c, weight, grad_h, grad_w, grad_b):
    """Add a chunk's dz (C, V) to grad_bias, write its grad_hidden rows, add to grad_weight."""
    if grad_b is not None:
        grad_b += dz.sum(dim=0)
    low_precision = h_c.dtype != dz.dtype
    dz_in = dz.to(h_c.dtype) if low_precision else dz
    if grad_h is not None:
        if isinstance(rows, slice) and not low_precision:
            torch.mm(dz_in, weight, out=grad_h[rows])
        else:
            _put(grad_h, rows, dz_in @ weight)
    if grad_w is not None:
        # fp32 product for half inputs: a bf16 product per chunk would round each chunk's
        # partial sum (the C x H upcast is small next to C x V).
        grad_w.addmm_(dz.T, h_c.to(dz.dtype) if low_precision else h_c)


def _chunked_pass(hidden, weight, bias, target, keep, row_grad, ls, z_loss, softcap,
                  chunk_size, grads=None):
    """One pass over the kept rows: per-token losses l (N,) (0 where ignored) and the row
    statistics m, s (N,); with grads = (grad_h, grad_w, grad_b) (None entries skipped), it
    also accumulates the gradients of sum_i row_grad_i l_i in the same pass."""
    dtype = acc_dtype(hidden.dtype)
    n, v = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    loss = torch.zeros(n, dtype=dtype, device=dev)
    m_all = torch.zeros(n, dtype=dtype, device=dev)
    s_all = torch.ones(n, dtype=dtype, device=dev)
    want_dz = grads is not None and any(x is not None for x in grads)
    buffers = _Buffers(chunk_size, v, dtype, dev, softcap if want_dz else None)
    for rows in _kept_chunks(keep, chunk_size):
        h_c = _take(hidden, rows)
        t = _take(target, rows).long()
        z = buffers.logits(h_c, weight, bias)
        l_c, m, s = _chunk_loss(z, t, ls, z_loss, softcap, buffers.dcap(z.shape[0]))
        _put(loss, rows, l_c)
        _put(m_all, rows, m)
        _put(s_all, rows, s)
        if want_dz:
            dz = _chunk_dlogits(z, t, _take(row_grad, rows), m, s, ls, z_loss,
                                buffers.dcap(z.shape[0]))
            _chunk_grads(dz, rows, h_c, weight, *grads)
    return loss, m_all, s_all


def _grad_buffers(hidden, weight, bias, need_h, need_w, need_b):
    # Cross-chunk sums are kept in the accumulation dtype (fp32 for bf16 inputs).
    dtype = acc_dtype(hidden.dtype)
    return (torch.zeros_like(hidden) if need_h else None,
            torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None,
            torch.zeros(weight.shape[0], dtype=dtype, device=weight.device) if need_b else None)


def _finish_grads(grads, hidden, weight, bias):
    grad_h, grad_w, grad_b = grads
    return (grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype))


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-token losses, chunked over N; backward recomputes each (C, V) block.

    forward(hidden (N, H), weight (V, H), bias (V,) | None, target (N,),
            token_weight (N,) | None, ignore_index, label_smoothing, z_loss, softcap,
            chunk_size) -> per-token weighted loss (N,) in the accumulation dtype, 0 where
    ignored. Used for reduction="none", where every token has its own upstream gradient
    and grad_weight cannot be formed before backward: 4 matmuls of N x V x H (the logits
    twice). Saves only (N,) statistics (row max m and sum s of exp(z - m)).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, token_weight, ignore_index,
                label_smoothing, z_loss, softcap, chunk_size):
        dtype = acc_dtype(hidden.dtype)
        keep = target != ignore_index
        ls = float(label_smoothing)
        loss, m, s = _chunked_pass(hidden, weight, bias, target, keep, None, ls, z_loss,
                                   softcap, chunk_size)
        out = loss if token_weight is None else loss * token_weight.to(dtype)
        ctx.save_for_backward(hidden, weight, bias, target, token_weight, m, s, loss)
        ctx.config = (ignore_index, ls, float(z_loss), softcap, chunk_size)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, target, token_weight, m_all, s_all, loss = ctx.saved_tensors
        ignore_index, ls, z_loss, softcap, chunk_size = ctx.config
        need_h, need_w, need_b, _, need_tw = ctx.needs_input_grad[:5]
        dtype = acc_dtype(hidden.dtype)
        keep = target != ignore_index
        # An ignored token's upstream gradient is never read (0 * inf would be NaN).
        g_all = torch.where(keep, grad_out.to(dtype), 0.0)
        if token_weight is not None:
            g_all = g_all * token_weight.to(dtype)  # d out_i / d l_i = w_i
        grads = _grad_buffers(hidden, weight, bias, need_h, need_w, need_b)
        if need_h or need_w or need_b:
            buffers = _Buffers(chunk_size, weight.shape[0], dtype, hidden.device, softcap)
            for rows in _kept_chunks(keep, chunk_size):
                h_c = _take(hidden, rows)
                t = _take(target, rows).long()
                m, s = _take(m_all, rows), _take(s_all, rows)
                z = buffers.logits(h_c, weight, bias)
                if softcap is not None:
                    z.div_(softcap).tanh_()
                    torch.mul(z, z, out=buffers.dcap(z.shape[0])).neg_().add_(1.0)
                    z.mul_(softcap)
                e = z.sub_(m[:, None]).exp_()  # the forward's exp(z - m), bit for bit
                dz = _chunk_dlogits(e, t, _take(g_all, rows), m, s, ls, z_loss,
                                    buffers.dcap(z.shape[0]))
                _chunk_grads(dz, rows, h_c, weight, *grads)
        grad_tw = None
        if need_tw:
            grad_tw = torch.where(keep, grad_out.to(dtype) * loss, 0.0).to(token_weight.dtype)
        return (*_finish_grads(grads, hidden, weight, bias), None, grad_tw, None, None, None,
                None, None)


class ChunkedLinearCrossEntropySum(torch.autograd.Function):
    """sum_i w_i l_i / denominator (a scalar), every gradient computed during forward.

    forward(hidden, weight, bias, target, token_weight, ignore_index, label_smoothing,
            z_loss, softcap, chunk_size, denominator (None = 1, float or scalar tensor),
            need_grads (need_h, need_w, need_b)) -> scalar.
    The upstream gradient of a scalar is one number, so grad_hidden, grad_weight and
    grad_bias are known up to that factor while each (C, V) block is in the buffer: 3
    matmuls of N x V x H in all, as the naive loss, instead of recomputing the logits in
    backward (4), and one pass over the rows. The denominator (1/normalizer of "mean") is
    folded in, so the usual upstream gradient is exactly 1 and backward returns the
    gradients as they are; any other factor is applied in place.
    Costs: the gradients exist from forward on (grad_weight is V x H fp32: it is returned
    anyway), and a forward whose backward never runs has paid for the gradients; the entry
    point passes need_grads all False under torch.no_grad or when nothing requires grad.
    Backward can run once per forward (retain_graph=True and a second backward raise).
    With half inputs and an upstream factor other than 1, gradients are rounded to the
    input dtype twice (before and after the factor).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, token_weight, ignore_index,
                label_smoothing, z_loss, softcap, chunk_size, denominator, need_grads):
        dtype = acc_dtype(hidden.dtype)
        keep = target != ignore_index
        g = torch.ones(hidden.shape[0], dtype=dtype, device=hidden.device)
        if token_weight is not None:
            g = token_weight.to(dtype)
        if denominator is not None:
            g = g / denominator
        grads = _grad_buffers(hidden, weight, bias, *need_grads)
        loss, _, _ = _chunked_pass(hidden, weight, bias, target, keep, g,
                                   float(label_smoothing), z_loss, softcap, chunk_size, grads)
        weighted = loss if token_weight is None else loss * token_weight.to(dtype)
        total = weighted.sum()
        if denominator is not None:
            total = total / denominator
        ctx.grads = grads
        ctx.out_dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(loss, token_weight)
        ctx.denominator = denominator
        return total

    @staticmethod
    def backward(ctx, grad_out):
        loss, token_weight = ctx.saved_tensors
        if ctx.grads is None:
            raise RuntimeError("fused_linear_cross_entropy: this loss's gradients were "
                               "computed in forward and handed out by the first backward; "
                               "a second backward through it is not supported")
        grads, ctx.grads = ctx.grads, None
        g = grad_out.to(loss.dtype)
        if not bool(g == 1.0):  # the usual loss.backward() seed: nothing to scale
            grads = tuple(None if x is None else x.mul_(g.to(x.dtype)) for x in grads)
        grad_h, grad_w, grad_b = grads
        if grad_w is not None:
            grad_w = grad_w.to(ctx.out_dtypes[0])
        if grad_b is not None:
            grad_b = grad_b.to(ctx.out_dtypes[1])
        grad_tw = None
        if ctx.needs_input_grad[4]:
            grad_tw = g * loss  # loss is 0 at ignored tokens
            if ctx.denominator is not None:
                grad_tw = grad_tw / ctx.denominator
            grad_tw = grad_tw.to(token_weight.dtype)
        return (grad_h, grad_w, grad_b, None, grad_tw, None, None, None, None, None, None,
                None)


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
    def _flce_fwd_kernel(h_ptr, w_ptr, b_ptr, t_ptr, m_ptr, logs_ptr, zt_ptr, zs_ptr, N, V, H,
                         stride_hn, stride_hh, stride_wv, stride_wh, softcap,
                         HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                         PRECISION: tl.constexpr):
        # One program per BN rows; online log-sum-exp over V tiles. Writes (N,) statistics:
        # the row max m, log s with s = sum_j exp(z_j - m), the target logit, and
        # sum_j (z_j - m) (for label smoothing). Keeping m and log s apart (not their sum
        # lse) keeps extreme logits as accurate as log_softmax (see _chunk_loss).
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = rn < N
        tgt = tl.load(t_ptr + rn, mask=mask_n, other=-1)
        # Ignored rows (target -1) load hidden as 0: a NaN there never enters the logits.
        row_ok = mask_n & (tgt >= 0)
        m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        s = tl.zeros([BLOCK_N], dtype=tl.float32)
        zt = tl.zeros([BLOCK_N], dtype=tl.float32)
        zs = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum over columns so far of (z_j - m)
        for v0 in range(0, V, BLOCK_V):
            rv = v0 + tl.arange(0, BLOCK_V)
            mask_v = rv < V
            z = _logits_tile(h_ptr, w_ptr, b_ptr, rn, rv, row_ok, mask_v, H, stride_hn,
                             stride_hh, stride_wv, stride_wh, HAS_BIAS, BLOCK_N, BLOCK_V,
                             BLOCK_H, PRECISION)
            if HAS_SOFTCAP:
                z = softcap * _tanh(z / softcap)
            zt += tl.sum(tl.where(rv[None, :] == tgt[:, None], z, 0.0), axis=1)
            z = tl.where(mask_v[None, :], z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=1))
            # Re-base the shifted sum on the new max: v0 columns each move by m - m_new.
            zs = tl.where(v0 > 0, zs + v0 * (m - m_new), 0.0)
            zs += tl.sum(tl.where(mask_v[None, :], z - m_new[:, None], 0.0), axis=1)
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
            m = m_new
        tl.store(m_ptr + rn, m, mask=mask_n)
        tl.store(logs_ptr + rn, tl.log(s), mask=mask_n)
        tl.store(zt_ptr + rn, zt, mask=mask_n)
        tl.store(zs_ptr + rn, zs, mask=mask_n)

    @triton.jit
    def _flce_bwd_kernel(h_ptr, w_ptr, b_ptr, t_ptr, m_ptr, logs_ptr, coef_ptr, tcoef_ptr,
                         scoef_ptr,
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
        tgt = tl.load(t_ptr + rn, mask=mask_n, other=-1)
        row_ok = mask_n & (tgt >= 0)  # ignored rows: hidden read as 0, dz forced to 0
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rn, rv, row_ok, mask_v, H, stride_hn,
                         stride_hh, stride_wv, stride_wh, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H,
                         PRECISION)
        if HAS_SOFTCAP:
            th = _tanh(z / softcap)
            z = softcap * th
        m = tl.load(m_ptr + rn, mask=row_ok, other=0.0)
        logs = tl.load(logs_ptr + rn, mask=row_ok, other=0.0)
        coef = tl.load(coef_ptr + rn, mask=row_ok, other=0.0)
        tcoef = tl.load(tcoef_ptr + rn, mask=row_ok, other=0.0)
        scoef = tl.load(scoef_ptr + rn, mask=row_ok, other=0.0)
        p = tl.exp((z - m[:, None]) - logs[:, None])  # as log_softmax: z - m first
        dz = p * coef[:, None] - scoef[:, None]
        dz -= tl.where(rv[None, :] == tgt[:, None], tcoef[:, None], 0.0)
        if HAS_SOFTCAP:
            dz = dz * (1.0 - th * th)
        dz = tl.where(row_ok[:, None] & mask_v[None, :], dz, 0.0)
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
                              mask=row_ok[:, None] & mask_h[None, :])
            if NEED_GW:
                h = tl.load(h_ptr + rn[:, None] * stride_hn + rh[None, :] * stride_hh,
                            mask=row_ok[:, None] & mask_h[None, :], other=0.0)
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
        stats = torch.empty(4, n, dtype=torch.float32, device=hidden.device)
        m, log_s, z_target, z_shifted_sum = stats[0], stats[1], stats[2], stats[3]
        precision = "ieee"  # exact fp32 products (no TF32); bf16 dots accumulate in fp32
        bias_arg = bias if bias is not None else hidden  # dummy pointer when HAS_BIAS=False
        if n:
            _flce_fwd_kernel[(triton.cdiv(n, bn),)](
                hidden, weight, bias_arg, tgt, m, log_s, z_target, z_shifted_sum, n, v, h,
                hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                float(softcap) if softcap is not None else 1.0,
                HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
                BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, PRECISION=precision)
        ls = float(label_smoothing)
        # As _chunk_loss: -log p_t = (m - z_t) + log s, mean_j -log p_j = log s - mean(z - m).
        loss = (1.0 - ls) * ((m - z_target) + log_s)
        if ls > 0.0:
            loss = loss + ls * (log_s - z_shifted_sum / v)
        if z_loss:
            loss = loss + z_loss * (m + log_s).square()
        loss = torch.where(keep, loss, torch.zeros_like(loss))
        out = loss if token_weight is None else loss * token_weight.float()
        ctx.save_for_backward(hidden, weight, bias, tgt, token_weight, m, log_s, loss)
        ctx.config = (ls, float(z_loss), softcap, precision)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, tgt, token_weight, m, log_s, loss = ctx.saved_tensors
        ls, z_loss, softcap, precision = ctx.config
        need_h, need_w, need_b, _, need_tw = ctx.needs_input_grad[:5]
        n, h = hidden.shape
        v = weight.shape[0]
        bn, bv, bh = _blocks()
        keep = tgt >= 0
        # An ignored token's upstream gradient is never read: with "mean" over nothing it
        # used to be 1/0 = inf, and inf * 0 made every gradient NaN.
        g = torch.where(keep, grad_out.float(), 0.0)
        if token_weight is not None:
            g = g * token_weight.float()
        coef = g * (1.0 + 2.0 * z_loss * (m + log_s)) if z_loss else g
        tcoef = g * (1.0 - ls)
        scoef = g * (ls / v)
        dev = hidden.device
        gh = torch.zeros(n, h, dtype=torch.float32, device=dev) if need_h else None
        gw = torch.zeros(v, h, dtype=torch.float32, device=dev) if need_w else None
        gb = torch.zeros(v, dtype=torch.float32, device=dev) if need_b else None
        if n and (need_h or need_w or need_b):
            _flce_bwd_kernel[(triton.cdiv(n, bn), triton.cdiv(v, bv))](
                hidden, weight, bias if bias is not None else hidden, tgt, m, log_s, coef,
                tcoef, scoef, gh if need_h else m, gw if need_w else m, gb if need_b else m,
                n, v, h, hidden.stride(0), hidden.stride(1), weight.stride(0),
                weight.stride(1), float(softcap) if softcap is not None else 1.0,
                HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
                NEED_GH=bool(need_h), NEED_GW=bool(need_w), NEED_GB=bool(need_b),
                BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, PRECISION=precision)
        grad_tw = None
        if need_tw:
            grad_tw = torch.where(keep, grad_out.float() * loss, 0.0).to(token_weight.dtype)
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

    Ignored rows and empty reductions follow one rule on every path (reference, chunked,
    Triton; stated in full in the reference's docstring): an ignored token contributes 0
    to the loss and to every gradient even if its hidden row is NaN/inf; with nothing
    counted "sum" is 0, "none" zeros, and "mean" (default normalizer) NaN as
    F.cross_entropy, with all-zero gradients; NaN appears only where a counted token's
    logits are non-finite.

    Paths on CPU: reduction "sum"/"mean" computes the gradients during the forward pass
    (ChunkedLinearCrossEntropySum: 3 matmuls, as the naive loss); "none" recomputes the
    logits in backward (ChunkedLinearCrossEntropy: 4 matmuls).

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
        chunk_size: rows per chunk for impl="chunked" (default: default_chunk_size, a
            <= 32 MiB (C, V) fp32 buffer, a multiple of 32 rows, at least 256 rows).

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
    keep = target != ignore_index
    if kind == "chunked":
        chunk = chunk_size or default_chunk_size(hidden.shape[0], weight.shape[0])
        if reduction != "none":
            grad_on = torch.is_grad_enabled()
            need = tuple(grad_on and t is not None and t.requires_grad
                         for t in (hidden, weight, bias))
            denominator, nan_if_empty = (mean_denominator(keep, normalizer)
                                         if reduction == "mean" else (None, None))
            loss = ChunkedLinearCrossEntropySum.apply(
                hidden, weight, bias, target, token_weight, ignore_index, label_smoothing,
                z_loss, softcap, chunk, denominator, need)
            return loss if nan_if_empty is None else loss + nan_if_empty.to(loss.dtype)
        per_token = ChunkedLinearCrossEntropy.apply(
            hidden, weight, bias, target, token_weight, ignore_index, label_smoothing,
            z_loss, softcap, chunk)
    else:
        per_token = TritonLinearCrossEntropy.apply(
            hidden, weight, bias, target, token_weight, ignore_index, label_smoothing,
            z_loss, softcap)
    return reduce_per_token(per_token, keep, reduction, normalizer)
