"""Benchmark the fused loss kernels against the naive PyTorch losses, side by side in one run.

    .venv/bin/python scripts/bench_kernels.py            # default cases (~3-5 min on 2 cores)
    .venv/bin/python scripts/bench_kernels.py --big      # adds N=8192, H=1024, V=65536 (naive:
                                                         #   ~8 GB and ~1.5 min per repeat)
    .venv/bin/python scripts/bench_kernels.py --quick    # tiny shapes, checks the script runs
    .venv/bin/python scripts/bench_kernels.py --repeats 5  # more timed repeats per case
    .venv/bin/python scripts/bench_kernels.py --threads 1  # one torch thread per worker
    /tmp/venv-cce/bin/python scripts/bench_kernels.py     # adds a "cce" row where the
                                                         #   cut-cross-entropy package imports
    /tmp/venv-cce/bin/python scripts/bench_kernels.py --interleaved --cases flce \
        --repeats 5 --chunk-sizes 262  # naive, ours, ours at 262 rows per chunk and CCE
                                       #   timed alternately in one process per case

CCE (apple/ml-cross-entropy, `pip install cut-cross-entropy`) is measured beside naive and
ours in the same run when `import cut_cross_entropy` works in the interpreter running this
script; otherwise the script prints why and skips it. On CPU its only implementation is
`impl="torch_compile"`: F.linear + F.cross_entropy under torch.compile (it materialises the
logits; the Triton "cce" kernels need CUDA). It has no per-token weights, so its row computes
reduction="none" and applies the same token weights and normaliser outside, i.e. the same
loss as naive and ours. Its compile (~40 s on the 2-core VM) is kept out of the timing: the
worker runs it once at a tiny shape and once at the full shape before the timed repeats, so
its extra-peak figure is taken after a full-size run (freed blocks that glibc keeps can make
it an underestimate; naive and ours only warm up at a tiny shape).

Every (case, implementation) runs forward + backward in a fresh subprocess, so allocator
caches and earlier peaks of one measurement cannot leak into another. Memory is measured as
resident memory (RSS), since torch's CPU allocations are invisible to tracemalloc:
the worker builds its inputs, then resets the kernel's peak-RSS counter (writing "5" to
/proc/self/clear_refs resets VmHWM) and records VmRSS as the baseline; after the runs,
extra peak = VmHWM - baseline, i.e. the most memory the loss ever held above its inputs
(logits, softmax, gradients, temporaries and the returned gradients). Where clear_refs is
unavailable it falls back to ru_maxrss minus the RSS after building the inputs (inputs are
generated in place in float32, so that is no higher). On CUDA it uses
torch.cuda.max_memory_allocated instead. Time is the median wall time of the repeats.

Goals (issue 15): CPU, V = 32000 and 65536, 1 and 2 threads: extra peak <= 1/10 of naive
and time <= 1.0 x naive; contrastive at B = 8192: >= 10x less extra peak than the naive
B x B form. The load average is printed at the start and end of the run: on a shared
machine the absolute times move with it, the same-run ratios much less.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench_harness import (
    REPO,
    Goal,
    PeakRss,
    load_average,
    measure,
    ratio,
    table,
    worker_env,
    write_json,
)

FLCE_CASES = {
    "flce N=4096 H=512 V=32000": dict(op="flce", n=4096, h=512, v=32000, repeats=3),
    "flce N=4096 H=512 V=65536": dict(op="flce", n=4096, h=512, v=65536, repeats=3),
}
BIG_CASES = {
    "flce N=8192 H=1024 V=65536": dict(op="flce", n=8192, h=1024, v=65536, repeats=1),
}
CONTRASTIVE_CASES = {
    "contrastive softmax B=8192 D=256": dict(op="contrastive", kind="softmax", b=8192, d=256,
                                             repeats=3),
    "contrastive sigmoid B=8192 D=256": dict(op="contrastive", kind="sigmoid", b=8192, d=256,
                                             repeats=3),
}
QUICK_CASES = {
    "flce N=256 H=64 V=4096 (quick)": dict(op="flce", n=256, h=64, v=4096, repeats=2),
    "contrastive softmax B=512 D=32 (quick)": dict(op="contrastive", kind="softmax", b=512,
                                                   d=32, repeats=2),
}


# ------------------------------------------------------------------------- worker side


def _build(spec, impl, device):
    import torch
    import torch.nn.functional as F

    from kernels import contrastive_loss, fused_linear_cross_entropy

    gen = torch.Generator(device=device).manual_seed(0)
    kw = dict(device=device, dtype=torch.float32, generator=gen)
    if spec["op"] == "flce":
        n, h, v = spec["n"], spec["h"], spec["v"]
        hidden = torch.randn(n, h, **kw).requires_grad_(True)
        weight = torch.randn(v, h, **kw).mul_(h**-0.5).requires_grad_(True)
        target = torch.randint(0, v, (n,), device=device, generator=gen)
        target[::10] = -100  # 10% padding
        token_weight = torch.rand(n, **kw).add_(0.5)
        count = (target != -100).sum()
        leaves = [hidden, weight]

        if impl == "naive":
            def run():
                logits = F.linear(hidden, weight)  # (N, V)
                per_token = F.cross_entropy(logits, target, reduction="none")
                return (per_token * token_weight).sum() / count
        elif impl == "cce":
            from cut_cross_entropy import linear_cross_entropy

            def run():
                per_token = linear_cross_entropy(hidden, weight, target, impl="torch_compile",
                                                 reduction="none")
                return (per_token * token_weight).sum() / count
        else:  # "chunked", "chunked:<rows per chunk>" or "triton"
            kind, _, rows = impl.partition(":")

            def run():
                return fused_linear_cross_entropy(hidden, weight, target,
                                                  token_weight=token_weight,
                                                  normalizer=count, impl=kind,
                                                  chunk_size=int(rows) if rows else None)
        return run, leaves
    b, d = spec["b"], spec["d"]
    image = F.normalize(torch.randn(b, d, **kw), dim=1).requires_grad_(True)
    text = F.normalize(torch.randn(b, d, **kw), dim=1).requires_grad_(True)
    scale = torch.tensor(10.0, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)
    sigmoid = spec["kind"] == "sigmoid"
    leaves = [image, text, scale] + ([bias] if sigmoid else [])
    if impl == "naive":
        def run():
            logits = scale * image @ text.T  # (B, B)
            labels = torch.arange(b, device=device)
            if sigmoid:
                sign = 2 * torch.eye(b, device=device) - 1
                return -F.logsigmoid(sign * (logits + bias)).sum() / b
            return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    else:
        def run():
            return contrastive_loss(image, text, kind=spec["kind"], logit_scale=scale,
                                    logit_bias=bias if sigmoid else None, impl=impl,
                                    block_size=spec.get("block_size"))
    return run, leaves


def worker(spec: dict, impl: str) -> dict:
    import torch

    device = "cuda" if impl == "triton" else "cpu"
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    # Warm up at a tiny shape first, so one-off library state (thread pools, BLAS scratch,
    # autograd engine) is not counted as the loss's memory. Distinct sizes, so that a
    # compiled (dynamic-shape) graph is not specialised on equal dimensions.
    tiny = {**spec, **{k: size for k, size in (("n", 96), ("h", 80), ("v", 112), ("b", 96),
                                                ("d", 80)) if k in spec}}
    warm_run, warm_leaves = _build(tiny, impl, device)
    torch.autograd.grad(warm_run(), warm_leaves)
    del warm_run, warm_leaves
    run, leaves = _build(spec, impl, device)
    if impl == "cce":  # keep torch.compile's (re)compilation out of the timed repeats
        torch.autograd.grad(run(), leaves)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        rss = PeakRss().start()
    stats = measure(lambda: torch.autograd.grad(run(), leaves), repeats=spec["repeats"],
                    sync=torch.cuda.synchronize if device == "cuda" else None)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
        method = "cuda max_memory_allocated"
    else:
        peak, method = rss.extra_bytes()
    return {"time_s": stats.median, "times_s": list(stats.samples), "peak_bytes": peak,
            "method": method}


def interleaved_worker(spec: dict, impls: list[str]) -> dict:
    """Every impl of one case in this one process, alternating: round r runs them in order
    (r even) or reversed (r odd), so a change in machine load hits every impl alike.
    Returns {impl: [seconds per round]}. No memory figures (one process holds them all)."""
    import time

    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    runs = {}
    for impl in impls:
        run, leaves = _build(spec, impl, "cpu")
        torch.autograd.grad(run(), leaves)  # warm-up (and CCE's compile) at the full shape
        runs[impl] = (run, leaves)
    times = {impl: [] for impl in impls}
    for r in range(spec["repeats"]):
        for impl in impls if r % 2 == 0 else impls[::-1]:
            run, leaves = runs[impl]
            started = time.perf_counter()
            torch.autograd.grad(run(), leaves)
            times[impl].append(time.perf_counter() - started)
    return times


def interleaved(cases: dict, impls: list[str]) -> list[dict]:
    """--interleaved: per case, one worker times every impl alternately; ratios of medians."""
    import statistics

    rows = []
    for name, spec in cases.items():
        if spec["op"] != "flce":
            continue
        cmd = [sys.executable, __file__, "--worker", json.dumps(spec), "interleaved:" +
               ",".join(impls)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                              env=worker_env())
        if proc.returncode != 0:
            raise RuntimeError(f"{name} / interleaved failed:\n{proc.stderr[-3000:]}")
        times = json.loads(proc.stdout.strip().splitlines()[-1])
        med = {impl: statistics.median(ts) for impl, ts in times.items()}
        for impl in impls:
            row = dict(case=name, impl=impl, median_s=med[impl], times_s=times[impl],
                       per_naive=med[impl] / med["naive"],
                       per_cce=med[impl] / med["cce"] if "cce" in med else None)
            rows.append(row)
            print(f"  {name:30s} {impl:14s} median {med[impl]:7.2f} s  / naive "
                  f"{row['per_naive']:.3f}" + (f"  / cce {row['per_cce']:.3f}"
                                               if row["per_cce"] is not None else "")
                  + f"  (rounds {', '.join(f'{t:.2f}' for t in times[impl])})", flush=True)
    return rows


# ------------------------------------------------------------------------- driver side


def run_worker(name: str, spec: dict, impl: str) -> dict:
    """One (case, implementation) measured by `worker` in a fresh interpreter."""
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec), impl]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=worker_env())
    if proc.returncode != 0:
        raise RuntimeError(f"{name} / {impl} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cce_unavailable_reason() -> str | None:
    """Why the CCE baseline cannot run in this interpreter, or None when it can."""
    try:
        import cut_cross_entropy  # noqa: F401
    except Exception as exc:  # ImportError, or a failure inside the package's import
        return (f"`import cut_cross_entropy` failed in {sys.executable}: "
                f"{type(exc).__name__}: {exc}. Install it in a throwaway venv that reuses this "
                f"one's torch (see docs/BENCHMARKS.md, Kernels) and run the script with it")
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--big", action="store_true", help="add N=8192, H=1024, V=65536")
    parser.add_argument("--quick", action="store_true", help="tiny shapes only")
    parser.add_argument("--repeats", type=int, help="timed repeats per case (default: per case, 3)")
    parser.add_argument("--threads", type=int,
                        help="torch threads in every worker (default: torch's own choice); 1 "
                             "avoids OpenMP barrier waits that dominate on a loaded machine")
    parser.add_argument("--cases", help="only the cases whose name contains this text "
                                            "(e.g. 'V=65536', 'softmax')")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--interleaved", action="store_true",
                        help="flce cases only: naive, ours (and CCE) timed alternately in one "
                             "process per case, medians and ratios; no memory figures")
    parser.add_argument("--chunk-sizes",
                        help="with --interleaved: also time impl='chunked' at these rows per "
                             "chunk (comma-separated), beside the default")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec, impl = json.loads(args.worker[0]), args.worker[1]
        if impl.startswith("interleaved:"):
            print(json.dumps(interleaved_worker(spec, impl.split(":", 1)[1].split(","))))
        else:
            print(json.dumps(worker(spec, impl)))
        return
    if args.chunk_sizes and not args.interleaved:
        parser.error("--chunk-sizes needs --interleaved")

    import torch

    cuda = torch.cuda.is_available()
    cases = dict(QUICK_CASES) if args.quick else {**FLCE_CASES, **CONTRASTIVE_CASES}
    if args.big:
        cases.update(BIG_CASES)
    if args.cases:
        cases = {name: spec for name, spec in cases.items() if args.cases in name}
        if not cases:
            parser.error(f"--cases {args.cases!r} matches no case")
    if args.repeats is not None:
        if args.repeats < 1:
            parser.error(f"--repeats must be >= 1, got {args.repeats}")
        cases = {name: {**spec, "repeats": args.repeats} for name, spec in cases.items()}
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        cases = {name: {**spec, "threads": args.threads} for name, spec in cases.items()}
    cce_reason = cce_unavailable_reason()
    impls = ["naive", "chunked"] + (["triton"] if cuda else []) + (["cce"] if not cce_reason
                                                                    else [])
    threads = args.threads or torch.get_num_threads()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, threads {threads},"
          f" CUDA: {'yes' if cuda else 'no (GPU goals unmeasured)'}, load average "
          f"{load_average()} at start", flush=True)
    print("CCE: " + (f"skipped ({cce_reason})" if cce_reason else
                     "measured (cut_cross_entropy, impl='torch_compile' on CPU)"), flush=True)
    if args.interleaved:
        extra = [f"chunked:{int(c)}" for c in args.chunk_sizes.split(",")] if args.chunk_sizes else []
        rows = interleaved(cases, ["naive", "chunked", *extra] + (["cce"] if not cce_reason
                                                                   else []))
        print(f"\nload average {load_average()} at end")
        if args.json:
            write_json(args.json, rows)
        return
    rows = []
    for name, spec in cases.items():
        results = {}
        for impl in impls:
            if impl == "cce" and spec["op"] != "flce":
                continue  # CCE has no contrastive loss
            results[impl] = res = run_worker(name, spec, impl)
            print(f"  {name:36s} {impl:8s} median {res['time_s']:8.2f} s  extra peak "
                  f"{res['peak_bytes'] / 2**20:9.1f} MiB  ({res['method']}; runs "
                  f"{', '.join(f'{t:.2f}' for t in res['times_s'])})", flush=True)
        naive = results["naive"]
        for impl in [i for i in impls[1:] if i in results]:
            res = results[impl]
            mem_ratio = ratio(res["peak_bytes"], max(naive["peak_bytes"], 1))
            time_ratio = ratio(res["time_s"], naive["time_s"])
            goals = [Goal("mem", "mem <= 0.10", mem_ratio, 0.1, "<=", unit="x")]
            if spec["op"] == "flce":
                goals.append(Goal("time", "time <= 1.00", time_ratio, 1.0, "<=", unit="x"))
            verdict = "PASS" if all(goal.passed for goal in goals) else "MISS"
            if impl == "cce":
                verdict = "n/a"  # a baseline, not ours
            rows.append(dict(case=name, impl=impl, naive=naive, fast=res, mem_ratio=mem_ratio,
                             time_ratio=time_ratio, verdict=verdict, threads=threads,
                             goal=", ".join(goal.label for goal in goals)))
        if "cce" in results and "chunked" in results:
            print(f"  {name:36s} chunked / cce time {results['chunked']['time_s'] / results['cce']['time_s']:.2f}",
                  flush=True)
    print(f"\nload average {load_average()} at end")
    print(table(["case", "impl", "mem/naive", "time/naive", "goal"],
                [[r["case"], r["impl"], r["mem_ratio"], r["time_ratio"],
                  f"{'baseline' if r['impl'] == 'cce' else r['goal']}: {r['verdict']}"] for r in rows],
                formats={"mem/naive": ".3f", "time/naive": ".2f"}))
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
