#!/usr/bin/env python
"""Benchmark: streaming M4 (pipeline/balance/m4/streaming.py) throughput, memory, and gap to the exact solver.

Synthetic data, m = 4 attributes over-represented at rate 0.55, c = 100 labels (prevalence
0.02-0.3), label r planted +-10% more frequent when attribute r % 4 is present; eta = 0.8,
eps_R = 0.02, eps_A = 0.01 (feasible: the exact solver meets every bound at N = 20,000;
at eta = 0.9 it is not, since an example carries ~16 labels). Minibatches are generated on the fly from
(seed, chunk index), so the benchmark never holds N x c labels: the streaming solver sees an
iterator, and only q (N,) float64 is stored.

Reports, per N in --sizes:
  * solver seconds per pass and examples/s per pass (data generation timed separately and
    excluded), for the dual passes and the final q-writing pass;
  * peak traced memory (tracemalloc: numpy reports its buffers) minus the q array, which
    should not grow with N;
then, at --exact-sizes (data held in memory), streaming vs exact (L-BFGS-B dual): objective
F, relative gap, constraint violations, and the time ratio.

    .venv/bin/python scripts/bench_m4.py                       # 10^6 and 10^7 (several minutes)
    .venv/bin/python scripts/bench_m4.py --sizes 1000000 --passes 3 --exact-sizes 20000
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc
from pathlib import Path

# One BLAS thread unless told otherwise (--blas-threads, read before numpy loads): the
# products here are (4 x B) x (B x 100), memory-bound, and on the shared VM OpenBLAS's
# second thread spin-waits behind other processes: one product measured 3 ms with one thread
# and 565 ms with two (2026-11-23, load average ~8).
_THREADS = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--blas-threads=")), "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", _THREADS)
os.environ.setdefault("OMP_NUM_THREADS", _THREADS)

import numpy as np  # noqa: E402
from bench_harness import timed, write_json  # noqa: E402

from pipeline.balance.m4 import (  # noqa: E402
    M4Problem,
    fit_streaming,
    m4_keep_probabilities,
    write_keep_probabilities,
)
from pipeline.balance.m4.statistics import M4StatisticsAccumulator  # noqa: E402

M, C = 4, 100
ETA, EPS_R, EPS_A = 0.8, 0.02, 0.01


def chunk(seed: int, index: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """One minibatch: attributes (rows, 4) bool, labels (rows, 100) bool."""
    rng = np.random.default_rng([seed, index])
    s = rng.random((rows, M), dtype=np.float32) < 0.55
    base = np.random.default_rng(seed).uniform(0.02, 0.3, C).astype(np.float32)
    p = base * (1 + 0.1 * (2 * s[:, np.arange(C) % M] - 1))
    y = rng.random((rows, C), dtype=np.float32) < p
    return s, y


class Stream:
    """Re-iterable minibatch source for N examples; accumulates generation time."""

    def __init__(self, n: int, batch: int, seed: int = 0):
        self.n, self.batch, self.seed = n, batch, seed
        self.generation_seconds = 0.0
        self.examples_yielded = 0
        self.generation_per_call: list[float] = []

    def __call__(self):
        self.generation_per_call.append(0.0)
        for index, start in enumerate(range(0, self.n, self.batch)):
            began = time.perf_counter()
            data = chunk(self.seed, index, min(self.batch, self.n - start))
            self.generation_seconds += time.perf_counter() - began
            self.generation_per_call[-1] += time.perf_counter() - began
            self.examples_yielded += len(data[0])
            yield data


def streaming_run(n: int, batch: int, passes: int) -> dict:
    problem = M4Problem.build(M, C, eta=ETA, eps_r=EPS_R, eps_a=EPS_A)
    stream = Stream(n, batch)
    tracemalloc.start()
    (duals, info), fit_wall = timed(fit_streaming, stream, problem, passes=passes, hessian_rows=8192)
    _, fit_peak = tracemalloc.get_traced_memory()  # no q yet: everything here is per-batch
    fit_generation = stream.generation_seconds
    passes_run = stream.examples_yielded / n  # the solver stops early once the dual stalls
    per_pass = [wall - gen for wall, gen in zip(info["pass_seconds"], stream.generation_per_call, strict=True)]
    q = np.empty(n)
    tracemalloc.reset_peak()
    _, write_wall = timed(write_keep_probabilities, stream(), duals, q)
    write_generation = stream.generation_seconds - fit_generation
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # One more pass (not timed) for the statistics under q: constraints met at this N?
    after, start = M4StatisticsAccumulator(problem.pi), 0
    for s, y in stream():
        after.update(s, y, q[start:start + len(s)])
        start += len(s)
    stats = after.result(eps_r=problem.eps_r, eps_a=problem.eps_a, tolerance=1e-4)
    fit_solver = fit_wall - fit_generation
    write_solver = write_wall - write_generation
    return {"n": n, "batch": batch, "passes": passes, "passes_run": passes_run, "fit_solver_s": fit_solver,
            "solver_s_per_pass": fit_solver / passes_run, "examples_per_s_per_pass": n * passes_run / fit_solver,
            "stochastic_pass_examples_per_s": n / per_pass[0],
            "full_pass_examples_per_s_median": n / float(np.median(per_pass[1:])) if len(per_pass) > 1 else None,
            "write_solver_s": write_solver, "write_examples_per_s": n / write_solver,
            "generation_s": fit_generation + write_generation,
            "fit_peak_traced_mb": fit_peak / 2**20,
            "peak_traced_mb_beyond_q": (peak - q.nbytes) / 2**20, "q_mb": q.nbytes / 2**20,
            "q_mean": float(q.mean()), "violations_after": len(stats.violations),
            "max_excess_after": max((v.excess for v in stats.violations), default=0.0),
            "max_abs_representation_after": stats.max_abs_representation,
            "max_abs_association_after": stats.max_abs_association,
            "info": dict(info)}


def exact_comparison(n: int, batch: int, passes: int) -> dict:
    s, y = chunk(1, 0, n)
    exact, exact_s = timed(m4_keep_probabilities, s, y, eta=ETA, eps_r=EPS_R, eps_a=EPS_A, solver="exact",
                           on_violation="ignore")
    stream, stream_s = timed(m4_keep_probabilities, s, y, eta=ETA, eps_r=EPS_R, eps_a=EPS_A, batch_size=batch,
                             passes=passes, on_violation="ignore")
    return {"n": n, "exact_s": exact_s, "streaming_s": stream_s, "time_ratio_exact_over_streaming": exact_s / stream_s,
            "exact_objective": exact.objective, "streaming_objective": stream.objective,
            "objective_rel_gap": (stream.objective - exact.objective) / exact.objective,
            "penalized_rel_gap": (stream.penalized_objective - exact.penalized_objective) / exact.penalized_objective,
            "exact_violations": len(exact.violations), "streaming_violations": len(stream.violations),
            "streaming_max_excess": max((v.excess for v in stream.violations), default=0.0),
            "streaming_max_raw_excess": _raw_excess(stream), "exact_max_raw_excess": _raw_excess(exact),
            "exact_duality_gap": exact.info["gap"], "before_violations": len(exact.before.violations)}


def _raw_excess(result) -> float:
    """Largest |statistic| - eps over all constraints, with no reporting tolerance (<= 0: met)."""
    return float(max((np.abs(result.after.representation) - EPS_R).max(),
                     (np.abs(result.after.association) - EPS_A).max()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--batch", type=int, default=65536)
    parser.add_argument("--passes", type=int, default=10)
    parser.add_argument("--exact-sizes", type=int, nargs="*", default=[20_000, 200_000])
    parser.add_argument("--exact-batch", type=int, default=8192)
    parser.add_argument("--exact-passes", type=int, default=10)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--blas-threads", default="1", help="OpenBLAS threads (give as --blas-threads=N)")
    args = parser.parse_args()
    results = {"streaming": [], "exact": []}
    for n in args.sizes:
        row = streaming_run(n, args.batch, args.passes)
        results["streaming"].append(row)
        print(f"N={n:>11,} fit {row['solver_s_per_pass']:.2f} s/pass = {row['examples_per_s_per_pass'] / 1e6:.2f} M ex/s/pass "
              f"({row['passes_run']:.0f} of {args.passes} passes run; pass 1 (stochastic) "
              f"{row['stochastic_pass_examples_per_s'] / 1e6:.2f}, full passes median "
              f"{(row['full_pass_examples_per_s_median'] or 0) / 1e6:.2f} M ex/s); write pass {row['write_examples_per_s'] / 1e6:.2f} M ex/s; "
              f"generation {row['generation_s']:.1f} s excluded; peak traced: fit {row['fit_peak_traced_mb']:.1f} MiB, "
              f"write pass beyond q "
              f"{row['peak_traced_mb_beyond_q']:.1f} MiB (q {row['q_mb']:.0f} MiB); mean q {row['q_mean']:.6f}; "
              f"after: max|rep| {row['max_abs_representation_after']:.4f} max|assoc| "
              f"{row['max_abs_association_after']:.4f}, {row['violations_after']} violations "
              f"(max excess {row['max_excess_after']:.1e})",
              flush=True)
    if len(results["streaming"]) > 1:
        first, last = results["streaming"][0], results["streaming"][-1]
        print(f"fit peak: {first['fit_peak_traced_mb']:.1f} MiB at N={first['n']:,} vs "
              f"{last['fit_peak_traced_mb']:.1f} MiB at N={last['n']:,}; "
              f"write pass beyond q: {first['peak_traced_mb_beyond_q']:.1f} MiB vs "
              f"{last['peak_traced_mb_beyond_q']:.1f} MiB "
              f"(ratio {last['peak_traced_mb_beyond_q'] / first['peak_traced_mb_beyond_q']:.2f} for "
              f"{last['n'] / first['n']:.0f}x N)")
    for n in args.exact_sizes:
        row = exact_comparison(n, args.exact_batch, args.exact_passes)
        results["exact"].append(row)
        print(f"N={n:>9,} exact {row['exact_s']:.2f} s (duality gap {row['exact_duality_gap']:.1e}, "
              f"{row['exact_violations']} violations) vs streaming {row['streaming_s']:.2f} s "
              f"(B={args.exact_batch}, {args.exact_passes} passes; {row['streaming_violations']} violations, "
              f"max excess {row['streaming_max_excess']:.1e}; raw max |stat| - eps: streaming "
              f"{row['streaming_max_raw_excess']:+.1e}, exact {row['exact_max_raw_excess']:+.1e}): objective gap {100 * row['objective_rel_gap']:+.3f}%, "
              f"penalized gap {100 * row['penalized_rel_gap']:+.3f}%, "
              f"time exact/streaming {row['time_ratio_exact_over_streaming']:.2f}; "
              f"{row['before_violations']} violations before", flush=True)
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
