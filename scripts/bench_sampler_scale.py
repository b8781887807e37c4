"""How the mixture sampler scales with sources and ranks (issue 13, item 5).

For 10, 100, 1,000 and 10,000 synthetic long-tailed sources (log-normal sizes), with a
temperature mixture (a constant plan) and a cosine Cooldown (a plan that changes every
segment), in both sampler modes, it measures:

* build: `MixtureSampler(...)` wall seconds, and its peak extra memory (tracemalloc, which
  sees numpy's buffers; measured in a separate, untimed build);
* per-example cost of one rank's `RankBatchSampler` iteration at simulated world sizes
  W = 1, 8, 64 (the last rank; each W yields about the same number of examples, so the
  per-example figure compares like with like), and the ratio W=64 / W=1;
* resume: a fresh sampler + `load_state_dict` + the first micro-batch at step 10^6;
* restart in a fresh process (subprocess): import, open a prepared corpus with
  `PreparedCorpus.load(verify=False)` and `RowReader`, build the sampler, load a state at
  step 10^6, read the first micro-batch's rows. The 113-source corpus is prepared (TextDir
  recipe, cached); larger ones repeat its sources' files under new names (hard links), as
  preparing 10^4 sources takes ~20 minutes. Interpreter start + imports are reported
  separately from the restart work.

Goals: restart work < 100 ms at 113 sources and < 1 s at 10,000; per-rank per-example cost at
W = 64 within 1.5x of W = 1.

    python scripts/bench_sampler_scale.py                 # the full table (~10+ minutes)
    python scripts/bench_sampler_scale.py --quick --json /tmp/scale.json
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from bench_harness import (
    DEFAULT_CACHE,
    REPO,
    Goal,
    describe_machine,
    machine,
    measure,
    ratio,
    render_goals,
    summarize,
    table,
    worker_env,
    write_json,
)

log = logging.getLogger("bench_sampler_scale")

MODES = ("exact", "stochastic")
RESUME_STEP = 10**6
TOTAL_STEPS = 2 * 10**6  # the resume step is inside the planned run (1,001 plan segments)
RESTART_SAMPLE_SOURCES = 113


# -- synthetic mixtures -------------------------------------------------------------------------

def long_tail_sizes(num_sources: int, seed: int = 1234) -> dict[str, int]:
    """{name: documents}, log-normal (sigma 2.5): a few huge sources, a long tail of small ones."""
    rng = np.random.default_rng(seed)
    sizes = np.exp(rng.normal(8.0, 2.5, num_sources)) + 1
    return {f"s{i:05d}": int(n) for i, n in enumerate(sizes)}


def stage_of(schedule: str):
    from pipeline.mixing import Compose, Cooldown, Temperature

    if schedule == "temperature":
        return Compose([Temperature(3.3)])
    return Compose([Cooldown(5.0, 1.0, 0.5, shape="cosine")])


def build_sampler(sizes: dict[str, int], schedule: str, mode: str, batch: int):
    from pipeline.sampling.sampler import MixtureSampler

    return MixtureSampler(stage_of(schedule), sizes, global_batch_size=batch, total_steps=TOTAL_STEPS,
                          seed=7, mode=mode)


# -- in-process measurements --------------------------------------------------------------------

def peak_build_bytes(sizes: dict[str, int], schedule: str, mode: str, batch: int) -> int:
    """Peak bytes allocated (tracemalloc, numpy included) while building one sampler."""
    gc.collect()
    tracemalloc.start()
    try:
        sampler = build_sampler(sizes, schedule, mode, batch)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del sampler
    return int(peak)


def per_example_seconds(sampler, world: int, examples: int, start_step: int) -> tuple[float, int]:
    """(seconds per example, examples) of the last rank's iteration over enough steps for
    about `examples` of its examples, from `start_step`."""
    from pipeline.sampling.sampler import RankBatchSampler

    per_rank = sampler.global_batch_size // world
    steps = max(1, examples // per_rank)
    ranks = RankBatchSampler(sampler, rank=world - 1, world_size=world, start_step=start_step, num_steps=steps)
    started = time.perf_counter()
    count = sum(len(micro) for micro in ranks)
    return (time.perf_counter() - started) / count, count


def resume_seconds(sizes: dict[str, int], schedule: str, mode: str, batch: int, state: dict) -> float:
    """Fresh sampler + load_state_dict + the first micro-batch at the state's step."""
    from pipeline.sampling.sampler import RankBatchSampler

    started = time.perf_counter()
    sampler = build_sampler(sizes, schedule, mode, batch)
    step = sampler.load_state_dict(state)
    first = next(iter(RankBatchSampler(sampler, start_step=step, num_steps=1)))
    assert first.step_items is not None
    return time.perf_counter() - started


def bench_case(args, num_sources: int, schedule: str, mode: str) -> dict:
    """Every in-process figure of one (sources, schedule, mode) case: medians over repeats."""
    sizes = long_tail_sizes(num_sources)
    batch = args.global_batch
    build = measure(lambda: build_sampler(sizes, schedule, mode, batch), repeats=args.repeats)
    sampler = build_sampler(sizes, schedule, mode, batch)
    row = {"sources": num_sources, "schedule": schedule, "mode": mode,
           "segments": int(sampler.schedule.num_segments),
           "distinct_plans": len({id(plan) for plan in sampler.schedule.plans}),
           "build_s": build.median, "build_peak_mib": peak_build_bytes(sizes, schedule, mode, batch) / 2**20}
    start = RESUME_STEP  # iterate where a long run is, not at its cheap beginning
    for world in args.worlds:
        samples = [per_example_seconds(sampler, world, args.examples, start)[0] for _ in range(args.repeats)]
        row[f"us_per_example_w{world}"] = summarize(samples).median * 1e6
    row["w64_over_w1"] = ratio(row.get(f"us_per_example_w{max(args.worlds)}"),
                               row.get(f"us_per_example_w{min(args.worlds)}"))
    state = sampler.state_dict(RESUME_STEP)
    row["resume_s"] = summarize(resume_seconds(sizes, schedule, mode, batch, state)
                                for _ in range(args.repeats)).median
    return row


# -- the fresh-process restart --------------------------------------------------------------------

def prepare_corpus(num_sources: int, cache_dir: Path, documents: int) -> Path:
    """A prepared corpus of `num_sources` small long-tailed text sources (TextDir recipe,
    cached by content hash under `cache_dir`); returns its folder."""
    from data_recipes.text_dir import TextDir
    from pipeline.data.build_corpus import prepare_sources

    rng = np.random.default_rng(num_sources)
    folder = Path(tempfile.mkdtemp(prefix="bench_scale_text_"))
    try:
        sizes = np.maximum(1, np.exp(rng.normal(0, 1.2, num_sources)) * documents / 4).astype(int)
        for i, size in enumerate(sizes):
            lines = "".join(f"s{i:05d} {j} lorem ipsum dolor sit amet\n" for j in range(size))
            (folder / f"s{i:05d}.txt").write_text(lines, encoding="utf-8")
        corpus = prepare_sources(TextDir(folder, name=f"scale{num_sources}"), str(cache_dir), progress=False)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return Path(corpus.path)


def replicate_corpus(base: Path, num_sources: int, cache_dir: Path) -> Path:
    """A corpus of `num_sources` sources whose files are hard links to `base`'s (cycled): a
    10^4-source corpus in seconds, where preparing one takes ~0.1 s per source. Its
    manifest is `base`'s with the sources renamed ``r00000...`` (no fingerprint: it was not
    prepared from a recipe)."""
    manifest = json.loads((base / "manifest.json").read_text(encoding="utf-8"))
    names = sorted(manifest["sources"])
    digest = hashlib.sha256(f"{manifest['content_hash']}x{num_sources}".encode()).hexdigest()
    recipe = f"{manifest['recipe']}x{num_sources}"
    target = cache_dir / "prepared" / f"{recipe}-{digest[:16]}"
    if target.is_dir():
        return target
    staging = Path(tempfile.mkdtemp(prefix="replicate_", dir=cache_dir))
    sources, checksums = {}, {}
    for i in range(num_sources):
        original, name = names[i % len(names)], f"r{i:05d}"
        (staging / "sources" / name).mkdir(parents=True)
        for file in (base / "sources" / original).iterdir():
            os.link(file, staging / "sources" / name / file.name)
        sources[name] = {**manifest["sources"][original], "name": name, "language": name}
        checksums[name] = manifest["checksums"][original]
    replica = {key: value for key, value in manifest.items() if key != "fingerprint"}
    replica.update(content_hash=digest, recipe=recipe, sources=sources, checksums=checksums)
    (staging / "manifest.json").write_text(json.dumps(replica), encoding="utf-8")
    staging.rename(target)
    return target


def restart_worker(spec_path: str) -> int:
    """The child of `restart_in_fresh_process`: prints one JSON line of its clocks."""
    entered = time.perf_counter()
    from pipeline.data.corpus import PreparedCorpus
    from pipeline.data.row_reader import RowReader
    from pipeline.mixing import Compose, Temperature
    from pipeline.sampling.sampler import MixtureSampler, RankBatchSampler

    imported = time.perf_counter()
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    corpus = PreparedCorpus.load(spec["corpus"], verify=False)
    loaded = time.perf_counter()
    names = corpus.source_names
    reader = RowReader(corpus, names)
    sampler = MixtureSampler(Compose([Temperature(3.3)]), {n: corpus.num_documents(n) for n in names},
                             global_batch_size=spec["batch"], total_steps=TOTAL_STEPS, seed=7, mode=spec["mode"])
    step = sampler.load_state_dict(spec["state"])
    micro = next(iter(RankBatchSampler(sampler, start_step=step, num_steps=1, micro_batch_size=spec["micro"])))
    source_ids = np.array([s for s, _, _ in micro])
    rows = np.array([i for _, i, _ in micro])
    texts = [row["text"] for row in reader.read(source_ids, rows)]
    done = time.perf_counter()
    assert len(texts) == spec["micro"]
    print(json.dumps({"import_s": imported - entered, "restart_s": done - imported, "corpus_s": loaded - imported,
                      "rows": len(texts)}))
    return 0


def restart_in_fresh_process(corpus: Path, mode: str, batch: int, micro: int, code_root: Path = REPO) -> dict:
    """{wall_s, startup_s (interpreter + imports), restart_s (the work)} of one fresh process."""
    from pipeline.data.corpus import PreparedCorpus
    from pipeline.mixing import Compose, Temperature
    from pipeline.sampling.sampler import MixtureSampler

    loaded = PreparedCorpus.load(corpus, verify=False)
    sampler = MixtureSampler(Compose([Temperature(3.3)]), {n: loaded.num_documents(n) for n in loaded.source_names},
                             global_batch_size=batch, total_steps=TOTAL_STEPS, seed=7, mode=mode)
    spec = {"corpus": str(corpus), "mode": mode, "batch": batch, "micro": micro,
            "state": sampler.state_dict(RESUME_STEP)}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(spec, handle)
    try:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--restart-worker", handle.name],
                              cwd=code_root, env=worker_env(PYTHONPATH=str(code_root)), capture_output=True,
                              text=True, timeout=600)
        wall = time.perf_counter() - started
    finally:
        Path(handle.name).unlink(missing_ok=True)
    if done.returncode != 0:
        raise RuntimeError(f"restart worker failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    clocks = json.loads(done.stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "startup_s": wall - clocks["restart_s"], "import_s": clocks["import_s"],
            "restart_s": clocks["restart_s"], "corpus_s": clocks["corpus_s"]}


def bench_restarts(args) -> list[dict]:
    rows = []
    cache = Path(args.cache_dir)
    base = None
    for num_sources in args.restart_sources:
        started = time.perf_counter()
        if num_sources <= RESTART_SAMPLE_SOURCES or base is None:
            corpus = base = prepare_corpus(min(num_sources, RESTART_SAMPLE_SOURCES), cache, args.restart_documents)
        if num_sources > RESTART_SAMPLE_SOURCES:
            corpus = replicate_corpus(base, num_sources, cache)
        log.info("corpus of %d sources ready in %.1f s", num_sources, time.perf_counter() - started)
        for mode in MODES:
            runs = [restart_in_fresh_process(corpus, mode, args.global_batch, args.micro_batch, args.code_root)
                    for _ in range(args.repeats)]
            row = {"sources": num_sources, "mode": mode}
            for key in ("wall_s", "startup_s", "import_s", "restart_s", "corpus_s"):
                row[key] = summarize(run[key] for run in runs).median
            rows.append(row)
    return rows


# -- report ------------------------------------------------------------------------------------

def goals_of(args, cases: list[dict], restarts: list[dict]) -> list[Goal]:
    goals = []
    for row in restarts:
        target = 0.1 if row["sources"] <= RESTART_SAMPLE_SOURCES else 1.0
        goals.append(Goal(f"restart_{row['sources']}_{row['mode']}",
                          f"restart work at {row['sources']:,} sources ({row['mode']}) < {target:g} s",
                          row["restart_s"], target, "<", unit="s",
                          note=f"of which PreparedCorpus.load {row['corpus_s']:.3f} s; "
                               f"interpreter + imports {row['startup_s']:.2f} s more"))
    for row in cases:
        goals.append(Goal(f"w64_{row['sources']}_{row['schedule']}_{row['mode']}",
                          f"per-rank cost W={max(args.worlds)} / W={min(args.worlds)}, {row['sources']:,} sources, "
                          f"{row['schedule']}, {row['mode']} <= 1.5x",
                          row["w64_over_w1"], 1.5, "<=", unit="x"))
    return goals


def render(args, cases: list[dict], restarts: list[dict], goals: list[Goal], info: dict) -> str:
    worlds = [f"us/ex W={w}" for w in args.worlds]
    case_rows = [[r["sources"], r["schedule"], r["mode"], r["segments"], r["distinct_plans"], r["build_s"],
                  r["build_peak_mib"], *(r[f"us_per_example_w{w}"] for w in args.worlds),
                  None if r["w64_over_w1"] is None else f"{r['w64_over_w1']:.2f}x", r["resume_s"]]
                 for r in cases]
    lines = [f"sampler scale benchmark: {describe_machine(info)}",
             f"global batch {args.global_batch}, planned run {TOTAL_STEPS:,} steps, resume at step {RESUME_STEP:,}, "
             f"~{args.examples:,} examples per rank and W, {args.repeats} repeat(s), medians", "",
             table(["sources", "schedule", "mode", "segments", "plans", "build s", "build peak MiB", *worlds,
                    f"W={max(args.worlds)}/W={min(args.worlds)}", "resume s"], case_rows,
                   formats={"build s": ".3f", "resume s": ".3f", "build peak MiB": ".1f",
                            **{w: ".2f" for w in worlds}}), ""]
    if restarts:
        lines += ["restart in a fresh process (import, open the corpus with RowReader, build the sampler, "
                  f"load the state at step {RESUME_STEP:,}, read the first micro-batch of {args.micro_batch} rows):",
                  table(["sources", "mode", "process wall s", "interpreter + imports s", "of which imports s",
                         "restart work s", "of which PreparedCorpus.load s"],
                        [[r["sources"], r["mode"], r["wall_s"], r["startup_s"], r["import_s"], r["restart_s"],
                          r["corpus_s"]] for r in restarts],
                        formats={k: ".3f" for k in ("process wall s", "interpreter + imports s", "of which imports s",
                                                     "restart work s", "of which PreparedCorpus.load s")}), ""]
    lines.append(render_goals(goals))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 and 100 sources, fewer examples, one repeat")
    parser.add_argument("--sources", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="source counts (default 10,100,1000,10000; quick: 10,100)")
    parser.add_argument("--schedules", type=lambda s: s.split(","), default=["temperature", "cooldown"])
    parser.add_argument("--worlds", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 64])
    parser.add_argument("--global-batch", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=16, help="rows read by the restart's first micro-batch")
    parser.add_argument("--examples", type=int, default=None, help="examples per rank and W (default 65536; quick 8192)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per figure (default 3; quick 1)")
    parser.add_argument("--restart-sources", type=lambda s: [int(x) for x in s.split(",") if x], default=None,
                        help="corpus sizes for the fresh-process restart (default 113,10000; quick 113; '' skips)")
    parser.add_argument("--restart-documents", type=int, default=40, help="typical documents per restart source")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="prepare_sources cache root")
    parser.add_argument("--json", help="write every figure and goal here")
    parser.add_argument("--code-root", type=Path, default=REPO,
                        help="measure the pipeline package of another checkout (before/after comparisons)")
    parser.add_argument("--restart-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sources = args.sources or ([10, 100] if args.quick else [10, 100, 1000, 10000])
    args.examples = args.examples or (8192 if args.quick else 65536)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.restart_sources is None:
        args.restart_sources = [RESTART_SAMPLE_SOURCES] if args.quick else [RESTART_SAMPLE_SOURCES, 10000]
    for world in args.worlds:
        if args.global_batch % world:
            parser.error(f"--global-batch {args.global_batch} is not divisible by world size {world}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.restart_worker:
        return restart_worker(args.restart_worker)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.code_root != REPO and os.environ.get("PYTHONPATH") != str(args.code_root):
        # Another checkout's package: run this script again with it first on the path (the
        # functions below import `pipeline` lazily, so they get that one).
        log.info("measuring the pipeline package of %s", args.code_root)
        env = {**os.environ, "PYTHONPATH": str(args.code_root)}
        return subprocess.run([sys.executable, __file__, *(sys.argv[1:] if argv is None else argv)], env=env).returncode
    started = time.perf_counter()
    cases = []
    for num_sources in args.sources:
        for schedule in args.schedules:
            for mode in MODES:
                log.info("%d sources, %s, %s", num_sources, schedule, mode)
                cases.append(bench_case(args, num_sources, schedule, mode))
    restarts = bench_restarts(args)
    goals = goals_of(args, cases, restarts)
    info = machine(numpy=np.__version__)
    info["wall_s"] = time.perf_counter() - started
    info["code_root"] = str(args.code_root)
    print(render(args, cases, restarts, goals, info))
    print(f"\n(total wall time {info['wall_s']:.0f} s)")
    if args.json:
        write_json(args.json, {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                                          if k not in ("json", "restart_worker")},
                               "info": info, "cases": cases, "restarts": restarts,
                               "goals": {goal.key: goal.as_json() for goal in goals}})
    if any(not math.isfinite(r["build_s"]) for r in cases):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
