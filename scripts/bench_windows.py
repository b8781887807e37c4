#!/usr/bin/env python
"""Benchmark: window mode against document mode on long documents (issue 13).

One run, one corpus of long documents, one tokenizer, both loader units
(``loader.unit=window`` and ``loader.unit=document``) at ``loader.max_length`` (1024):

1. **corpus**: the largest Tatoeba mono files (``--languages``, default 20), consecutive
   sentences joined into documents of ``--lines-per-doc`` lines (~2,200 tokens), each file
   repeated until it holds ``--min-mb`` MB of text; written as ``<lang>.txt`` under
   ``--cache-dir`` and prepared with ``pipeline.prepare`` (``data=tatoeba_mono``, token
   stores). Without the Tatoeba files: the embedded CLDR corpus's mono texts joined the same
   way (the output says so). Reused when present.
2. **share of tokens trained** per pass: document mode keeps ``min(len + 1, max_length)`` of a
   document's ``len + 1`` targets (checked on a sample through the real dataset and
   collator); window mode counts ``labels != -100`` of the collated batches of one full pass
   over every source's windows, and checks them against every document's ids + ``<eos>``.
3. **loader throughput**: target tokens/s and rows/s from the datamodule's real
   ``train_dataloader()`` (RankBatchSampler -> MixtureDataset -> MixtureCollator) for
   ``--workers`` (0 and 2), both modes; one iterator per case, ``--warmup-s`` untimed, then
   ``--repeats`` consecutive timed stretches of ``--seconds`` each, median. Then, for
   window mode, the per-example cost of each loader stage run alone (sampler, the dataset's
   ``__getitems__`` and inside it the split mapping, the window reads and the step target
   count, the collator) and a cProfile of the loader loop. ``--read-baseline REV`` also
   times ``TokenWindows.read`` as at git revision REV against the current one (before/after).
4. **preparation**: MB/s of text of the token stores in 1 and 2 processes
   (``prepare.workers``), runs alternating 1, 2, 1, 2 with the stores removed before each:
   ``python -m pipeline.prepare`` as in docs/BENCHMARKS.md (the figure it logs, publishing
   included), and the same `build_token_stores` called from this process, whose spawned
   workers do not re-import ``pipeline.prepare`` (Hydra, Lightning, torch) as the CLI's do.
5. **GPU arithmetic**: the tokens/s one H100-class GPU consumes at ``--mfu`` (0.4) of
   ``--peak-tflops`` (989, bf16 dense) for ``conf/model/lm_small.yaml`` and ``lm_base.yaml``,
   FLOPs per token ``6 N + 12 n_layers d_model T`` (N from instantiating the model on the meta
   device at the corpus's vocabulary, tied embedding counted once; T = max_length), and the
   loader processes one GPU needs (loader tokens/s per process over GPU tokens/s).

Goals (issue 13): window mode trains >= 99.9% of tokens on long documents; >= 2M target
tokens/s per loader process at max_length 1024 (window mode, ``num_workers=0``: the one
process does everything).

    .venv/bin/python scripts/bench_windows.py --read-baseline 208fbc3 --json .cache/bench_windows.json
    .venv/bin/python scripts/bench_windows.py --quick            # < 60 s: 4 languages, max_length 128
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import itertools
import json
import logging
import math
import os
import pstats
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import numpy as np  # noqa: E402
from bench_harness import (  # noqa: E402
    REPO,
    Goal,
    Series,
    describe_machine,
    fmt_ratio,
    machine,
    ratio,
    render_goals,
    table,
    worker_env,
    write_json,
)

DEFAULT_DATA = Path(os.environ.get("MIXPIPE_SHARED", REPO.parent / "shared")) / "data" / "tatoeba" / "mono"
DEFAULT_CACHE = REPO / ".cache" / "bench_windows"
SHARE_GOAL = 0.999          # window mode: share of a pass's tokens trained
RATE_GOAL = 2_000_000.0     # target tokens/s per loader process at max_length 1024
MODES = ("window", "document")
PREPARE_LINE = re.compile(r"pre-tokenized (\d+) source\(s\) in (\d+) process\(es\): ([\d.]+) MB of text, (\d+) "
                          r"tokens in ([\d.]+) s \(([\d.]+) MB/s, ([\d.]+)M tokens/s")
MODELS = ("lm_small", "lm_base")

log = logging.getLogger("bench_windows")


def say(message: str) -> None:
    """Progress to stderr (the tables go to stdout)."""
    print(message, file=sys.stderr, flush=True)


# -- 1. corpus ------------------------------------------------------------------------------


def tatoeba_lines(data: Path, languages: int) -> dict[str, list[str]] | None:
    """{language: non-blank lines} of the `languages` largest ``*.txt`` files, or None
    when the folder is absent."""
    if not data.is_dir():
        return None
    files = sorted(data.glob("*.txt"), key=lambda p: (-p.stat().st_size, p.name))[:languages]
    return {p.stem: [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()] for p in files}


def embedded_lines(languages: int) -> dict[str, list[str]]:
    """{language: texts} of the embedded CLDR corpus's mono sources (the largest `languages`)."""
    from data_recipes.embedded_cldr import EmbeddedCLDR

    texts = {s.name: [r["text"].replace("\n", " ") for r in s.records]
             for s in EmbeddedCLDR(include_parallel=False).sources()}
    chosen = sorted(texts, key=lambda n: (-sum(map(len, texts[n])), n))[:languages]
    return {name: texts[name] for name in chosen}


def join_documents(lines: list[str], lines_per_doc: int, min_bytes: int) -> list[str]:
    """Documents of `lines_per_doc` consecutive lines joined by blanks; `lines` repeated
    until the documents hold at least `min_bytes` bytes of UTF-8 text (one repetition at
    least). A repetition continues the previous one's last document, so repeats are cut at
    other places when the line count is not a multiple of `lines_per_doc`."""
    size = sum(len(line.encode("utf-8")) + 1 for line in lines)
    repeats = max(1, math.ceil(min_bytes / max(size, 1)))
    stream = lines * repeats
    return [" ".join(stream[i:i + lines_per_doc]) for i in range(0, len(stream), lines_per_doc)]


def build_corpus(folder: Path, data: Path, languages: int, lines_per_doc: int, min_mb: float) -> dict[str, Any]:
    """Write ``<lang>.txt`` long-document files into `folder` unless a matching build is there.

    Returns: {origin, languages, documents, megabytes, reused}."""
    spec = {"data": str(data), "languages": languages, "lines_per_doc": lines_per_doc, "min_mb": min_mb}
    marker = folder / ".bench_corpus.json"
    if marker.is_file():
        stored = json.loads(marker.read_text(encoding="utf-8"))
        if stored["spec"] == spec:
            return {**stored["info"], "reused": True}
    lines = tatoeba_lines(data, languages)
    origin = f"tatoeba mono ({data})"
    if lines is None:
        origin = f"EMBEDDED CLDR fallback ({data} is absent)"
        lines = embedded_lines(languages)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    documents, size = 0, 0
    for name, texts in lines.items():
        docs = join_documents(texts, lines_per_doc, int(min_mb * 1e6))
        text = "\n".join(docs) + "\n"
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
        documents += len(docs)
        size += len(text.encode("utf-8"))
    info = {"origin": origin, "languages": sorted(lines), "documents": documents, "megabytes": size / 1e6}
    marker.write_text(json.dumps({"spec": spec, "info": info}), encoding="utf-8")
    return {**info, "reused": False}


def base_overrides(args: argparse.Namespace) -> list[str]:
    """Hydra overrides every config of this run shares: the corpus, the cache, the tokenizer."""
    return ["data=tatoeba_mono", f"data.path={args.corpus_dir}", "data.name=bench_long_docs",
            f"cache_dir={args.mixpipe_cache}", "progress=false", "logger=none",
            f"tokenizer.vocab_size={args.vocab}", f"tokenizer.sample_sentences={args.tokenizer_docs}",
            f"tokenizer.max_sentence_length={args.max_sentence_bytes}"]


def compose(overrides: list[str]):
    from pipeline.config.compose import compose_config

    return compose_config(overrides)


def prepare_corpus(args: argparse.Namespace):
    """(corpus, tokenizer) with token stores, prepared in this process (cached)."""
    from pipeline.prepare import prepare

    return prepare(compose([*base_overrides(args), "prepare.pretokenize=true"]), progress=False)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its waited-for descendants so far."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process from /proc (NaN when unreadable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return math.nan


# -- 4. preparation -------------------------------------------------------------------------


def remove_stores(corpus_path: Path) -> None:
    """Delete every token store and leftover part of the prepared corpus (the next prepare
    encodes again)."""
    for path in itertools.chain(corpus_path.glob("token_stores-*"), corpus_path.glob("token_parts-*")):
        shutil.rmtree(path)


def parse_prepare_line(text: str, workers: int) -> dict[str, float]:
    """The figures of the ``pre-tokenized ...`` line `pipeline.data.token_store` logs: MB of
    text, tokens, seconds (encode + publish), MB/s, M tokens/s."""
    match = PREPARE_LINE.search(text)
    if match is None:
        raise RuntimeError(f"no 'pre-tokenized' timing line with {workers} worker(s) in:\n{text[-3000:]}")
    megabytes, tokens, seconds, mb_s, mtok_s = (float(match.group(i)) for i in (3, 4, 5, 6, 7))
    return {"workers": workers, "megabytes": megabytes, "tokens": tokens, "seconds": seconds, "mb_per_s": mb_s,
            "mtokens_per_s": mtok_s}


def cli_prepare_run(args: argparse.Namespace, workers: int, corpus, tokenizer) -> dict[str, float]:
    """One ``python -m pipeline.prepare prepare.pretokenize=true prepare.workers=N`` in a
    fresh process (the BENCHMARKS.md recipe); its logged figures and the process's wall s."""
    command = [sys.executable, "-m", "pipeline.prepare", *base_overrides(args), "prepare.pretokenize=true",
               f"prepare.workers={workers}", f"hydra.run.dir={args.cache_dir / 'hydra'}",
               "hydra.output_subdir=null"]
    started, cpu = time.perf_counter(), cpu_seconds()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=worker_env())
    wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    if proc.returncode != 0:
        raise RuntimeError(f"prepare with {workers} worker(s) failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return {**parse_prepare_line(proc.stdout + proc.stderr, workers), "wall_s": wall, "cpu_s": cpu}


class _Lines(logging.Handler):
    """Collects the formatted records of a logger."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def inproc_prepare_run(args: argparse.Namespace, workers: int, corpus, tokenizer) -> dict[str, float]:
    """`build_token_stores(workers=N)` called from this process, whose ``__main__`` (this
    script) imports little: spawned workers start without the CLI's import of
    `pipeline.prepare` (Hydra, Lightning, torch). Its logged figures and the call's wall s."""
    from pipeline.data.token_store import build_token_stores

    logger = logging.getLogger("pipeline.data.token_store")
    handler, level, propagate = _Lines(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the figures go to the table, not to stderr
    try:
        started, cpu = time.perf_counter(), cpu_seconds()
        build_token_stores(corpus, tokenizer.model_file, tokenizer.vocab_size, tokenizer.content_hash,
                           workers=workers, progress=False)
        wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
    return {**parse_prepare_line("\n".join(handler.lines), workers), "wall_s": wall, "cpu_s": cpu}


def time_preparation(args: argparse.Namespace, corpus, tokenizer, run, runs: int) -> dict[str, Any]:
    """Token-store builds by `run` alternating 1, 2, 1, 2, ... processes (`runs` each), the
    stores removed before each. Returns {runs, series: {workers: {name: Series}}, speedup}."""
    done = []
    for _ in range(runs):
        for workers in (1, 2):
            remove_stores(Path(corpus.path))
            done.append(run(args, workers, corpus, tokenizer))
            say(f"  workers={workers}: {done[-1]['mb_per_s']:.2f} MB/s, {done[-1]['seconds']:.1f} s logged, "
                f"{done[-1]['wall_s']:.1f} s wall, {done[-1]['cpu_s']:.1f} CPU s")
    series = {}
    for workers in (1, 2):
        mine = [r for r in done if r["workers"] == workers]
        series[workers] = {key: Series(f"prepare_{workers}_{key}", f"{workers} process(es)", unit,
                                       [r[key] for r in mine])
                           for key, unit in (("mb_per_s", "MB/s"), ("mtokens_per_s", "M tokens/s"),
                                             ("seconds", "s"), ("wall_s", "s"), ("cpu_s", "CPU s"))}
    speedup = ratio(series[2]["mb_per_s"].median, series[1]["mb_per_s"].median)
    return {"runs": done, "series": series, "speedup": speedup}


# -- datamodules ----------------------------------------------------------------------------


def datamodule(args: argparse.Namespace, corpus, tokenizer, unit: str, workers: int = 0, *extra: str):
    """The text datamodule of `unit` as `pipeline.train` builds it (one rank)."""
    from pipeline.config.data import datamodule_from_config

    cfg = compose([*base_overrides(args), f"loader.unit={unit}", f"loader.max_length={args.max_length}",
                   f"loader.micro_batch_size={args.micro_batch}", f"run.global_batch_size={args.global_batch}",
                   f"run.total_steps={args.total_steps}", f"loader.num_workers={workers}", *extra])
    return datamodule_from_config(cfg, corpus, tokenizer)


# -- 2. share of tokens trained -------------------------------------------------------------


def document_lengths(corpus, names: list[str]) -> np.ndarray:
    """Tokens of every document of `names` (from the token stores), (D,) int64."""
    return np.concatenate([np.diff(corpus.token_stores[n].offsets("text")) for n in names])


def document_share(module, corpus, max_length: int, sample: int) -> dict[str, Any]:
    """Document mode: sum of min(len + 1, max_length) over sum of (len + 1), every document of
    the selected sources; checked on `sample` documents built and collated by the real
    dataset and collator (their kept targets must equal the formula)."""
    from pipeline.data.text_rows import IGNORE_INDEX

    lengths = document_lengths(corpus, module.sources)
    targets = lengths + 1
    kept = np.minimum(targets, max_length)
    rng = np.random.default_rng(0)
    checked = 0
    for s, name in enumerate(module.sources):
        count = module.split.train[name]
        picks = np.sort(rng.choice(count, size=min(count, max(1, sample // len(module.sources))), replace=False))
        batch = module.collate(module.train_set.build([(s, int(j), 0) for j in picks]))
        rows = module.split.train_rows(name, picks)
        expected = np.minimum(np.diff(corpus.token_stores[name].offsets("text"))[rows] + 1, max_length)
        got = (batch["labels"] != IGNORE_INDEX).sum(1).numpy()
        if not np.array_equal(got, expected):
            raise AssertionError(f"document mode on {name}: collated targets {got} != min(len + 1, L) {expected}")
        checked += picks.size
    return {"documents": int(lengths.size), "tokens": int(lengths.sum()), "targets": int(targets.sum()),
            "trained": int(kept.sum()), "share": float(kept.sum() / targets.sum()),
            "mean_tokens_per_document": float(lengths.mean()), "median_tokens_per_document": float(np.median(lengths)),
            "truncated_documents": float((targets > max_length).mean()), "checked_documents": checked}


def window_share(module, corpus, chunk: int = 256) -> dict[str, Any]:
    """Window mode: one full pass over every source's windows in stream order, built and
    collated in chunks of `chunk` windows; trained = labels != -100. `exact`: the trained
    labels are every document's ids then <eos>, in order, each once."""
    from pipeline.data.text_rows import IGNORE_INDEX

    trained, targets, exact, windows = 0, 0, True, 0
    eos = module.tokenizer.eos_id
    for s, name in enumerate(module.sources):
        count = module.split.train[name]
        order = np.argsort(module.split.train_rows(name, np.arange(count)))
        labels = []
        for lo in range(0, count, chunk):
            batch = module.collate(module.train_set.build([(s, int(j), 0) for j in order[lo:lo + chunk]]))
            labels.append(batch["labels"][batch["labels"] != IGNORE_INDEX].numpy())
        labels = np.concatenate(labels)
        store = corpus.token_stores[name]
        offsets, tokens = store.offsets("text"), np.asarray(store.tokens("text"), dtype=np.int64)
        expected = np.insert(tokens, offsets[1:], eos)  # each document's ids, then its <eos>
        exact &= bool(np.array_equal(labels, expected))
        trained += int(labels.size)
        targets += int(expected.size)
        windows += count
    return {"windows": windows, "targets": targets, "trained": trained, "share": trained / targets,
            "exact": exact}


# -- 3. loader throughput -------------------------------------------------------------------


def batch_tokens(batch) -> tuple[int, int]:
    """(target tokens, rows with a target) of a collated batch."""
    from pipeline.data.text_rows import IGNORE_INDEX

    trained = batch["labels"] != IGNORE_INDEX
    return int(trained.sum()), int(trained.any(1).sum())


def loader_rates(module, warmup_s: float, seconds: float, repeats: int) -> dict[str, Series]:
    """Target tokens/s and rows/s of `module.train_dataloader()`: one iterator, `warmup_s`
    untimed (workers started, first sampler window generated), then `repeats` consecutive
    stretches of at least `seconds` each. Also CPU milliseconds per micro-batch of the main
    process and, with workers, of the workers together (from /proc)."""
    loader = iter(module.train_dataloader())
    workers = [w.pid for w in getattr(loader, "_workers", [])]
    deadline = time.perf_counter() + warmup_s
    while time.perf_counter() < deadline:
        next(loader)
    tokens_s, rows_s, main_ms, workers_ms = [], [], [], []
    for _ in range(repeats):
        tokens = rows = batches = 0
        started, main_cpu = time.perf_counter(), time.process_time()
        worker_cpu = sum(process_cpu_seconds(pid) for pid in workers)
        while (elapsed := time.perf_counter() - started) < seconds:
            got, kept = batch_tokens(next(loader))
            tokens, rows, batches = tokens + got, rows + kept, batches + 1
        tokens_s.append(tokens / elapsed)
        rows_s.append(rows / elapsed)
        main_ms.append((time.process_time() - main_cpu) / batches * 1e3)
        workers_ms.append((sum(process_cpu_seconds(pid) for pid in workers) - worker_cpu) / batches * 1e3
                          if workers else 0.0)
    del loader  # stops the workers
    return {"tokens_per_s": Series("tokens_per_s", "target tokens/s", "tokens/s", tokens_s),
            "rows_per_s": Series("rows_per_s", "rows/s", "rows/s", rows_s),
            "main_cpu_ms": Series("main_cpu_ms", "main process CPU per micro-batch", "ms", main_ms),
            "workers_cpu_ms": Series("workers_cpu_ms", "workers' CPU per micro-batch", "ms", workers_ms)}


STAGES = ("sampler", "dataset (__getitems__)", "collate")  # the loader's three stages, in order
PARTS = ("split mapping", "window read", "step target count")  # inside the dataset stage


def step_builds(micro: list) -> list[list]:
    """The item lists `MixtureDataset.__getitems__` builds for `micro` (whole steps): a
    step's first micro-batch, then the rest of its step in one call."""
    calls = []
    for m in micro:
        if getattr(m, "step_items", None) is not None:
            calls += [list(m), list(m.step_items[len(m):])]
    return [c for c in calls if c]


def window_reads(dataset, calls: list[list]) -> list[tuple[Any, np.ndarray]]:
    """(TokenWindows, window numbers) of every `TokenWindows.read` that building `calls`
    makes: one per call and source, the split already mapped."""
    reads = []
    for call in calls:
        source_ids = np.array([i[0] for i in call])
        rows = dataset.split.rows_many(dataset.sources, source_ids, np.array([i[1] for i in call]), "train")
        reads += [(dataset.windows[s], rows[source_ids == s]) for s in np.unique(source_ids).tolist()]
    return reads


def stage_costs(module, micro_batches: int, repeats: int) -> dict[str, Any]:
    """Window mode, each loader stage run alone, in microseconds per example (median of
    `repeats`): the sampler (a fresh RankBatchSampler over one generation window of
    ``WINDOW_SAMPLES`` positions, as the loader amortises it); then over the first
    `micro_batches` micro-batches (whole steps): the dataset's ``__getitems__`` as the loader
    calls it, and inside it the split mapping (``rows_many``), the window reads and the step
    target count (`num_targets`); the collator. Also the targets per example."""
    from pipeline.data.text_rows import IGNORE_INDEX, num_targets
    from pipeline.sampling.sampler import RankBatchSampler

    accumulation = module.geometry(world_size=1).accumulation
    micro_batches = max(accumulation, micro_batches // accumulation * accumulation)
    window = max(micro_batches, RankBatchSampler.WINDOW_SAMPLES // module.micro_batch_size)

    def sampler_pass():
        return list(itertools.islice(iter(RankBatchSampler(module.sampler, 0, 1, module.micro_batch_size)), window))

    micro = sampler_pass()[:micro_batches]
    dataset = module.train_set
    calls = step_builds(micro)
    reads = window_reads(dataset, calls)
    examples = [dataset.build(m) for m in micro]

    def getitems():
        dataset._built = ((), ())
        return [dataset.__getitems__(m) for m in micro]

    def split_mapping():
        return [dataset.split.rows_many(dataset.sources, np.array([i[0] for i in c]), np.array([i[1] for i in c]),
                                        "train") for c in calls]

    stages = {
        "sampler": (sampler_pass, window),
        "dataset (__getitems__)": (getitems, micro_batches),
        "split mapping": (split_mapping, micro_batches),
        "window read": (lambda: [w.read(r) for w, r in reads], micro_batches),
        # Once a step over the step's examples: every example counted once.
        "step target count": (lambda: sum(num_targets(e, dataset.max_length) for ex in examples for e in ex),
                              micro_batches),
        "collate": (lambda: [module.collate(ex) for ex in examples], micro_batches),
    }
    out: dict[str, Any] = {}
    for name, (fn, batches) in stages.items():
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - started) / (batches * module.micro_batch_size) * 1e6)
        out[name] = Series(name, name, "us/example", samples)
    targets = sum(int((module.collate(ex)["labels"] != IGNORE_INDEX).sum()) for ex in examples)
    out["targets_per_example"] = targets / (micro_batches * module.micro_batch_size)
    return out


def profile_loader(module, micro_batches: int, top: int) -> list[dict[str, Any]]:
    """cProfile of `micro_batches` batches of `module.train_dataloader()` (num_workers=0):
    the `top` functions by own time, with their share of the profiled total."""
    profiler = cProfile.Profile()
    loader = iter(module.train_dataloader())
    next(loader)
    profiler.enable()
    for _ in range(micro_batches):
        next(loader)
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    total = stats.total_tt
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [{"function": f"{Path(file).name}:{line}({name})", "calls": calls, "own_s": own, "cum_s": cum,
             "own_share": own / total if total else math.nan}
            for (file, line, name), (_, calls, own, cum, _) in rows]


# -- before / after of TokenWindows.read ----------------------------------------------------


def baseline_read(rev: str):
    """`TokenWindows.read` of ``pipeline/data/windows.py`` at git revision `rev`."""
    source = subprocess.run(["git", "show", f"{rev}:pipeline/data/windows.py"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout
    namespace: dict[str, Any] = {"__name__": f"windows_at_{rev}"}
    exec(compile(source, f"{rev}:pipeline/data/windows.py", "exec"), namespace)  # noqa: S102 (our own file)
    return namespace["TokenWindows"].read


def read_before_after(args: argparse.Namespace, corpus, tokenizer, rev: str) -> dict[str, Any]:
    """Window mode with `TokenWindows.read` as at `rev` (before) and as now (after), alternating
    before, after, ... `--repeats` times: the read alone over the first `--stage-batches`
    micro-batches (us/example) and the num_workers=0 loader (target tokens/s, one stretch of
    `--seconds` after `--warmup-s`). The same data, sampler and collator; only read differs."""
    from pipeline.data.windows import TokenWindows

    current, before = TokenWindows.read, baseline_read(rev)
    out = {label: {"read_us": [], "tokens_per_s": []} for label in ("before", "after")}
    try:
        for _ in range(args.repeats):
            for label, read in (("before", before), ("after", current)):
                TokenWindows.read = read
                module = datamodule(args, corpus, tokenizer, "window", 0)
                micro = list(itertools.islice(iter(module.train_dataloader().batch_sampler), args.stage_batches))
                reads = window_reads(module.train_set, step_builds(micro))
                started = time.perf_counter()
                for windows, rows in reads:
                    windows.read(rows)
                out[label]["read_us"].append((time.perf_counter() - started) / (len(micro) * args.micro_batch) * 1e6)
                rate = loader_rates(module, args.warmup_s, args.seconds, 1)["tokens_per_s"].median
                out[label]["tokens_per_s"].append(rate)
    finally:
        TokenWindows.read = current
    return {"rev": rev, **{label: {key: Series(f"{label}_{key}", f"{label} {key}", "", values).as_json()
                                   for key, values in d.items()} for label, d in out.items()}}


# -- 5. GPU arithmetic ----------------------------------------------------------------------


def model_flops(model: str, vocab: int, length: int) -> dict[str, Any]:
    """Parameters (instantiated on the meta device, tied embedding counted once) and
    training FLOPs per token ``6 N + 12 n_layers d_model T`` of ``conf/model/<model>.yaml``."""
    import torch

    from pipeline.models.transformer import DecoderOnlyTransformer, TransformerConfig

    spec = compose([f"model={model}"]).model.transformer
    config = TransformerConfig(vocab_size=vocab, d_model=spec.d_model, n_layers=spec.n_layers, n_heads=spec.n_heads,
                               d_ff=spec.d_ff, max_length=max(length, spec.max_length))
    with torch.device("meta"):
        net = DecoderOnlyTransformer(config)
    params = sum(p.numel() for p in net.parameters())
    attention = 12 * spec.n_layers * spec.d_model * length
    return {"model": model, "params": params, "d_model": spec.d_model, "n_layers": spec.n_layers,
            "length": length, "flops_per_token": 6 * params + attention, "attention_flops_per_token": attention}


def gpu_arithmetic(vocab: int, length: int, peak_tflops: float, mfu: float, loader_rate: float) -> list[dict]:
    """Per model: tokens/s one GPU trains at `mfu` of `peak_tflops`, and the loader headroom
    (`loader_rate` tokens/s per process over that; below 1: processes needed per GPU)."""
    out = []
    for model in MODELS:
        row = model_flops(model, vocab, length)
        gpu = peak_tflops * 1e12 * mfu / row["flops_per_token"]
        headroom = ratio(loader_rate, gpu)
        out.append({**row, "gpu_tokens_per_s": gpu, "headroom": headroom,
                    "loader_processes_per_gpu": math.ceil(1 / headroom) if headroom else None})
    return out


# -- report ---------------------------------------------------------------------------------


def print_report(results: dict[str, Any], args: argparse.Namespace) -> list[Goal]:
    """The tables, ratios and goals to stdout; returns the goals."""
    corpus, shares, rates = results["corpus"], results["share"], results["loader"]
    print(f"machine: {describe_machine(results['machine'])}")
    print(f"corpus: {corpus['origin']}: {len(corpus['languages'])} languages, {corpus['documents']:,} documents, "
          f"{corpus['megabytes']:.1f} MB, {shares['document']['tokens']:,} tokens, mean "
          f"{shares['document']['mean_tokens_per_document']:,.0f} tokens/document (median "
          f"{shares['document']['median_tokens_per_document']:,.0f}); max_length {args.max_length}, "
          f"micro-batch {args.micro_batch}, vocabulary {results['vocab_size']:,}")
    print()
    doc, win = shares["document"], shares["window"]
    print(table(["mode", "targets of a pass", "trained", "share"],
                [["document", doc["targets"], doc["trained"], f"{doc['share']:.4%}"],
                 ["window", win["targets"], win["trained"], f"{win['share']:.4%}"]], align="<>>>"))
    print(f"ratio window / document trained share: {fmt_ratio(ratio(win['share'], doc['share']), '.3f')}; "
          f"window labels are every document's ids + <eos> once, in order: {win['exact']}; "
          f"{doc['truncated_documents']:.1%} of documents truncated in document mode")
    print()
    rows = []
    for mode in MODES:
        for workers in args.workers:
            case = rates[f"{mode}_w{workers}"]
            processes = max(workers, 1)
            rows.append([mode, workers, case["tokens_per_s"]["median"], case["tokens_per_s"]["median"] / processes,
                         case["rows_per_s"]["median"], f"{case['tokens_per_s']['min']:,.0f}-"
                         f"{case['tokens_per_s']['max']:,.0f}", case["main_cpu_ms"]["median"],
                         case["workers_cpu_ms"]["median"]])
    print(table(["mode", "workers", "tokens/s", "tokens/s per process", "rows/s", "tokens/s min-max",
                 "main CPU ms/batch", "workers CPU ms/batch"], rows,
                formats={**dict.fromkeys(("tokens/s", "tokens/s per process", "rows/s"), ",.0f"),
                         "main CPU ms/batch": ".2f", "workers CPU ms/batch": ".2f"}))
    for workers in args.workers:
        value = ratio(rates[f"window_w{workers}"]["tokens_per_s"]["median"],
                      rates[f"document_w{workers}"]["tokens_per_s"]["median"])
        print(f"ratio window / document tokens/s, {workers} workers: {fmt_ratio(value)}")
    print()
    costs = results["stage_costs"]
    total = sum(costs[name]["median"] for name in STAGES)
    print(table(["window mode stage (alone)", "us/example", "us/micro-batch", "share of loader"],
                [[name, costs[name]["median"], costs[name]["median"] * args.micro_batch,
                  f"{costs[name]['median'] / total:.0%}" if name in STAGES else "(in dataset)"]
                 for name in ("sampler", "dataset (__getitems__)", *PARTS, "collate")],
                formats={"us/example": ",.1f", "us/micro-batch": ",.0f"}))
    print(f"stages alone: {total:,.1f} us/example for {costs['targets_per_example']:,.0f} targets/example = "
          f"{costs['targets_per_example'] / total * 1e6:,.0f} target tokens/s per process (no DataLoader)")
    print("profile of the window loader (num_workers=0), top functions by own time:")
    for row in results["profile"]:
        print(f"  {row['own_share']:6.1%}  {row['own_s']:.3f} s  {row['calls']:>7,} calls  {row['function']}")
    print()
    ab = results.get("read_before_after")
    if ab:
        rows = [[label, ab[label]["read_us"]["median"], ab[label]["tokens_per_s"]["median"],
                 ", ".join(f"{x:,.0f}" for x in ab[label]["tokens_per_s"]["samples"])] for label in ("before", "after")]
        print(table([f"TokenWindows.read ({ab['rev']} = before)", "read us/example", "loader tokens/s (w0)",
                     "tokens/s per repeat"], rows, formats={"read us/example": ",.1f", "loader tokens/s (w0)": ",.0f"}))
        print(f"ratio after / before: read {fmt_ratio(ratio(ab['before']['read_us']['median'], ab['after']['read_us']['median']))} "
              f"faster, loader {fmt_ratio(ratio(ab['after']['tokens_per_s']['median'], ab['before']['tokens_per_s']['median']))}")
        print()
    names = {"cli": "python -m pipeline.prepare", "inproc": "build_token_stores, this process"}
    for kind, prep in results["preparation"].items():
        print(table([f"token stores ({names[kind]})", "runs", "MB/s of text (median)", "M tokens/s",
                     "logged s (median)", "wall s (median)", "CPU s (median)", "MB/s per run"],
                    [[f"workers={w}", len(s["mb_per_s"]["samples"]), s["mb_per_s"]["median"],
                      s["mtokens_per_s"]["median"], s["seconds"]["median"], s["wall_s"]["median"], s["cpu_s"]["median"],
                      ", ".join(f"{x:.2f}" for x in s["mb_per_s"]["samples"])]
                     for w, s in prep["series"].items()],
                    formats=dict.fromkeys(("MB/s of text (median)", "M tokens/s", "logged s (median)",
                                           "wall s (median)", "CPU s (median)"), ".2f")))
        print(f"ratio 2 / 1 processes, token stores MB/s ({names[kind]}): {fmt_ratio(prep['speedup'])}")
        print()
    loader_rate = rates["window_w0"]["tokens_per_s"]["median"]
    print(table(["model", "params", "FLOPs/token", "GPU tokens/s", "loader/GPU", "loader processes/GPU"],
                [[g["model"], g["params"], g["flops_per_token"], g["gpu_tokens_per_s"],
                  fmt_ratio(g["headroom"]), g["loader_processes_per_gpu"]] for g in results["gpu"]],
                formats={"FLOPs/token": ",.3g", "GPU tokens/s": ",.0f"}))
    print(f"(one H100-class GPU at {args.mfu:.0%} MFU of {args.peak_tflops:g} TFLOP/s bf16 dense, T = {args.max_length}; "
          f"loader = window mode, num_workers=0, {loader_rate:,.0f} target tokens/s per process)")
    goals = [Goal("window_share", f"window mode trains >= {SHARE_GOAL:.1%} of tokens (long documents)",
                  win["share"], SHARE_GOAL, ">=",
                  note=f"{win['share']:.4%} of {win['targets']:,} targets; document mode {doc['share']:.2%}"),
             Goal("window_rate", f"window loader >= {RATE_GOAL / 1e6:g}M target tokens/s per process at max_length "
                  f"{args.max_length}", loader_rate, RATE_GOAL, ">=", unit="tokens/s",
                  note="num_workers=0")]
    print()
    print(render_goals(goals))
    return goals


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Tatoeba mono folder (<lang>.txt)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                        help="long-document files, prepared corpus and tokenizer (reused)")
    parser.add_argument("--languages", type=int, default=20, help="the largest files of --data")
    parser.add_argument("--lines-per-doc", type=int, default=150, help="sentences per document")
    parser.add_argument("--min-mb", type=float, default=2.0, help="MB of text per source (files repeated)")
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--tokenizer-docs", type=int, default=2000, help="documents sampled to train the tokenizer")
    parser.add_argument("--max-sentence-bytes", type=int, default=1 << 16,
                        help="sentencepiece's longest training sentence (a whole document)")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--total-steps", type=int, default=100_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=3.0, help="per timed stretch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stage-batches", type=int, default=256, help="micro-batches of the stage costs")
    parser.add_argument("--profile-batches", type=int, default=256)
    parser.add_argument("--share-sample", type=int, default=400, help="documents checked through the collator")
    parser.add_argument("--prepare-runs", type=int, default=2,
                        help="`python -m pipeline.prepare` runs of each of 1 and 2 processes (0: skip)")
    parser.add_argument("--inproc-prepare-runs", type=int, default=2,
                        help="in-process build_token_stores runs of each of 1 and 2 processes (0: skip)")
    parser.add_argument("--read-baseline", default=None, metavar="REV",
                        help="also time window mode with TokenWindows.read as at this git revision (e.g. 208fbc3)")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--mfu", type=float, default=0.4)
    parser.add_argument("--quick", action="store_true",
                        help="small corpus and max_length, short stretches: a smoke run (< 60 s)")
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    args = parser.parse_args(argv)
    if args.quick:
        args.languages, args.lines_per_doc, args.min_mb = 4, 40, 0.15
        args.vocab, args.tokenizer_docs, args.max_length = 1000, 400, 128
        args.warmup_s, args.seconds, args.repeats = 0.2, 0.5, 2
        args.stage_batches, args.profile_batches, args.share_sample = 32, 32, 40
        args.prepare_runs, args.inproc_prepare_runs = 0, 1
    if 0 not in args.workers:
        parser.error("--workers must include 0 (the per-process goal is measured there)")
    args.corpus_dir = args.cache_dir / f"long_docs-{args.languages}x{args.lines_per_doc}-{args.min_mb:g}mb"
    args.mixpipe_cache = args.cache_dir / "mixpipe"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(1)
    results: dict[str, Any] = {"machine": machine(torch=torch.__version__, numpy=np.__version__),
                               "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    say("corpus ...")
    results["corpus"] = build_corpus(args.corpus_dir, args.data, args.languages, args.lines_per_doc, args.min_mb)
    if results["corpus"]["origin"].startswith("EMBEDDED"):
        say(f"NOTE: {results['corpus']['origin']}")
    corpus, tokenizer = prepare_corpus(args)
    results["preparation"] = {}
    for kind, run, runs in (("cli", cli_prepare_run, args.prepare_runs),
                            ("inproc", inproc_prepare_run, args.inproc_prepare_runs)):
        if runs:
            say(f"preparation ({kind}): token stores, 1 and 2 processes ...")
            prep = time_preparation(args, corpus, tokenizer, run, runs)
            results["preparation"][kind] = {
                "runs": prep["runs"], "speedup": prep["speedup"],
                "series": {w: {k: s.as_json() for k, s in d.items()} for w, d in prep["series"].items()}}
    if results["preparation"]:
        corpus, tokenizer = prepare_corpus(args)  # the last run's stores
    results["vocab_size"] = tokenizer.vocab_size
    say("share of tokens trained ...")
    full = {mode: datamodule(args, corpus, tokenizer, mode, 0, "validation.documents_per_source=0")
            for mode in MODES}
    results["share"] = {"document": document_share(full["document"], corpus, args.max_length, args.share_sample),
                        "window": window_share(full["window"], corpus)}
    say("loader throughput ...")
    results["loader"] = {}
    for mode in MODES:
        for workers in args.workers:
            rates = loader_rates(datamodule(args, corpus, tokenizer, mode, workers), args.warmup_s, args.seconds,
                                 args.repeats)
            results["loader"][f"{mode}_w{workers}"] = {k: s.as_json() for k, s in rates.items()}
            say(f"  {mode}, {workers} workers: {rates['tokens_per_s'].median:,.0f} tokens/s")
    say("window stage costs and profile ...")
    module = datamodule(args, corpus, tokenizer, "window", 0)
    costs = stage_costs(module, args.stage_batches, args.repeats)
    results["stage_costs"] = {k: v.as_json() if isinstance(v, Series) else v for k, v in costs.items()}
    results["profile"] = profile_loader(datamodule(args, corpus, tokenizer, "window", 0), args.profile_batches, 10)
    if args.read_baseline:
        say(f"TokenWindows.read before ({args.read_baseline}) / after ...")
        results["read_before_after"] = read_before_after(args, corpus, tokenizer, args.read_baseline)
    loader_rate = results["loader"]["window_w0"]["tokens_per_s"]["median"]
    results["gpu"] = gpu_arithmetic(tokenizer.vocab_size, args.max_length, args.peak_tflops, args.mfu, loader_rate)
    goals = print_report(results, args)
    results["goals"] = {goal.key: goal.as_json() for goal in goals}
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
