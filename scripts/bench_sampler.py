#!/usr/bin/env python
"""Benchmark: our mixture sampler against Hugging Face ``datasets.interleave_datasets``.

One run, the same long-tailed sources, the same temperature-sampling probabilities
(p_i proportional to n_i^(1/tau), from ``pipeline.mixing.Temperature``) for everything:

ours (``pipeline.sampling.sampler``), both ``mode="exact"`` and ``mode="stochastic"``:
  * index generation: ``MixtureSampler.positions(start, stop)`` in big chunks (samples/s);
  * end-to-end mixed-example throughput: ``RankBatchSampler`` micro-batches, rows read from
    Arrow with one batched ``dataset[list_of_indices]`` per source and micro-batch, as
    ``pipeline.data.text_rows.MixtureDataset.build`` does, but the raw ``text`` column,
    untokenised (the baselines do not tokenise either), and without its ``SourceSplit``
    train/validation row mapping (examples/s);
  * resume latency: ``draw_counts(step) + global_batch(step)`` on a freshly built sampler
    at step 10^6 and other positions (ms), the sampler build timed separately.

baselines, ``interleave_datasets(probabilities=p, seed=seed, stopping_strategy="all_exhausted")``:
  * map-style (``Dataset`` per source): the interleave call (= index build), then rows
    iterated one by one (and, for reference, in batches of the micro-batch size);
  * iterable (``.to_iterable_dataset()`` per source): rows iterated one by one;
  * iterable resume: ``state_dict()`` after K consumed examples, a fresh interleaved
    dataset, ``load_state_dict(state)``, time until the first example arrives.

peer baselines (``--baselines``, default all; an absent one is skipped with one line saying how
to install it: ``make bench-baselines``), the same sources and p, rows one by one, no DataLoader:
  * torchdata.nodes ``MultiNodeWeightedSampler`` (one ``IterableWrapper`` per source over its
    rows, weights = p, seed), behind a ``Loader``: build, first example, rows/s, and
    ``Loader.state_dict()`` after K examples -> fresh loader -> ``load_state_dict`` -> first
    example. Imported here (PYTHONPATH=.cache/bench-baselines/site).
  * mosaicml-streaming ``StreamingDataset`` over one ``Stream(local=..., proportion=p_i)`` per
    source, ``shuffle=True``, ``num_canonical_nodes``: the sources written with ``MDSWriter``
    first (timed apart: a one-off cost), then build, first example, rows/s, and
    ``state_dict(K, from_beginning=True)`` -> fresh dataset -> ``load_state_dict`` -> first
    example. It runs in its own interpreter (``--streaming-python``; the venv `make
    bench-baselines` builds), as ``--streaming-worker``, on the sources' texts.

checks, for every sampler including ours (PASS / FAIL / n/a, with what differed):
  (a) the same seed twice gives the same first examples; (b) state after K examples -> fresh
  object -> the next M examples equal the uninterrupted run's K..K+M; (c) world-size
  independence: for the same global steps, the union over W=2 and W=3 ranks equals the W=1
  stream (ours: RankBatchSampler(rank, world); interleave: split_dataset_by_node; torchdata:
  rank/world_size and the rows split over ranks; streaming: W concurrent simulated ranks).

Every measurement is repeated ``--repeats`` times and summarised by its median. The table
ends with the ratios ours / baseline and PASS / MISS per goal. ``--json PATH`` writes every
number. Progress goes to stderr, the table to stdout.

    .venv/bin/python scripts/bench_sampler.py                      # full run (~2-3 min, 2 cores)
    .venv/bin/python scripts/bench_sampler.py --quick --json /tmp/bench.json
    make bench-baselines BENCH_ARGS="--json .cache/bench_sampler_baselines.json"   # with the peers
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import logging
import math
import os
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from bench_harness import (  # noqa: E402
    DEFAULT_CACHE,
    REPO,
    Goal,
    Series,
    describe_machine,
    fmt,
    fmt_ratio,
    machine,
    ratio,
    render_goals,
    table,
    write_json,
)

log = logging.getLogger("bench_sampler")

DEFAULT_DATA = REPO.parent / "shared" / "data" / "tatoeba" / "mono"
MIN_SOURCES = 50

# The goals.
GOAL_VS_ITERABLE = 20.0  # end-to-end throughput, ours / iterable interleave
GOAL_VS_MAP = 5.0  # end-to-end throughput, ours / map-style interleave (rows, build excluded)
GOAL_INDEX_RATE = 1e6  # samples/s of index generation
GOAL_RESUME_MS = 100.0  # resume latency at any position


# -- measurements ---------------------------------------------------------------------------
class Results:
    """The run's measured series, in measuring order, and what is known about the data."""

    def __init__(self) -> None:
        self.measures: dict[str, Series] = {}
        self.info: dict[str, Any] = {}

    def add(self, key: str, label: str, unit: str, note: str = "") -> Series:
        self.measures[key] = Series(key, label, unit, note=note)
        return self.measures[key]

    def median(self, key: str) -> float:
        return self.measures[key].median


# -- data -----------------------------------------------------------------------------------
def count_lines(path: Path) -> int:
    with open(path, encoding="utf-8", errors="replace") as handle:
        return sum(1 for line in handle if line.strip())


def choose_sources(sizes: dict[str, int], number: int | None) -> list[str]:
    """All sources, or `number` of them evenly spread over the size ranking (largest and
    smallest always included), so a subset keeps the long tail."""
    names = sorted(sizes, key=lambda n: (sizes[n], n))
    if number is None or number >= len(names):
        return sorted(names)
    if number < 2:
        raise SystemExit("--num-sources must be >= 2")
    picks = np.round(np.linspace(0, len(names) - 1, number)).astype(int)
    return sorted(names[i] for i in np.unique(picks))


def write_synthetic(folder: Path, num_sources: int, smallest: int, largest: int, seed: int) -> None:
    """Long-tailed text files: log-normal sizes rescaled to [smallest, largest]."""
    rng = np.random.default_rng(seed)
    logs = np.sort(rng.normal(0.0, 1.0, num_sources))
    logs = (logs - logs.min()) / (logs.max() - logs.min())
    sizes = np.round(np.exp(np.log(smallest) + logs * (np.log(largest) - np.log(smallest))))
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyz     "))
    for i, size in enumerate(sizes.astype(int)):
        letters = alphabet[rng.integers(0, len(alphabet), size=(size, 48))]
        lines = [f"s{i:03d} {j} " + "".join(row).strip() + "\n" for j, row in enumerate(letters)]
        (folder / f"s{i:03d}.txt").write_text("".join(lines), encoding="utf-8")


def load_corpus(args: argparse.Namespace):
    """(corpus, source names, description) of the benchmark's sources, prepared and cached."""
    from data_recipes.text_dir import TextDir
    from pipeline.data.build_corpus import prepare_sources

    data = Path(args.data)
    files = sorted(data.glob("*.txt")) if data.is_dir() else []
    synthetic_dir = None
    if files:
        sizes = {p.stem: count_lines(p) for p in files}
        names = choose_sources(sizes, args.num_sources or (MIN_SOURCES if args.quick else None))
        recipe = TextDir(data, languages=None if len(names) == len(sizes) else names,
                         max_documents_per_source=args.max_docs_per_source)
        origin = f"real data: TextDir({data})"
    else:
        synthetic_dir = Path(tempfile.mkdtemp(prefix="bench_sampler_synthetic_"))
        count = args.num_sources or 60
        largest = 2_000 if args.quick else 30_000
        write_synthetic(synthetic_dir, count, smallest=largest // 100, largest=largest, seed=1234)
        recipe = TextDir(synthetic_dir, max_documents_per_source=args.max_docs_per_source,
                         name="synthetic_longtail")
        names = None
        origin = (f"SYNTHETIC long-tailed corpus ({count} sources, log-normal sizes, "
                  f"largest/smallest = 100): {data} not found")
        log.warning("%s does not exist or has no *.txt files: using a synthetic corpus", data)
    try:
        corpus = prepare_sources(recipe, args.cache_dir, progress=False)
    finally:
        if synthetic_dir is not None:
            shutil.rmtree(synthetic_dir, ignore_errors=True)
    names = sorted(names or corpus.source_names)
    if args.max_docs_per_source:
        origin += f", first {args.max_docs_per_source} documents per source"
    return corpus, names, origin


# -- ours -----------------------------------------------------------------------------------
def fetch_texts(micro: list[tuple[int, int, int]], reader) -> list[str]:
    """The pipeline's row path without tokenising: one Arrow take (`RowReader.read_columns`)."""
    sources = np.fromiter((s for s, _, _ in micro), dtype=np.int64, count=len(micro))
    rows = np.fromiter((i for _, i, _ in micro), dtype=np.int64, count=len(micro))
    return reader.read_columns(sources, rows)["text"]


def run_ours_e2e(sampler, reader, micro_batch: int,
                 examples: int) -> tuple[float, float, float, np.ndarray, float]:
    """One pass: (examples/s, seconds in the batch sampler, seconds reading rows, sources,
    examples per CPU second of this process)."""
    from pipeline.sampling.sampler import RankBatchSampler

    steps = max(1, math.ceil(examples / sampler.global_batch_size))
    batches = iter(RankBatchSampler(sampler, 0, 1, micro_batch, start_step=0, num_steps=steps))
    in_sampler = in_read = 0.0
    count = 0
    sources = []
    cpu = time.process_time()
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        micro = next(batches, None)
        t1 = time.perf_counter()
        in_sampler += t1 - t0
        if micro is None:
            break
        texts = fetch_texts(micro, reader)
        in_read += time.perf_counter() - t1
        count += len(texts)
        sources.append([s for s, _, _ in micro])
    elapsed = time.perf_counter() - start
    return count / elapsed, in_sampler, in_read, np.concatenate(sources), count / (time.process_time() - cpu)


def bench_ours(args, res: Results, stage, docs: dict[str, int], reader, probs: np.ndarray) -> None:
    from pipeline.sampling.sampler import MixtureSampler

    def build(mode: str) -> MixtureSampler:
        return MixtureSampler(stage, docs, args.global_batch, args.total_steps, seed=args.seed, mode=mode)

    rng = np.random.default_rng(args.seed)
    resume_steps = [args.resume_step, *sorted(int(s) for s in rng.integers(0, args.total_steps, 3)),
                    10 * args.total_steps]
    res.info["resume_steps"] = resume_steps
    for mode in args.modes:
        # (a) index generation in big chunks.
        sampler = build(mode)
        assert np.allclose(sampler.plan_at(0).sample_probs, probs), "sampler and baseline probs differ"
        m = res.add(f"ours_{mode}_index_rate", f"ours {mode}: index generation, positions() in "
                    f"{args.index_chunk:,} chunks", "samples/s")
        for r in range(args.repeats):
            start = r * args.index_chunk
            t0 = time.perf_counter()
            sampler.positions(start, start + args.index_chunk)
            m.samples.append(args.index_chunk / (time.perf_counter() - t0))
        log.info("ours %s: index generation %s samples/s", mode, fmt(m.median))

        # (b) end-to-end: micro-batches from RankBatchSampler + batched Arrow reads.
        m = res.add(f"ours_{mode}_e2e", f"ours {mode}: RankBatchSampler + batched Arrow reads "
                    f"(global {args.global_batch}, micro {args.micro_batch})", "examples/s")
        share = res.add(f"ours_{mode}_e2e_sampler_share", f"ours {mode}: share of e2e time in "
                        "RankBatchSampler (rest: Arrow reads)", "%")
        cpu = res.add(f"ours_{mode}_e2e_cpu", f"ours {mode}: e2e as above, per CPU second of this process "
                      "(robust to other load)", "examples/cpu-s")
        for _ in range(args.repeats):
            rate, in_sampler, in_read, sources, cpu_rate = run_ours_e2e(sampler, reader, args.micro_batch,
                                                                        args.examples)
            m.samples.append(rate)
            cpu.samples.append(cpu_rate)
            share.samples.append(100.0 * in_sampler / (in_sampler + in_read))
        freq = np.bincount(sources, minlength=len(probs)) / len(sources)
        res.info[f"ours_{mode}_tv_distance"] = float(0.5 * np.abs(freq - probs).sum())
        log.info("ours %s: end-to-end %s examples/s", mode, fmt(m.median))

        # (c) resume: fresh sampler (build timed apart), then draw_counts + global_batch.
        build_m = res.add(f"ours_{mode}_build_s", f"ours {mode}: build a MixtureSampler "
                          f"(total_steps {args.total_steps:,})", "s")
        for step in resume_steps:
            lat = res.add(f"ours_{mode}_resume_ms@{step}", f"ours {mode}: resume at step {step:,}"
                          f"{' (past planned end)' if step >= args.total_steps else ''}", "ms")
            rows = res.add(f"ours_{mode}_resume_rows_ms@{step}", f"ours {mode}: resume at step "
                           f"{step:,} + first micro-batch rows", "ms") if step == args.resume_step else None
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fresh = build(mode)
                t1 = time.perf_counter()
                fresh.draw_counts(step)
                batch = fresh.global_batch(step)
                t2 = time.perf_counter()
                build_m.samples.append(t1 - t0)
                lat.samples.append((t2 - t1) * 1e3)
                if rows is not None:
                    micro = [(int(s), int(i), step) for s, i in
                             zip(batch.source[:args.micro_batch], batch.index[:args.micro_batch], strict=True)]
                    fetch_texts(micro, reader)
                    rows.samples.append((time.perf_counter() - t1) * 1e3)
        worst = max(res.median(f"ours_{mode}_resume_ms@{s}") for s in resume_steps)
        w = res.add(f"ours_{mode}_resume_worst_ms", f"ours {mode}: resume, worst position (median)", "ms")
        w.samples.append(worst)
        log.info("ours %s: resume worst median %.1f ms, build %.3f s", mode, worst, build_m.median)


def profile_ours(args, stage, docs: dict[str, int], reader) -> list[tuple[str, float, float]]:
    """cProfile one end-to-end pass (exact mode): (function, share of total, cumulative s)."""
    from pipeline.sampling.sampler import MixtureSampler

    sampler = MixtureSampler(stage, docs, args.global_batch, args.total_steps, seed=args.seed, mode="exact")
    profiler = cProfile.Profile()
    profiler.enable()
    run_ours_e2e(sampler, reader, args.micro_batch, args.examples)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    total = max(ct for (_, _, _, ct, _) in stats.values())
    rows = []
    for (filename, line, name), (_, _, _, ct, _) in stats.items():
        if "pipeline" in filename or name in ("fetch_texts", "__getitem__", "read"):
            rows.append((f"{Path(filename).name}:{line}({name})", ct / total, ct))
    return sorted(rows, key=lambda r: -r[2])[:10]


# -- baselines ------------------------------------------------------------------------------
def bench_baselines(args, res: Results, dsets: list, probs: np.ndarray) -> None:
    import datasets

    p = [float(x) for x in probs]

    def interleave(parts):
        return datasets.interleave_datasets(parts, probabilities=p, seed=args.seed,
                                            stopping_strategy="all_exhausted")

    # Map-style: build (the interleave call computes the index mapping), then iterate.
    build = res.add("map_build_s", "map-style interleave_datasets: index build", "s")
    rows = res.add("map_rows", "map-style: rows one by one (build excluded)", "examples/s")
    rows_incl = res.add("map_rows_incl_build", "map-style: rows one by one (build included)", "examples/s")
    batched = res.add("map_batched", f"map-style: .iter(batch_size={args.micro_batch}) (build "
                      "excluded)", "examples/s")
    rows_cpu = res.add("map_rows_cpu", "map-style: rows one by one, per CPU second", "examples/cpu-s")
    map_texts: list[str] = []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        mixed = interleave(dsets)
        t1, c1 = time.perf_counter(), time.process_time()
        texts = [ex["text"] for ex in itertools.islice(mixed, args.examples)]
        t2 = time.perf_counter()
        rows_cpu.samples.append(len(texts) / (time.process_time() - c1))
        build.samples.append(t1 - t0)
        rows.samples.append(len(texts) / (t2 - t1))
        rows_incl.samples.append(len(texts) / (t2 - t0))
        if r == 0:
            map_texts = texts
            res.info["interleaved_stream_length"] = len(mixed)
            res.info["map_tv_distance"] = _map_tv_distance(mixed, dsets, probs, args.examples)
        t0 = time.perf_counter()
        count = 0
        for batch in mixed.iter(batch_size=args.micro_batch):
            count += len(batch["text"])
            if count >= args.examples:
                break
        batched.samples.append(count / (time.perf_counter() - t0))
        del mixed
    log.info("map-style: build %.2f s, rows %s/s, batched %s/s", build.median, fmt(rows.median),
             fmt(batched.median))

    # Iterable: one IterableDataset per source, interleaved; rows one by one.
    def build_iterable():
        return interleave([d.to_iterable_dataset() for d in dsets])

    ibuild = res.add("iterable_build_s", "iterable: to_iterable_dataset() x S + interleave", "s")
    irows = res.add("iterable_rows", "iterable: rows one by one", "examples/s")
    start = res.add("iterable_first_ms", "iterable: fresh start, time to first example", "ms")
    irows_cpu = res.add("iterable_rows_cpu", "iterable: rows one by one, per CPU second", "examples/cpu-s")
    for r in range(args.repeats):
        t0 = time.perf_counter()
        mixed = build_iterable()
        t1, c1 = time.perf_counter(), time.process_time()
        stream = iter(mixed)
        first = next(stream)
        t2 = time.perf_counter()
        texts = [first["text"], *(ex["text"] for ex in itertools.islice(stream, args.iterable_examples - 1))]
        t3 = time.perf_counter()
        irows_cpu.samples.append(len(texts) / (time.process_time() - c1))
        stream.close()
        ibuild.samples.append(t1 - t0)
        start.samples.append((t2 - t1) * 1e3)
        irows.samples.append(len(texts) / (t3 - t1))
        if r == 0:
            n = min(len(texts), len(map_texts))
            res.info["iterable_same_stream_as_map"] = texts[:n] == map_texts[:n]
            res.info["iterable_same_stream_checked"] = n
    log.info("iterable: build %.2f s, rows %s/s", ibuild.median, fmt(irows.median))

    # Iterable resume: states captured in one pass, then fresh dataset + load_state_dict.
    positions = sorted(set(args.iterable_resume_at))
    mixed = build_iterable()
    states: dict[int, dict] = {}
    expected: dict[int, dict] = {}
    consumed = 0
    t0 = time.perf_counter()
    stream = iter(mixed)
    for example in stream:
        if consumed in states:
            expected[consumed] = example  # the example a resume from this state must yield first
        consumed += 1
        if consumed in positions:
            states[consumed] = mixed.state_dict()
        if consumed > positions[-1]:
            break
    stream.close()
    res.info["iterable_resume_replay_s"] = time.perf_counter() - t0
    exact = True
    for k in positions:
        m = res.add(f"iterable_resume_ms@{k}", f"iterable: load_state_dict after {k:,} examples "
                    "+ first example (build excluded)", "ms")
        for _ in range(args.repeats):
            fresh = build_iterable()
            t0 = time.perf_counter()
            fresh.load_state_dict(states[k])
            stream = iter(fresh)
            example = next(stream)
            m.samples.append((time.perf_counter() - t0) * 1e3)
            stream.close()
            exact &= example == expected[k]
        log.info("iterable: resume after %d examples %.1f ms", k, m.median)
    res.info["iterable_resume_exact"] = bool(exact)


def _map_tv_distance(mixed, dsets: list, probs: np.ndarray, examples: int) -> float | None:
    """Total-variation distance of the map-style stream's first rows from probs (via its
    private index mapping; None if datasets changes it)."""
    try:
        offsets = np.cumsum([0] + [len(d) for d in dsets])
        index = mixed._indices.column(0).slice(0, examples).to_numpy()
        sources = np.searchsorted(offsets, index, side="right") - 1
        freq = np.bincount(sources, minlength=len(probs)) / len(sources)
        return float(0.5 * np.abs(freq - probs).sum())
    except Exception:  # noqa: BLE001 - informational only
        return None


# -- determinism and elasticity checks --------------------------------------------------------
# One small geometry for every sampler's checks (examples, not seconds): a global batch that
# worlds 1, 2 and 3 divide, with a micro-batch that divides each rank's share.
CHECK_GLOBAL = 96  # examples per global step in the checks
CHECK_MICRO = 16  # ours: micro-batch of the checks (W=3: 32 per rank = 2 micro-batches)
CHECK_FIRST = 2_016  # (a) first N examples of two runs with one seed (21 steps)
CHECK_RESUME_AT = 1_920  # (b) K: state taken after K examples (20 steps) ...
CHECK_NEXT = 960  # ... and the next M examples compared (10 steps)
CHECK_STEPS = 8  # (c) global steps compared between W=1 and W=2, 3
CHECK_WORLDS = (2, 3)
CHECK_NAMES = ("same_seed", "resume", "world_2", "world_3")
INSTALL_HINT = "make bench-baselines"
BASELINES_DIR = REPO / ".cache" / "bench-baselines"
TORCHDATA_SITE = BASELINES_DIR / "site"
STREAMING_PYTHON = BASELINES_DIR / "streaming-venv" / "bin" / "python"


def verdict(ok: bool | None, detail: str) -> dict[str, str]:
    """A check's cell: PASS, FAIL or n/a (ok is None), and what was compared or differed."""
    return {"verdict": "n/a" if ok is None else "PASS" if ok else "FAIL", "detail": detail}


def compare_streams(got: list, want: list) -> dict[str, str]:
    """`got` equals `want` element by element (texts of the examples, in order)."""
    if got == want:
        return verdict(True, f"{len(want):,} examples identical")
    n = min(len(got), len(want))
    first = next((i for i in range(n) if got[i] != want[i]), n)
    differ = sum(g != w for g, w in zip(got, want, strict=False)) + abs(len(got) - len(want))
    return verdict(False, f"{differ:,} of {len(want):,} examples differ (first at {first:,}; "
                   f"lengths {len(got):,} vs {len(want):,})")


def compare_steps(ranks: list[list], whole: list, global_batch: int, steps: int) -> dict[str, str]:
    """Union over ranks of each global step (rank r's step s = its examples
    [s*b, (s+1)*b), b = global_batch / world) against the one-rank stream's step s, as
    multisets; the detail also says whether the rank-major concatenation keeps the order."""
    from collections import Counter

    world = len(ranks)
    per_rank = global_batch // world
    same_steps = ordered = common = 0
    for s in range(steps):
        union = [x for r in ranks for x in r[s * per_rank:(s + 1) * per_rank]]
        target = whole[s * global_batch:(s + 1) * global_batch]
        shared = sum((Counter(union) & Counter(target)).values())
        common += shared
        same_steps += shared == len(target) == len(union)
        ordered += union == target
    total = steps * global_batch
    detail = (f"{same_steps}/{steps} steps equal as sets, {common:,}/{total:,} examples shared"
              f"{', same order (rank-major)' if ordered == steps else ''}")
    return verdict(same_steps == steps, detail)


def render_checks(checks: dict[str, dict[str, dict[str, str]]]) -> list[str]:
    """The check table (one row per sampler) and a line for each FAIL and n/a."""
    rows = [[name, *(cells.get(c, verdict(None, "not run"))["verdict"] for c in CHECK_NAMES)]
            for name, cells in checks.items()]
    out = [f"determinism and elasticity checks ((a) first {CHECK_FIRST:,} examples twice; "
           f"(b) state after K={CHECK_RESUME_AT:,} -> fresh object -> next M={CHECK_NEXT:,}; "
           f"(c) {CHECK_STEPS} global steps of {CHECK_GLOBAL}, union over ranks vs W=1):",
           table(["sampler", "(a) same seed", "(b) resume", "(c) W=2", "(c) W=3"], rows,
                 align="<<<<<")]
    for name, cells in checks.items():
        for c in CHECK_NAMES:
            cell = cells.get(c)
            if cell and cell["verdict"] != "PASS":
                out.append(f"  {name} {c}: {cell['verdict']}: {cell['detail']}")
    return out


def ours_stream(sampler, reader, world: int, rank: int, start_step: int, steps: int) -> list[str]:
    """Texts of rank `rank`'s micro-batches (CHECK_MICRO) for global steps
    [start_step, start_step + steps), in the order the rank consumes them."""
    from pipeline.sampling.sampler import RankBatchSampler

    texts: list[str] = []
    for micro in RankBatchSampler(sampler, rank, world, CHECK_MICRO, start_step=start_step,
                                  num_steps=steps):
        texts.extend(fetch_texts(micro, reader))
    return texts


def check_ours(args, stage, docs: dict[str, int], reader, mode: str) -> dict[str, dict[str, str]]:
    """(a), (b), (c) for our sampler through its public API: MixtureSampler, RankBatchSampler,
    state_dict(step) -> fresh sampler -> load_state_dict."""
    from pipeline.sampling.sampler import MixtureSampler

    def build() -> MixtureSampler:
        return MixtureSampler(stage, docs, CHECK_GLOBAL, args.total_steps, seed=args.seed, mode=mode)

    first_steps = CHECK_FIRST // CHECK_GLOBAL
    checks = {"same_seed": compare_streams(ours_stream(build(), reader, 1, 0, 0, first_steps),
                                           ours_stream(build(), reader, 1, 0, 0, first_steps))}
    k, m = CHECK_RESUME_AT // CHECK_GLOBAL, CHECK_NEXT // CHECK_GLOBAL
    first = build()
    whole = ours_stream(first, reader, 1, 0, 0, k + m)
    fresh = build()
    step = fresh.load_state_dict(first.state_dict(k))
    checks["resume"] = compare_streams(ours_stream(fresh, reader, 1, 0, step, m), whole[k * CHECK_GLOBAL:])
    one = ours_stream(build(), reader, 1, 0, 0, CHECK_STEPS)
    for world in CHECK_WORLDS:
        ranks = [ours_stream(build(), reader, world, r, 0, CHECK_STEPS) for r in range(world)]
        checks[f"world_{world}"] = compare_steps(ranks, one, CHECK_GLOBAL, CHECK_STEPS)
    return checks


def check_interleave(args, dsets: list, probs: np.ndarray) -> dict[str, dict[str, dict[str, str]]]:
    """(a), (b), (c) for both interleave_datasets flavours; (c) through
    `datasets.distributed.split_dataset_by_node` on the interleaved dataset."""
    import datasets
    from datasets.distributed import split_dataset_by_node

    p = [float(x) for x in probs]

    def interleave(parts):
        return datasets.interleave_datasets(parts, probabilities=p, seed=args.seed,
                                            stopping_strategy="all_exhausted")

    def texts(mixed, n: int) -> list[str]:
        return [ex["text"] for ex in itertools.islice(mixed, n)]

    k, m = CHECK_RESUME_AT, CHECK_NEXT
    out: dict[str, dict[str, dict[str, str]]] = {}
    mixed = interleave(dsets)
    whole = texts(mixed, k + m)
    cells = {"same_seed": compare_streams(texts(interleave(dsets), CHECK_FIRST), whole[:CHECK_FIRST])}
    cell = compare_streams(list(mixed.select(range(k, k + m))["text"]), whole[k:])
    cell["detail"] += " (no state_dict: a map-style Dataset resumes by index, mixed[K:K+M])"
    cells["resume"] = cell
    one = whole[:CHECK_STEPS * CHECK_GLOBAL]
    for world in CHECK_WORLDS:
        ranks = [texts(split_dataset_by_node(mixed, rank=r, world_size=world), CHECK_STEPS * CHECK_GLOBAL // world)
                 for r in range(world)]
        cells[f"world_{world}"] = compare_steps(ranks, one, CHECK_GLOBAL, CHECK_STEPS)
        cells[f"world_{world}"]["detail"] += " (split_dataset_by_node: contiguous shards)"
    out["interleave map-style"] = cells

    def build_iterable():
        return interleave([d.to_iterable_dataset() for d in dsets])

    mixed = build_iterable()
    whole, stream = [], iter(mixed)
    state = None
    for example in stream:
        whole.append(example["text"])
        if len(whole) == k:
            state = mixed.state_dict()
        if len(whole) == k + m:
            break
    stream.close()
    cells = {"same_seed": compare_streams(texts(build_iterable(), CHECK_FIRST), whole[:CHECK_FIRST])}
    fresh = build_iterable()
    fresh.load_state_dict(state)
    cells["resume"] = compare_streams(texts(fresh, m), whole[k:])
    for world in CHECK_WORLDS:
        ranks = [texts(split_dataset_by_node(build_iterable(), rank=r, world_size=world),
                       CHECK_STEPS * CHECK_GLOBAL // world) for r in range(world)]
        cells[f"world_{world}"] = compare_steps(ranks, whole, CHECK_GLOBAL, CHECK_STEPS)
        cells[f"world_{world}"]["detail"] += " (split_dataset_by_node on the interleaved IterableDataset)"
    out["interleave iterable"] = cells
    return out


# -- baseline: torchdata.nodes MultiNodeWeightedSampler ---------------------------------------
def torchdata_absent() -> str | None:
    """Why torchdata.nodes cannot be used here (None when it can)."""
    try:
        from torchdata.nodes import Loader, MultiNodeWeightedSampler  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure means "absent"
        return f"{type(exc).__name__}: {exc}"
    return None


def torchdata_loader(dsets: list, probs: np.ndarray, seed: int, rank: int = 0, world: int = 1):
    """A `torchdata.nodes.Loader` over `MultiNodeWeightedSampler`: one `IterableWrapper` per
    source over its rows (rank `rank` of `world` reads rows rank, rank + world, ...: the
    usual rank split, as `DistributedSampler` does), weights = our probabilities."""
    from torchdata.nodes import IterableWrapper, Loader, MultiNodeWeightedSampler

    parts = dsets if world == 1 else [d.shard(num_shards=world, index=rank, contiguous=False) for d in dsets]
    nodes = {str(i): IterableWrapper(d) for i, d in enumerate(parts)}
    weights = {str(i): float(p) for i, p in enumerate(probs)}
    return Loader(MultiNodeWeightedSampler(nodes, weights, seed=seed, rank=rank, world_size=world))


def bench_torchdata(args, res: Results, dsets: list, probs: np.ndarray) -> dict[str, dict[str, str]]:
    """Build, throughput (rows one by one), resume latency and the checks of torchdata.nodes."""
    import torchdata

    res.info["baseline_versions"]["torchdata"] = torchdata.__version__
    build = res.add("torchdata_build_s", "torchdata: IterableWrapper x S + MultiNodeWeightedSampler "
                    "+ Loader", "s")
    first = res.add("torchdata_first_ms", "torchdata: fresh start, time to first example", "ms")
    rows = res.add("torchdata_rows", "torchdata: rows one by one (build excluded)", "examples/s")
    rows_cpu = res.add("torchdata_rows_cpu", "torchdata: rows one by one, per CPU second", "examples/cpu-s")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        loader = torchdata_loader(dsets, probs, args.seed)
        t1, c1 = time.perf_counter(), time.process_time()
        stream = iter(loader)
        texts = [next(stream)["text"]]
        t2 = time.perf_counter()
        texts += [ex["text"] for ex in itertools.islice(stream, args.examples - 1)]
        t3 = time.perf_counter()
        rows_cpu.samples.append(len(texts) / (time.process_time() - c1))
        build.samples.append(t1 - t0)
        first.samples.append((t2 - t1) * 1e3)
        rows.samples.append(len(texts) / (t3 - t1))
    log.info("torchdata: build %.3f s, rows %s/s", build.median, fmt(rows.median))

    positions = sorted(set(args.iterable_resume_at))
    loader, states, expected = torchdata_loader(dsets, probs, args.seed), {}, {}
    stream = iter(loader)
    for consumed in range(1, positions[-1] + 2):
        example = next(stream)
        if consumed - 1 in states:
            expected[consumed - 1] = example["text"]
        if consumed in positions:
            states[consumed] = loader.state_dict()
    exact = True
    for k in positions:
        m = res.add(f"torchdata_resume_ms@{k}", f"torchdata: load_state_dict after {k:,} examples "
                    "+ first example (build excluded)", "ms")
        for _ in range(args.repeats):
            fresh = torchdata_loader(dsets, probs, args.seed)
            t0 = time.perf_counter()
            fresh.load_state_dict(states[k])
            example = next(iter(fresh))
            m.samples.append((time.perf_counter() - t0) * 1e3)
            exact &= example["text"] == expected[k]
        log.info("torchdata: resume after %d examples %.1f ms", k, m.median)
    res.info["torchdata_resume_exact"] = bool(exact)
    return check_torchdata(args, dsets, probs)


def check_torchdata(args, dsets: list, probs: np.ndarray) -> dict[str, dict[str, str]]:
    """(a), (b), (c) for torchdata.nodes; (c) with its rank/world_size arguments and the
    sources' rows split over ranks."""
    def texts(loader, n: int) -> list[str]:
        return [ex["text"] for ex in itertools.islice(iter(loader), n)]

    k, m = CHECK_RESUME_AT, CHECK_NEXT
    loader = torchdata_loader(dsets, probs, args.seed)
    stream, whole = iter(loader), []
    for _ in range(k):
        whole.append(next(stream)["text"])
    state = loader.state_dict()
    whole += [next(stream)["text"] for _ in range(m)]
    checks = {"same_seed": compare_streams(texts(torchdata_loader(dsets, probs, args.seed), CHECK_FIRST),
                                           whole[:CHECK_FIRST])}
    fresh = torchdata_loader(dsets, probs, args.seed)
    fresh.load_state_dict(state)
    checks["resume"] = compare_streams(texts(fresh, m), whole[k:])
    for world in CHECK_WORLDS:
        ranks = [texts(torchdata_loader(dsets, probs, args.seed, r, world), CHECK_STEPS * CHECK_GLOBAL // world)
                 for r in range(world)]
        checks[f"world_{world}"] = compare_steps(ranks, whole, CHECK_GLOBAL, CHECK_STEPS)
        checks[f"world_{world}"]["detail"] += (" (MultiNodeWeightedSampler(rank, world_size) seeds "
                                                "each rank's source draws apart; rows split r::W)")
    return checks


# -- baseline: mosaicml-streaming StreamingDataset (run in its own interpreter) ----------------
def streaming_python(args) -> tuple[str | None, str]:
    """(interpreter that imports `streaming`, why not when None): --streaming-python, this
    interpreter, or the venv `make bench-baselines` builds."""
    import importlib.util

    if args.streaming_python:
        if not Path(args.streaming_python).exists():
            return None, f"--streaming-python {args.streaming_python} does not exist"
        return args.streaming_python, ""
    if importlib.util.find_spec("streaming") is not None:
        return sys.executable, ""
    if STREAMING_PYTHON.exists():
        return str(STREAMING_PYTHON), ""
    return None, f"no `streaming` module here and no {STREAMING_PYTHON.relative_to(REPO)}"


def bench_streaming(args, res: Results, dsets: list, probs: np.ndarray,
                    python: str) -> tuple[dict[str, dict[str, str]] | None, str]:
    """Run the streaming worker (`--streaming-worker`) in `python` on the sources' texts;
    add its series to `res`; (its checks, "") or (None, why it failed)."""
    import json
    import subprocess

    work = Path(tempfile.mkdtemp(prefix="bench_sampler_streaming_"))
    try:
        (work / "texts.json").write_text(json.dumps([list(d["text"]) for d in dsets]), encoding="utf-8")
        spec = {"work": str(work), "probs": [float(p) for p in probs], "seed": args.seed,
                "examples": args.examples, "repeats": args.repeats,
                "resume_at": sorted(set(args.iterable_resume_at)),
                "far_position": args.resume_step * args.global_batch,
                "canonical_nodes": args.canonical_nodes, "batch_size": args.micro_batch}
        (work / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE")}
        proc = subprocess.run([python, str(Path(__file__).resolve()), "--streaming-worker",
                               str(work / "spec.json")], env=env, capture_output=True, text=True,
                              timeout=args.streaming_timeout)
        out = work / "result.json"
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return None, f"worker {python} exited {proc.returncode}: {' | '.join(tail)}"
        result = json.loads(out.read_text(encoding="utf-8"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res.info["baseline_versions"].update(result["versions"])
    res.info["streaming_epoch_size"] = result["epoch_size"]
    res.info["streaming_resume_exact"] = result["resume_exact"]
    res.info["streaming_far"] = result["far"]
    for key, series in result["series"].items():
        res.add(key, series["label"], series["unit"], note=series.get("note", "")).samples.extend(series["samples"])
    checks = result["checks"]
    streams = result["world_streams"]
    for world in CHECK_WORLDS:
        checks[f"world_{world}"] = compare_steps(streams[str(world)], streams["1"][0], CHECK_GLOBAL, CHECK_STEPS)
        checks[f"world_{world}"]["detail"] += (f" (W concurrent processes on one node: RANK, WORLD_SIZE, "
                                                f"LOCAL_RANK, LOCAL_WORLD_SIZE, gloo; num_canonical_nodes="
                                                f"{args.canonical_nodes}, batch_size={CHECK_GLOBAL}/W)")
    log.info("streaming: convert %.2f s, rows %s/s", res.median("streaming_convert_s"),
             fmt(res.median("streaming_rows")))
    return checks, ""


def streaming_worker(spec_path: str) -> int:
    """The streaming side, in an interpreter where `streaming` imports: MDS conversion,
    build, throughput, resume, checks (a) and (b), and the simulated ranks' streams for (c);
    writes result.json next to the spec."""
    import gc
    import json

    import streaming
    import torch
    from streaming import MDSWriter, Stream, StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    work = Path(spec["work"])
    if "rank" in spec:
        return streaming_rank(spec)
    texts_per_source = json.loads((work / "texts.json").read_text(encoding="utf-8"))
    clean_stale_shared_memory()
    series: dict[str, dict] = {}

    def add(key: str, label: str, unit: str) -> list[float]:
        series[key] = {"label": label, "unit": unit, "samples": []}
        return series[key]["samples"]

    t0 = time.perf_counter()
    for i, texts in enumerate(texts_per_source):
        with MDSWriter(out=str(work / "mds" / f"{i:04d}"), columns={"text": "str", "src": "int32"}) as out:
            for text in texts:
                out.write({"text": text, "src": i})
    add("streaming_convert_s", "streaming: one-off MDSWriter conversion of all sources (not in "
        "the ratios)", "s").append(time.perf_counter() - t0)

    def build(batch_size: int = spec["batch_size"]) -> StreamingDataset:
        streams = [Stream(local=str(work / "mds" / f"{i:04d}"), proportion=p) for i, p in enumerate(spec["probs"])]
        return StreamingDataset(streams=streams, shuffle=True, shuffle_seed=spec["seed"],
                                num_canonical_nodes=spec["canonical_nodes"], batch_size=batch_size)

    def take(ds: StreamingDataset, n: int) -> list[str]:
        texts = [ex["text"] for ex in itertools.islice(iter(ds), n)]
        stop_threads(ds)
        return texts

    build_s = add("streaming_build_s", "streaming: StreamingDataset over S Streams (proportion=p)", "s")
    first_ms = add("streaming_first_ms", "streaming: fresh start (epoch shuffle), time to first example", "ms")
    rows = add("streaming_rows", "streaming: rows one by one, no DataLoader (build excluded)", "examples/s")
    rows_cpu = add("streaming_rows_cpu", "streaming: rows one by one, per CPU second (all its threads)",
                   "examples/cpu-s")
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        ds = build()
        t1, c1 = time.perf_counter(), time.process_time()
        it = iter(ds)
        got = [next(it)["text"]]
        t2 = time.perf_counter()
        got += [ex["text"] for ex in itertools.islice(it, spec["examples"] - 1)]
        t3 = time.perf_counter()
        rows_cpu.append(len(got) / (time.process_time() - c1))
        stop_threads(ds)
        build_s.append(t1 - t0)
        first_ms.append((t2 - t1) * 1e3)
        rows.append(len(got) / (t3 - t1))
        epoch_size = int(ds.epoch_size)
        del it, ds
        gc.collect()

    def resume_first(state: dict) -> tuple[str, float]:
        fresh = build()
        t0 = time.perf_counter()
        fresh.load_state_dict(state)
        text = next(iter(fresh))["text"]
        elapsed = (time.perf_counter() - t0) * 1e3
        stop_threads(fresh)
        del fresh
        gc.collect()
        return text, elapsed

    positions = spec["resume_at"]
    ds = build()
    whole = take(ds, max(positions[-1], CHECK_RESUME_AT + CHECK_NEXT) + 1)
    states = {k: ds.state_dict(num_samples=k, from_beginning=True) for k in positions + [CHECK_RESUME_AT]}
    del ds
    gc.collect()
    exact = True
    for k in positions:
        samples = add(f"streaming_resume_ms@{k}", f"streaming: load_state_dict after {k:,} examples + "
                      "first example (build excluded)", "ms")
        for _ in range(spec["repeats"]):
            text, elapsed = resume_first(states[k])
            samples.append(elapsed)
            exact &= text == whole[k]
    far = spec["far_position"]
    far_state = dict(states[positions[0]], epoch=far // epoch_size, sample_in_epoch=far % epoch_size)
    samples = add("streaming_resume_ms@far", f"streaming: load_state_dict at example {far:,} (epoch "
                  f"{far // epoch_size:,}, state written directly) + first example", "ms")
    for _ in range(spec["repeats"]):
        samples.append(resume_first(far_state)[1])

    checks = {"same_seed": compare_streams(take(build(), CHECK_FIRST), whole[:CHECK_FIRST])}
    gc.collect()
    fresh = build()
    fresh.load_state_dict(states[CHECK_RESUME_AT])
    checks["resume"] = compare_streams(take(fresh, CHECK_NEXT), whole[CHECK_RESUME_AT:CHECK_RESUME_AT + CHECK_NEXT])
    del fresh
    gc.collect()

    world_streams = {"1": [take(build(batch_size=CHECK_GLOBAL), CHECK_STEPS * CHECK_GLOBAL)]}
    gc.collect()
    for world in CHECK_WORLDS:
        world_streams[str(world)] = streaming_ranks(spec_path, world)

    result = {"versions": {"mosaicml-streaming": streaming.__version__, "streaming torch": torch.__version__,
                           "streaming numpy": np.__version__, **_torchvision_version()},
              "series": series, "checks": checks, "world_streams": world_streams,
              "epoch_size": epoch_size, "resume_exact": bool(exact),
              "far": {"position": far, "epoch": far // epoch_size, "sample_in_epoch": far % epoch_size}}
    (work / "result.json").write_text(json.dumps(result), encoding="utf-8")
    return 0


def stop_threads(ds) -> None:
    """End the two prefetch threads of `ds`'s last `iter()`. An iteration broken off early
    leaves them polling every few ms (a new `iter(ds)` ends them the same way), which would
    tax every later measurement of this process. Benchmark hygiene, never inside a timing."""
    iterator = getattr(ds, "_iterator", None)
    if iterator is not None:
        iterator.exit()


def streaming_ranks(spec_path: str, world: int, timeout_s: float = 600.0) -> list[list[str]]:
    """Each rank's first CHECK_STEPS * CHECK_GLOBAL / world texts: `world` concurrent
    processes on this node (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, a gloo
    rendezvous on localhost, which StreamingDataset starts itself when WORLD_SIZE > 1)."""
    import json
    import socket
    import subprocess

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(world):
        path = Path(spec["work"]) / f"rank_{world}_{rank}.json"
        path.write_text(json.dumps({**spec, "rank": rank, "world": world}), encoding="utf-8")
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--streaming-worker",
                                       str(path)], env=env))
    for proc in procs:
        if proc.wait(timeout=timeout_s) != 0:
            raise RuntimeError(f"streaming rank process exited {proc.returncode} (world {world})")
    return [json.loads((Path(spec["work"]) / f"rank_{world}_{r}.out.json").read_text(encoding="utf-8"))
            for r in range(world)]


def streaming_rank(spec: dict) -> int:
    """One simulated rank of `streaming_ranks`: its texts to rank_<world>_<rank>.out.json."""
    import json

    from streaming import Stream, StreamingDataset

    work, world = Path(spec["work"]), spec["world"]
    streams = [Stream(local=str(work / "mds" / f"{i:04d}"), proportion=p) for i, p in enumerate(spec["probs"])]
    ds = StreamingDataset(streams=streams, shuffle=True, shuffle_seed=spec["seed"],
                          num_canonical_nodes=spec["canonical_nodes"], batch_size=CHECK_GLOBAL // world)
    texts = [ex["text"] for ex in itertools.islice(iter(ds), CHECK_STEPS * CHECK_GLOBAL // world)]
    (work / f"rank_{world}_{spec['rank']}.out.json").write_text(json.dumps(texts), encoding="utf-8")
    return 0


def _torchvision_version() -> dict[str, str]:
    """torchvision's version in the streaming interpreter (streaming imports it at import)."""
    try:
        import torchvision
    except Exception:  # noqa: BLE001 - informational only
        return {}
    return {"streaming torchvision": torchvision.__version__}


PEERS = {"torchdata": "torchdata.nodes MultiNodeWeightedSampler", "streaming": "mosaicml-streaming StreamingDataset"}


def run_peers(args, res: Results, dsets: list, probs: np.ndarray) -> None:
    """The requested peer baselines; an absent one adds one SKIP line (and how to install it)."""
    def skip(name: str, why: str, failed: bool = False) -> None:
        line = (f"SKIP {name} baseline ({PEERS[name]}): {why}. "
                + ("It is installed but failed (see above)." if failed else f"Install it with `{INSTALL_HINT}`."))
        res.info["skipped"].append(line)
        log.warning("%s", line)

    if "torchdata" in args.peers:
        why = torchdata_absent()
        if why:
            skip("torchdata", f"not importable ({why}; PYTHONPATH={TORCHDATA_SITE.relative_to(REPO)})")
        else:
            log.info("measuring torchdata.nodes MultiNodeWeightedSampler")
            res.info["checks"]["torchdata"] = bench_torchdata(args, res, dsets, probs)
    if "streaming" in args.peers:
        python, why = streaming_python(args)
        if python is None:
            skip("streaming", why)
        else:
            log.info("measuring mosaicml-streaming in %s", python)
            checks, why = bench_streaming(args, res, dsets, probs, python)
            if checks is None:
                skip("streaming", why, failed=True)
            else:
                res.info["checks"]["streaming"] = checks


# -- report ---------------------------------------------------------------------------------
def ratios_and_goals(args, res: Results) -> tuple[list[dict], list[Goal]]:
    """Ratios of medians, ours / baseline (one with a goal adds it), then the absolute goals."""
    ratios, goals = [], []

    def add_ratio(key, label, num, den, goal=None):
        value = ratio(res.median(num), res.median(den))
        ratios.append({"key": key, "label": label, "value": value, "goal": goal})
        if goal is not None:
            goals.append(Goal(key, f"{label} >= {goal:g}x", value, goal, ">=", unit="x"))

    for mode in args.modes:
        e2e = f"ours_{mode}_e2e"
        add_ratio(f"{mode}_e2e_vs_iterable", f"ours {mode} e2e / iterable interleave", e2e,
                  "iterable_rows", GOAL_VS_ITERABLE)
        add_ratio(f"{mode}_e2e_vs_map", f"ours {mode} e2e / map-style interleave (build excluded)",
                  e2e, "map_rows", GOAL_VS_MAP)
        add_ratio(f"{mode}_e2e_vs_map_incl_build", f"ours {mode} e2e / map-style interleave (build "
                  "included)", e2e, "map_rows_incl_build")
        add_ratio(f"{mode}_e2e_vs_map_batched", f"ours {mode} e2e / map-style .iter(batch_size)",
                  e2e, "map_batched")
        last = max(args.iterable_resume_at)
        add_ratio(f"{mode}_resume_speedup", f"iterable resume after {last:,} examples / ours {mode} "
                  f"resume at step {args.resume_step:,}", f"iterable_resume_ms@{last}",
                  f"ours_{mode}_resume_ms@{args.resume_step}")
        for name, label in PEERS.items():
            if f"{name}_rows" not in res.measures:
                continue
            add_ratio(f"{mode}_e2e_vs_{name}", f"ours {mode} e2e / {label}", e2e, f"{name}_rows")
            add_ratio(f"{mode}_resume_speedup_{name}", f"{label} resume after {last:,} examples / ours "
                      f"{mode} resume at step {args.resume_step:,}", f"{name}_resume_ms@{last}",
                      f"ours_{mode}_resume_ms@{args.resume_step}")
        for name, label in {"iterable": "iterable interleave", "map": "map-style interleave", **PEERS}.items():
            if f"{name}_rows_cpu" in res.measures:
                add_ratio(f"{mode}_e2e_cpu_vs_{name}", f"ours {mode} e2e / {label}, per CPU second",
                          f"{e2e}_cpu", f"{name}_rows_cpu")
        if "streaming_resume_ms@far" in res.measures:
            add_ratio(f"{mode}_resume_speedup_streaming_same_position", f"streaming resume at example "
                      f"{args.resume_step * args.global_batch:,} / ours {mode} resume at step "
                      f"{args.resume_step:,} (the same position)", "streaming_resume_ms@far",
                      f"ours_{mode}_resume_ms@{args.resume_step}")
    for mode in args.modes:
        goals.append(Goal(f"{mode}_index_rate", f"ours {mode} index generation >= 1M samples/s",
                          res.median(f"ours_{mode}_index_rate"), GOAL_INDEX_RATE, ">=", unit="samples/s"))
        goals.append(Goal(f"{mode}_resume", f"ours {mode} resume < 100 ms at every measured position "
                          "(worst median)", res.median(f"ours_{mode}_resume_worst_ms"), GOAL_RESUME_MS,
                          "<", unit="ms"))
    return ratios, goals


def render(args, res: Results, ratios: list[dict], goals: list[Goal],
           profile: list[tuple[str, float, float]] | None) -> str:
    info = res.info
    out = []
    out.append("Sampler vs datasets.interleave_datasets (scripts/bench_sampler.py)")
    out.append(f"  sources: {info['num_sources']} ({info['origin']})")
    out.append(f"  documents per source: min {info['docs_min']:,}, median {info['docs_median']:,}, "
               f"max {info['docs_max']:,} (largest/smallest {info['docs_max'] / info['docs_min']:.0f})")
    out.append(f"  tau = {args.tau}: p min {info['p_min']:.4f}, max {info['p_max']:.4f}; seed {args.seed}; "
               "interleave stopping_strategy='all_exhausted'")
    out.append(f"  ours: global batch {args.global_batch}, micro-batch {args.micro_batch}, world 1, "
               f"total_steps {args.total_steps:,}")
    out.append(f"  examples per pass: ours/map-style {args.examples:,}, iterable "
               f"{args.iterable_examples:,}; repeats {args.repeats} (medians below)")
    out.append(f"  {describe_machine(info['machine'])}")
    if info["baseline_versions"]:
        out.append("  peer baselines: " + ", ".join(f"{k} {v}" for k, v in info["baseline_versions"].items()))
    out.extend(info["skipped"])
    rows = []
    for m in res.measures.values():
        stats = m.stats
        spread = f"({fmt(stats.min, m.unit)} .. {fmt(stats.max, m.unit)})" if len(m.samples) > 1 else ""
        rows.append([m.label, fmt(stats.median, m.unit), m.unit, spread])
    rows.append([f"iterable: resume at step {args.resume_step:,}", "n/a", "ms",
                 "(no state without replaying the stream; see below)"])
    out.append("")
    out.append(table(["measurement", "median", "unit", "(min .. max over repeats)"], rows, align="<><<"))
    out.append("")
    out.append("ratios (medians):")
    for r in ratios:
        goal = f"  goal >= {r['goal']:g}x" if r["goal"] is not None else ""
        out.append(f"  ratio {r['label']}: {fmt_ratio(r['value'])}{goal}")
    out.append("")
    out.append(render_goals(goals))
    out.append("")
    out.extend(render_checks(info["checks"]))
    out.append("")
    out.append("checks and notes:")
    out.append(f"  same mixture: total-variation distance of the first {args.examples:,} sources from p: "
               + ", ".join(f"ours {mode} {info[f'ours_{mode}_tv_distance']:.4f}" for mode in args.modes)
               + (f", map-style {info['map_tv_distance']:.4f}" if info.get("map_tv_distance") is not None else ""))
    out.append(f"  iterable and map-style interleave yield the same stream (first "
               f"{info['iterable_same_stream_checked']:,} texts): {info['iterable_same_stream_as_map']}")
    out.append(f"  iterable resume reproduced the uninterrupted stream: {info['iterable_resume_exact']}")
    for name in PEERS:
        if f"{name}_resume_exact" in info:
            out.append(f"  {name} resume reproduced the uninterrupted stream (first example after each "
                       f"K of --iterable-resume-at): {info[f'{name}_resume_exact']}")
    if "torchdata_rows" in res.measures:
        out.append(f"  torchdata resume at step {args.resume_step:,}: n/a for the same reason as the iterable "
                   "interleave (its state is taken at a consumed position; IterableWrapper replays each "
                   "source's consumed rows on load_state_dict).")
    if "streaming_convert_s" in res.measures:
        far = info["streaming_far"]
        out.append(f"  streaming: one-off MDS conversion {fmt(res.median('streaming_convert_s'), 's')} s "
                   f"(excluded from the ratios); epoch of {info['streaming_epoch_size']:,} samples "
                   f"(proportions resample the sources); resume at example {far['position']:,} = epoch "
                   f"{far['epoch']:,}, sample {far['sample_in_epoch']:,} from a state written directly "
                   "(its state is O(1) like ours), not compared with an uninterrupted run.")
    length = info["interleaved_stream_length"]
    position = args.resume_step * args.global_batch
    rate = res.median("iterable_rows")
    out.append(f"  iterable resume at step {args.resume_step:,} (= example {position:,}): n/a. "
               "load_state_dict needs a state_dict taken at that position, i.e. the stream must "
               f"have been iterated there (~{position / rate / 86400:,.1f} days at {fmt(rate)}/s), "
               f"and the all_exhausted stream ends after {length:,} examples anyway.")
    out.append("  ours: the state is the step; draw counts and the batch are recomputed from it "
               "(build timed separately above).")
    for mode in args.modes:
        out.append(f"  ours {mode}: {res.median(f'ours_{mode}_e2e_sampler_share'):.0f}% of end-to-end "
                   "time is spent in RankBatchSampler (index generation), the rest in Arrow reads")
    if profile:
        out.append("")
        out.append("profile of one end-to-end pass (exact; cumulative time, share of the pass):")
        for name, share, seconds in profile:
            out.append(f"  {share * 100:5.1f}%  {seconds:7.3f} s  {name}")
    if info["num_sources"] < MIN_SOURCES:
        out.append(f"  WARNING: only {info['num_sources']} sources (< {MIN_SOURCES}).")
    if "SYNTHETIC" in info["origin"]:
        out.append("  NOTE: synthetic corpus (real data folder absent); numbers are not comparable "
                   "with runs on the Tatoeba files.")
    return "\n".join(out)


# -- main -----------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA),
                        help="folder of <lang>.txt files (falls back to a synthetic corpus if absent)")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="prepare_sources cache root")
    parser.add_argument("--num-sources", type=int, default=None,
                        help="sources to use, spread over the size ranking (default: all)")
    parser.add_argument("--max-docs-per-source", type=int, default=None,
                        help="cap documents per source (TextDir max_documents_per_source)")
    parser.add_argument("--tau", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--examples", type=int, default=50_000,
                        help="examples per pass for ours and the map-style baseline")
    parser.add_argument("--iterable-examples", type=int, default=10_000,
                        help="examples per pass for the (slow) iterable baseline")
    parser.add_argument("--iterable-resume-at", type=int, nargs="+", default=[2_000, 20_000],
                        help="positions (examples consumed) where the iterable baseline is resumed")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--global-batch", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=256)
    parser.add_argument("--total-steps", type=int, default=2_000_000)
    parser.add_argument("--resume-step", type=int, default=1_000_000)
    parser.add_argument("--index-chunk", type=int, default=1_000_000,
                        help="positions per MixtureSampler.positions() call")
    parser.add_argument("--modes", nargs="+", default=["exact", "stochastic"],
                        choices=["exact", "stochastic"])
    parser.add_argument("--profile", action="store_true",
                        help="also cProfile one end-to-end pass of ours (exact)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes for a smoke test (< 20 s); numbers are not meaningful")
    parser.add_argument("--json", default=None, help="write every number to this JSON file")
    parser.add_argument("--baselines", nargs="+", default=["all"], choices=["all", "none", *PEERS],
                        help="peer baselines besides interleave_datasets (absent ones are skipped; "
                        f"`{INSTALL_HINT}` installs them)")
    parser.add_argument("--streaming-python", default=None,
                        help="interpreter where mosaicml-streaming imports (default: this one if it "
                        f"does, else {STREAMING_PYTHON.relative_to(REPO)})")
    parser.add_argument("--streaming-timeout", type=int, default=1_800,
                        help="seconds the streaming worker may take")
    parser.add_argument("--canonical-nodes", type=int, default=6,
                        help="streaming num_canonical_nodes (a multiple of every simulated world size)")
    parser.add_argument("--streaming-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.max_docs_per_source = args.max_docs_per_source or 5_000
        args.examples = min(args.examples, 2_048)
        args.iterable_examples = min(args.iterable_examples, 300)
        args.iterable_resume_at = [100, 400]
        args.repeats = min(args.repeats, 2)
        args.index_chunk = min(args.index_chunk, 100_000)
    if args.repeats < 1 or args.examples < 1 or args.iterable_examples < 1:
        parser.error("--repeats, --examples and --iterable-examples must be >= 1")
    if args.micro_batch < 1 or args.global_batch % args.micro_batch:
        parser.error("--global-batch must be a multiple of --micro-batch")
    if min(args.iterable_resume_at) < 1:
        parser.error("--iterable-resume-at positions must be >= 1")
    if any(args.canonical_nodes % w for w in CHECK_WORLDS):
        parser.error(f"--canonical-nodes must be a multiple of {CHECK_WORLDS}")
    args.peers = [] if "none" in args.baselines else list(PEERS) if "all" in args.baselines else [
        name for name in PEERS if name in args.baselines]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.streaming_worker:
        return streaming_worker(args.streaming_worker)
    import datasets

    from pipeline.mixing import Compose, Temperature

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    started = time.perf_counter()

    corpus, names, origin = load_corpus(args)
    dsets = [corpus.dataset(n) for n in names]
    docs = {n: corpus.num_documents(n) for n in names}
    stage = Compose([Temperature(args.tau)])
    probs = stage.plan(docs).sample_probs
    sizes = np.array([docs[n] for n in names])

    res = Results()
    res.info.update(
        origin=origin, num_sources=len(names), sources=names,
        docs_min=int(sizes.min()), docs_median=int(np.median(sizes)), docs_max=int(sizes.max()),
        p_min=float(probs.min()), p_max=float(probs.max()),
        machine=machine(datasets=datasets.__version__, numpy=np.__version__),
        baseline_versions={}, skipped=[], checks={},
    )
    log.info("%d sources (%s); measuring ours", len(names), origin)
    from pipeline.data.row_reader import RowReader

    reader = RowReader(corpus, names)
    bench_ours(args, res, stage, docs, reader, probs)
    log.info("measuring the interleave_datasets baselines")
    bench_baselines(args, res, dsets, probs)
    for mode in args.modes:
        res.info["checks"][f"ours {mode}"] = check_ours(args, stage, docs, reader, mode)
    res.info["checks"].update(check_interleave(args, dsets, probs))
    run_peers(args, res, dsets, probs)
    profile = profile_ours(args, stage, docs, reader) if args.profile else None
    ratios, goals = ratios_and_goals(args, res)
    res.info["wall_s"] = time.perf_counter() - started

    print(render(args, res, ratios, goals, profile))
    print(f"\n(total wall time {res.info['wall_s']:.0f} s)")
    if args.json:
        write_json(args.json, {
            "config": {k: v for k, v in vars(args).items() if k != "json"},
            "info": res.info,
            "results": {k: m.as_json() for k, m in res.measures.items()},
            "ratios": {r["key"]: r for r in ratios},
            "goals": {g.key: g.as_json() for g in goals},
            "profile": [{"function": n, "share": s, "seconds": c} for n, s, c in profile or []],
            "checks": res.info["checks"],
        })
        log.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
