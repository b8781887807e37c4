"""Tiled symmetric contrastive losses (CLIP softmax, SigLIP sigmoid), single or multi-process.

Shape legend:
    B   global batch (image/text pairs)     D  embedding size
    Bl  this rank's batch (B = world * Bl)  T  tile edge (block_size)

Why: the naive loss materialises the B x B similarity matrix plus its softmax and gradient;
at B = 8192 that is 3 x 8192^2 x 4 B = 768 MiB in fp32 (and B_local x B_global per rank when
features are gathered). Here only T x T (sigmoid) or T x B (softmax, a row chunk) blocks
exist at once, and only O(B) statistics live from forward to backward.

How:
  softmax: the symmetric InfoNCE loss is two cross-entropies over a linear head,
      i2t: rows = scale * image_local, classes = text_global,  target = global index
      t2i: rows = scale * text_local,  classes = image_global, target = global index
    so it runs on kernels/fused_linear_cross_entropy.py (reduction="sum": on CPU the
    gradients are formed chunk by chunk during forward; its Triton path on CUDA recomputes
    the logits in backward). Cost: each direction is its own pass, 2x the matmul flops of a
    fused both-direction pass, but one tested kernel.
  sigmoid: every pair is independent, so tiles (T x T) are summed in forward and recomputed
    in backward (SigmoidTiles below).

Precision: as the reference, fp16/bf16 features are upcast to fp32 (only (B, D) copies) and
every logit, statistic and gradient sum is fp32; the loss is returned in fp32.

Distributed (group is a process group): features are all-gathered with an autograd-aware
gather whose backward all-reduces (sums) the gathered gradient and keeps this rank's slice.
Each rank computes its share of the global loss: the i2t terms of its own images and the
t2i terms of its own texts (softmax), or the pairs whose image is its own (sigmoid). The
shares sum to the global loss, every pair/term is counted exactly once, and so:
  * the value returned on every rank is the global loss (shares all-reduced; detached);
  * the gradient that flows into this rank's `image`/`text` is exactly the single-process
    gradient of the global loss for this rank's slice (no world-size factor);
  * the gradient of logit_scale / logit_bias on this rank is this rank's share; summed over
    ranks it equals the single-process gradient.
  A DDP caller whose gradients are *averaged* over ranks gets (1/world) x the global
  gradient for every parameter, the same convention as a per-rank loss normalised by a
  global count; multiply the loss by world_size (or use a summing comm hook) for the exact
  global gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._validation import check_contrastive_inputs
from kernels.fused_linear_cross_entropy import fused_linear_cross_entropy, resolve_impl
from kernels.reference import acc_dtype, contrastive_loss_reference

# Sigmoid tiles: T = 1024 gives T x T fp32 tiles of 4 MiB; a pass holds at most 3 at a time
# (-L, logsigmoid's output and its buffer; logits and weights in backward). Measured at
# B = 8192, D = 256 (fwd + bwd, extra peak RSS above the inputs): T = 1024 61-105 MiB,
# T = 2048 97-193 MiB (freed 16 MiB tiles stay in glibc's heap), naive 1.3 GiB, so 1024
# keeps the 10x memory goal. Time, same runs: with 1 thread T = 1024 and 2048 both beat the
# naive loss (4.9-6.3 s vs 8.3-13.4 s); with 2 threads on the loaded shared VM every
# per-tile op pays OpenMP barrier waits and 1024 took 2-4x the naive time, 2048 ~1.2-1.4x.
DEFAULT_SIGMOID_BLOCK = 1024
# Softmax rows per chunk of the fused cross-entropy (T x B fp32 buffer: 16 MiB at B = 8192).
# Its own default (32 MiB, >= 256 rows) gave 1024 rows here and an extra peak of 104-121 MiB
# at B = 8192, D = 256 (0.096-0.112 of the naive 1.08 GiB; 2026-11-30 runs), two fused
# calls each holding a buffer; 512 halves the buffer.
DEFAULT_SOFTMAX_BLOCK = 512


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums gradients over ranks and keeps our slice.

    Backward uses all_reduce (works on every backend, gloo included) rather than
    reduce_scatter; the traffic is world x larger but only (B, D) features move.
    """

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist

        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.rows = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.rows
        return grad[start:start + ctx.rows], None


def _gather_no_grad(x, group):
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=0)


def _diagonal_sign(rows: torch.Tensor, j0: int, j1: int, dtype) -> torch.Tensor:
    """(len(rows), j1 - j0) tile of z: +1 where global row == global column, -1 elsewhere."""
    cols = torch.arange(j0, j1, device=rows.device)
    return torch.where(rows[:, None] == cols[None, :], 1.0, -1.0).to(dtype)


class SigmoidTiles(torch.autograd.Function):
    """Sum over pairs (i local, j global) of c_ij * softplus(s <x_i, y_j> + b), all labels -1.

    forward(x_local (Bl, D), y_all (B, D), scale (), bias (), w_local (Bl,) | None,
            w_all (B,) | None, block: T) -> scalar (accumulation dtype), c_ij = (w_i + w_j) / 2
    (1 when unweighted). The caller adds the diagonal's correction (its label is +1, and
    softplus(-L) = softplus(L) - L), an O(B D) term autograd differentiates, so tiles need no
    label matrix. Tiles are recomputed in backward; only T x T blocks exist.

    Why this shape: the loss is memory-bound on CPU, so every full pass over a T x T tile
    counts. Forward: matmul (giving -L), logsigmoid, reduce. Backward: matmul, sigmoid, (weights),
    two matmuls; the scale's gradient sum_ij dL_ij d_ij is read off the (T, D) product
    dL @ y that grad_x needs anyway.
    """

    @staticmethod
    def forward(ctx, x, y, scale, bias, w_loc, w_all, block):
        dtype = acc_dtype(x.dtype)
        total = torch.zeros((), dtype=dtype, device=x.device)
        for i0, i1, j0, j1, neg in SigmoidTiles._tiles(x, y, -scale, -bias, block, dtype):
            log_p = F.logsigmoid(neg)  # -softplus(L): exact (F.softplus has a threshold)
            if w_loc is None:
                total -= log_p.sum()
            else:
                total -= 0.5 * (w_loc[i0:i1] @ log_p.sum(dim=1) + log_p.sum(dim=0) @ w_all[j0:j1])
        ctx.save_for_backward(x, y, scale, bias, w_loc, w_all)
        ctx.block = block
        return total

    @staticmethod
    def _tiles(x, y, scale, bias, block, dtype):
        """Yield (i0, i1, j0, j1, scale * x_i @ y_j.T + bias (T, T)), a fresh buffer. Forward
        passes (-scale, -bias) to get -L directly, saving a negation pass per tile."""
        for i0 in range(0, x.shape[0], block):
            i1 = min(x.shape[0], i0 + block)
            xs = x[i0:i1].to(dtype) * scale  # (T, D): scaling rows is cheaper than the tile
            for j0 in range(0, y.shape[0], block):
                j1 = min(y.shape[0], j0 + block)
                yield i0, i1, j0, j1, torch.addmm(bias.expand(i1 - i0, j1 - j0), xs,
                                                  y[j0:j1].to(dtype).T)

    @staticmethod
    def backward(ctx, grad_out):
        x, y, scale, bias, w_loc, w_all = ctx.saved_tensors
        dtype = acc_dtype(x.dtype)
        g = grad_out.to(dtype)
        gx = torch.zeros(x.shape, dtype=dtype, device=x.device)
        gy = torch.zeros(y.shape, dtype=dtype, device=y.device)
        gs = torch.zeros((), dtype=dtype, device=x.device)
        gb = torch.zeros((), dtype=dtype, device=x.device)
        for i0, i1, j0, j1, logits in SigmoidTiles._tiles(x, y, scale, bias, ctx.block, dtype):
            dl = logits.sigmoid_()  # d softplus(L) / dL; scaled by c_ij and g below
            if w_loc is not None:
                dl.mul_(torch.add(w_loc[i0:i1, None], w_all[None, j0:j1]).mul_(0.5))
            gb += dl.sum()
            x_i, y_j = x[i0:i1].to(dtype), y[j0:j1].to(dtype)
            dl_y = dl @ y_j  # (T, D)
            gs += (dl_y * x_i).sum()  # sum_ij dL_ij <x_i, y_j>
            gx[i0:i1] += dl_y
            gy[j0:j1] += dl.T @ x_i
        # Every pair's gradient carries the same factor g (and s for the features).
        gx.mul_(g * scale)
        gy.mul_(g * scale)
        return (gx.to(x.dtype), gy.to(y.dtype), (gs * g).to(scale.dtype),
                (gb * g).to(bias.dtype), None, None, None)


def _share_torch(kind, x_loc, x_all, y_loc, y_all, scale, bias, w_loc, w_all, offset):
    """This rank's share of the loss, materialising Bl x B (impl="torch" with a group)."""
    dtype = acc_dtype(x_loc.dtype)
    rows = torch.arange(x_loc.shape[0], device=x_loc.device)
    if kind == "softmax":
        l_r = (x_loc.to(dtype) @ y_all.to(dtype).T) * scale
        l_c = (y_loc.to(dtype) @ x_all.to(dtype).T) * scale
        i2t = torch.logsumexp(l_r, 1) - l_r[rows, rows + offset]
        t2i = torch.logsumexp(l_c, 1) - l_c[rows, rows + offset]
        return (w_loc * (i2t + t2i)).sum()
    logits = (x_loc.to(dtype) @ y_all.to(dtype).T) * scale + bias
    sign = _diagonal_sign(rows + offset, 0, y_all.shape[0], dtype)
    c = (w_loc[:, None] + w_all[None, :]) * 0.5
    return (c * -F.logsigmoid(sign * logits)).sum()


def contrastive_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    *,
    kind: str = "softmax",
    logit_scale: float | torch.Tensor,
    logit_bias: float | torch.Tensor | None = None,
    sample_weight: torch.Tensor | None = None,
    block_size: int | None = None,
    group=None,
    impl: str = "auto",
) -> torch.Tensor:
    """Symmetric contrastive loss over the (global) batch, computed in tiles.

    Semantics are those of `kernels.reference.contrastive_loss_reference` (read its
    docstring): softmax = sum_i w_i (i2t_i + t2i_i) / (2 B); sigmoid = sum_ij
    (w_i + w_j)/2 * -log sigmoid(z_ij (s <x_i, y_j> + b)) / B, with B the global batch.

    Args:
        image: (Bl, D) float, this rank's image features (Bl = B without a group).
        text: (Bl, D) same dtype.
        kind: "softmax" (CLIP / InfoNCE) or "sigmoid" (SigLIP).
        logit_scale: the multiplier itself (e.g. `log_scale.exp()`); float or scalar tensor.
        logit_bias: sigmoid only; float or scalar tensor (None = 0).
        sample_weight: optional (Bl,) finite, >= 0; treated as a constant (no gradient).
        block_size: rows per chunk (softmax) or tile edge (sigmoid), >= 1.
        group: a torch.distributed process group (e.g. `dist.group.WORLD`) whose ranks each
            hold Bl pairs (equal on every rank); None means single process. See the module
            docstring for the gradient contract.
        impl: "auto" | "torch" (materialises the matrix) | "chunked" | "triton" (softmax
            only; raises if it cannot run). "auto" is triton on CUDA for softmax, chunked
            otherwise (always chunked for sigmoid: no Triton sigmoid kernel yet).

    Returns:
        Scalar: float32 for half inputs, else the input dtype. With a group, the global loss
        (identical on every rank).
    """
    check_contrastive_inputs(image, text, kind, logit_scale, logit_bias, sample_weight,
                             block_size)
    requested, impl = impl, resolve_impl(impl, image.device, image.dtype)
    if impl == "triton" and kind == "sigmoid":
        if requested == "auto":
            impl = "chunked"  # no Triton sigmoid kernel yet; the tiled PyTorch path is exact
        else:
            raise NotImplementedError("kind='sigmoid' has no Triton kernel yet; use "
                                      "impl='chunked' (impl='auto' picks it)")
    if group is None and impl == "torch":
        return contrastive_loss_reference(image, text, kind=kind, logit_scale=logit_scale,
                                          logit_bias=logit_bias, sample_weight=sample_weight)
    dtype = acc_dtype(image.dtype)
    if impl != "torch":
        # Upcast once, before any gather (as the reference does): half inputs get fp32
        # logits, not a half rounding of scale * features, and each feature's gradient is
        # rounded to its dtype once (it reaches `image` through two terms: both directions
        # for softmax, tiles and diagonal for sigmoid). Costs (B, D) fp32 copies, small next
        # to any B x B block. Measured on CPU, B=77, D=19, bf16, softmax, before: grad_text
        # error 5.6e-3 vs PyTorch's 4.4e-3 against float64.
        image, text = image.to(dtype), text.to(dtype)
    dev = image.device
    bl = image.shape[0]
    w_loc = (torch.ones(bl, dtype=dtype, device=dev) if sample_weight is None
             else sample_weight.detach().to(dtype))
    if group is None:
        rank, world, offset = 0, 1, 0
        x_all, y_all, w_all = image, text, w_loc
    else:
        import torch.distributed as dist

        rank, world = dist.get_rank(group), dist.get_world_size(group)
        sizes = _gather_no_grad(torch.tensor([bl], device=dev), group)
        if bool((sizes != bl).any()):
            raise ValueError(f"every rank must hold the same number of pairs; got "
                             f"{sizes.tolist()}")
        offset = rank * bl
        y_all = _GatherWithGrad.apply(text, group)
        x_all = _GatherWithGrad.apply(image, group) if kind == "softmax" else None
        w_all = _gather_no_grad(w_loc, group)
    b = world * bl
    scale = (logit_scale if isinstance(logit_scale, torch.Tensor)
             else torch.tensor(float(logit_scale), device=dev)).reshape(()).to(dtype)
    if impl == "torch":
        bias = 0.0 if logit_bias is None else logit_bias
        share = _share_torch(kind, image, x_all, text, y_all, scale, bias, w_loc, w_all,
                             offset)
    elif kind == "softmax":
        target = torch.arange(offset, offset + bl, device=dev)
        common = dict(token_weight=w_loc, reduction="sum", impl=impl,
                      chunk_size=block_size or DEFAULT_SOFTMAX_BLOCK)
        # The scale multiplies the rows (Bl x D) rather than the logits: same product, and
        # autograd gives its gradient without ever seeing a Bl x B matrix.
        share = (fused_linear_cross_entropy(image * scale, y_all, target, **common)
                 + fused_linear_cross_entropy(text * scale, x_all, target, **common))
    else:
        bias = (torch.zeros((), dtype=dtype, device=dev) if logit_bias is None
                else (logit_bias if isinstance(logit_bias, torch.Tensor)
                      else torch.tensor(float(logit_bias), device=dev)).reshape(()).to(dtype))
        weighted = sample_weight is not None
        share = SigmoidTiles.apply(image, y_all, scale, bias, w_loc if weighted else None,
                                   w_all if weighted else None,
                                   block_size or DEFAULT_SIGMOID_BLOCK)
        # The matching pairs (label +1): softplus(-L_ii) = softplus(L_ii) - L_ii, so subtract
        # w_i L_ii (c_ii = w_i), with L_ii = s <x_i, y_(offset+i)> + b; O(Bl D), autograd.
        diagonal = (image * y_all[offset:offset + bl]).sum(dim=1) * scale + bias
        share = share - (w_loc * diagonal).sum()
    share = share / (2 * b if kind == "softmax" else b)
    if group is None:
        return share
    import torch.distributed as dist

    total = share.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    # Value: the global loss on every rank. Gradient: this rank's share (see module doc).
    return share + (total - share.detach())
