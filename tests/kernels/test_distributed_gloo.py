"""2-process gloo runs of both losses == single process on the concatenated batch.

contrastive_loss: each rank holds half of the batch; per rank the loss must equal the
single-process loss, the gradient of its image/text slice must equal the single-process
gradient of that slice (no world-size factor), and logit_scale / logit_bias gradients must
sum over ranks to the single-process gradient (see kernels/contrastive.py for this contract).

fused_linear_cross_entropy (data parallelism with a global normaliser): each rank holds an
uneven share of the tokens, all-reduces its non-ignored token count and passes it as
`normalizer`; the per-rank losses and the all-reduced (summed) weight gradients must equal
the single-process mean loss and its gradient, and each rank's hidden gradient the matching
rows of the single-process one.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kernels import contrastive_loss, fused_linear_cross_entropy
from kernels.testing import make_flce_inputs

WORLD = 2
B_LOCAL = 13
D = 7
CASES = [(kind, impl) for kind in ("softmax", "sigmoid") for impl in ("chunked", "torch")]


def _batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(WORLD * B_LOCAL, D, generator=gen, dtype=torch.float64)
    y = torch.randn(WORLD * B_LOCAL, D, generator=gen, dtype=torch.float64)
    w = torch.rand(WORLD * B_LOCAL, generator=gen, dtype=torch.float64) + 0.5
    return x, y, w


def _run(x, y, w, kind, impl, group=None):
    x = x.clone().requires_grad_(True)
    y = y.clone().requires_grad_(True)
    s = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True)
    loss = contrastive_loss(x, y, kind=kind, logit_scale=s,
                            logit_bias=b if kind == "sigmoid" else None, sample_weight=w,
                            block_size=5, group=group, impl=impl)
    loss.backward()
    return {"loss": loss.detach(), "x": x.grad, "y": y.grad, "s": s.grad,
            "b": b.grad if b.grad is not None else torch.zeros((), dtype=torch.float64)}


FLCE_ROWS = [slice(0, 61), slice(61, 97)]  # uneven shares of N = 97 tokens
FLCE_OPTS = dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0)


def _flce_inputs():
    return make_flce_inputs(97, 11, 53, bias=True, weights=True, seed=3)


def _flce_run(hidden, weight, target, bias, token_weight, normalizer=None):
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss = fused_linear_cross_entropy(leaves[0], leaves[1], target, bias=leaves[2],
                                      token_weight=token_weight, normalizer=normalizer,
                                      impl="chunked", chunk_size=8, **FLCE_OPTS)
    return (loss.detach(), *torch.autograd.grad(loss, leaves))


def _flce_worker(rank):
    hidden, weight, target, bias, token_weight = _flce_inputs()
    rows = FLCE_ROWS[rank]
    count = (target[rows] != -100).sum().double()
    dist.all_reduce(count)  # the global token count, as the LM's normaliser
    loss, grad_h, grad_w, grad_b = _flce_run(hidden[rows], weight, target[rows], bias,
                                             token_weight[rows], normalizer=count)
    total = loss.clone()
    for t in (total, grad_w, grad_b):
        dist.all_reduce(t)  # data parallelism: sum the shares
    return {"loss": total, "grad_hidden": grad_h, "grad_weight": grad_w, "grad_bias": grad_b}


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        x, y, w = _batch()
        part = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        results = {case: _run(x[part], y[part], w[part], *case, group=dist.group.WORLD)
                   for case in CASES}
        results["flce"] = _flce_worker(rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_process_gloo_equals_single_process(tmp_path):
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD,
                       join=True, start_method="spawn")
    x, y, w = _batch()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for case in CASES:
        single = _run(x, y, w, *case)
        for rank, results in enumerate(ranks):
            got = results[case]
            part = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
            torch.testing.assert_close(got["loss"], single["loss"], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(got["x"], single["x"][part], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(got["y"], single["y"][part], rtol=1e-10, atol=1e-12)
        for key in ("s", "b"):
            total = sum(results[case][key] for results in ranks)
            torch.testing.assert_close(total, single[key], rtol=1e-10, atol=1e-12)
    loss, grad_h, grad_w, grad_b = _flce_run(*_flce_inputs())
    for rank, results in enumerate(ranks):
        got = results["flce"]
        torch.testing.assert_close(got["loss"], loss, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["grad_hidden"], grad_h[FLCE_ROWS[rank]], rtol=1e-12,
                                   atol=1e-12)
        torch.testing.assert_close(got["grad_weight"], grad_w, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got["grad_bias"], grad_b, rtol=1e-10, atol=1e-12)
