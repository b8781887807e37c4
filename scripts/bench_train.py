#!/usr/bin/env python
"""Benchmark: training throughput of the full pipeline against a bare PyTorch loop.

One process, the demo configuration (embedded corpus, Cooldown, tiny LM), the same model
initialisation, the same batches, the same optimizer and schedule for both:

* pipeline: `pipeline.train.train(cfg)`, the entry `make demo` runs: sampler, datamodule
  (collation, token weights, source ids), Lightning (accumulation, clipping, hooks), the
  per-source metrics and the logger (wandb offline by default). Timed by a callback from
  the first micro-batch after `--warmup` optimizer steps to the end of the last step, so
  process start, data preparation, the final validation and checkpoint are outside the
  window (they are in the demo's wall time below).
* bare loop: the same `LanguageModel` built from the same config and seed, the batches the
  pipeline's datamodule produces, materialised in memory beforehand (no data loading at
  all), then forward, weighted loss / N, backward, `clip_grad_norm_`, AdamW step, LR
  schedule step, `zero_grad`. The floor: everything above it is pipeline overhead.

The two alternate `--repeats` times (pipeline, bare, pipeline, bare, ...); the table gives
medians of tokens/s (target tokens) and the median of the per-repeat ratios. Both loops must
produce the same per-step losses (printed): otherwise they would not be the same work.

`--demo` first runs `python -m pipeline.train experiment=demo` (what `make demo` runs) in a
subprocess and reports its wall time and peak RSS.

    .venv/bin/python scripts/bench_train.py --demo              # ~6 min on 2 shared cores
    .venv/bin/python scripts/bench_train.py --repeats 3 --steps 40 --json /tmp/bench_train.json
    .venv/bin/python scripts/bench_train.py --set model=lm_small --steps 15   # more compute per step
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_harness import (
    DEFAULT_CACHE,
    REPO,
    Goal,
    children_usage,
    machine,
    summarize,
    table,
    timed,
    write_json,
)

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from pipeline.data.text_rows import IGNORE_INDEX  # noqa: E402


def compose(overrides):
    from pipeline.config.compose import compose_config

    return compose_config(overrides)


class StepTimer(pl.Callback):
    """Wall time and target tokens from the first micro-batch after `warmup` steps to the end."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.started: float | None = None
        self.finished: float | None = None
        self.tokens = 0
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self.started is None and trainer.global_step == self.warmup:
            self.started = time.perf_counter()
        if self.started is not None:
            self.tokens += int((batch["labels"] != IGNORE_INDEX).sum())

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        self.losses.append(module._step_loss)  # this step's objective (one process)
        if trainer.global_step == trainer.max_steps:
            self.finished = time.perf_counter()


def run_pipeline(overrides: list[str], warmup: int, workdir: Path) -> StepTimer:
    """`pipeline.train.train` with a StepTimer added to its callbacks."""
    import pipeline.train as entry
    import pipeline.training.assemble as assemble  # build_trainer takes its callbacks from here

    timer = StepTimer(warmup)
    build = assemble.build_callbacks
    assemble.build_callbacks = lambda *args, **kwargs: [*build(*args, **kwargs), timer]
    try:
        out = Path(tempfile.mkdtemp(dir=workdir))
        entry.train(compose([*overrides, f"output_dir={out}"]))
    finally:
        assemble.build_callbacks = build
        if "wandb" in sys.modules:
            sys.modules["wandb"].finish()  # the next repeat gets a fresh run, not this one
    assert timer.started is not None and timer.finished is not None, "the timed window never closed"
    return timer


def pipeline_batches(overrides: list[str], steps: int) -> tuple[Any, list[list[dict]]]:
    """(cfg, the datamodule's micro-batches grouped per optimizer step), as train() builds them."""
    from pipeline.config.data import datamodule_from_config
    from pipeline.prepare import prepare

    cfg = compose(overrides)
    corpus, tokenizer = prepare(cfg, progress=False)
    datamodule = datamodule_from_config(cfg, corpus, tokenizer)
    accumulation = datamodule.geometry(world_size=1).accumulation  # one process, as the loader below
    loader = iter(datamodule.train_dataloader())
    return (cfg, corpus, tokenizer, datamodule), [[next(loader) for _ in range(accumulation)] for _ in range(steps)]


def run_bare(parts, batches: list[list[dict]], warmup: int) -> dict[str, Any]:
    """The same model, batches and optimizer in a plain loop; timed after `warmup` steps."""
    from pipeline.config.models import build_model

    cfg, corpus, tokenizer, datamodule = parts
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # as train() does before building the model
    model = build_model(cfg, datamodule, corpus, tokenizer)  # as train() builds it
    model.train()
    configured = model.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    clip = cfg.trainer.gradient_clip_val
    # Lightning clips the optimizer's parameters in param-group order; the same order gives
    # the same float32 norm.
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    losses, tokens, started = [], 0, None
    for step, micro_batches in enumerate(batches):
        if step == warmup:
            started = time.perf_counter()
        normalizer = micro_batches[0]["step_target_tokens"].double().clamp(min=1).float()
        step_loss = 0.0
        for batch in micro_batches:
            hidden = model._hidden(batch)
            objective = model.loss_head(hidden.flatten(0, 1), model.model.lm_head_weight, batch["labels"].flatten(),
                                        batch["token_weights"].flatten()) / normalizer
            objective.backward()
            step_loss += float(objective.detach())
            if started is not None:
                tokens += int((batch["labels"] != IGNORE_INDEX).sum())
        torch.nn.utils.clip_grad_norm_(parameters, clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
    return {"seconds": time.perf_counter() - started, "tokens": tokens, "losses": losses}


def run_demo(workdir: Path) -> dict[str, Any]:
    """`python -m pipeline.train experiment=demo` in a fresh process: wall time and peak RSS."""
    out = workdir / "demo"
    command = [sys.executable, "-m", "pipeline.train", "experiment=demo", f"output_dir={out}",
               f"hydra.run.dir={out / 'hydra'}", "trainer.enable_progress_bar=false"]
    result, wall = timed(subprocess.run, command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"the demo failed:\n{result.stderr[-4000:]}")
    # The demo is this process's first child, so the children's high-water mark is its own
    # (or that of a helper it started and waited for, whichever is larger).
    usage = children_usage()
    record = json.loads((out / "results.json").read_text())
    return {"wall_s": wall, "cpu_s": usage["cpu_s"], "peak_rss_mib": usage["peak_rss_mib"],
            "steps": record["global_steps"],
            "train_wall_s": record["wall_time_s"], "status": record["status"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="timed optimizer steps per repeat")
    parser.add_argument("--warmup", type=int, default=10, help="untimed optimizer steps first")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both loops")
    parser.add_argument("--logger", default="wandb", choices=["wandb", "csv", "none"])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra config overrides for both loops, e.g. model=lm_small loader.num_workers=1")
    parser.add_argument("--demo", action="store_true", help="also time `make demo` (wall, peak RSS)")
    parser.add_argument("--json", type=Path, help="write every number here")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench_train_"))
    results: dict[str, Any] = {"machine": machine(torch=torch.__version__), "args": vars(args)}
    if args.demo:
        print("timing the demo (python -m pipeline.train experiment=demo) ...", file=sys.stderr)
        results["demo"] = run_demo(workdir)

    torch.set_num_threads(args.threads)
    total = args.warmup + args.steps
    overrides = ["experiment=demo", f"run.total_steps={total}", f"logger={args.logger}", "progress=false",
                 "trainer.enable_progress_bar=false", "evaluation.every_n_steps=null",
                 f"checkpoint.every_n_steps={total}", f"cache_dir={DEFAULT_CACHE}", *args.set]
    parts, batches = pipeline_batches(overrides, total)
    pipeline_rates, bare_rates, ratios = [], [], []
    for repeat in range(args.repeats):
        timer = run_pipeline(overrides, args.warmup, workdir)
        bare = run_bare(parts, batches, args.warmup)
        if timer.tokens != bare["tokens"]:
            raise RuntimeError(f"not the same batches: {timer.tokens} vs {bare['tokens']} target tokens")
        difference = max(abs(a - b) for a, b in zip(timer.losses, bare["losses"], strict=True))
        pipeline_rate = timer.tokens / (timer.finished - timer.started)
        bare_rate = bare["tokens"] / bare["seconds"]
        pipeline_rates.append(pipeline_rate)
        bare_rates.append(bare_rate)
        ratios.append(bare_rate / pipeline_rate)
        print(f"repeat {repeat + 1}/{args.repeats}: pipeline {pipeline_rate:,.0f} tok/s, bare {bare_rate:,.0f} "
              f"tok/s, bare/pipeline {ratios[-1]:.3f}, max |loss difference| {difference:.2e}", file=sys.stderr)
        results.setdefault("loss_max_abs_difference", []).append(difference)

    pipeline_stats, bare_stats = summarize(pipeline_rates), summarize(bare_rates)
    overhead = summarize(ratios).median - 1
    goal = Goal("overhead", "pipeline overhead < 10%", overhead, 0.10, "<")
    results |= {"tokens_per_repeat": bare["tokens"], "pipeline_tokens_per_s": pipeline_rates,
                "bare_tokens_per_s": bare_rates, "bare_over_pipeline": ratios,
                "median_pipeline_tokens_per_s": pipeline_stats.median,
                "median_bare_tokens_per_s": bare_stats.median,
                "median_overhead": overhead, "goal_overhead": goal.target, "pass": goal.passed,
                "goals": {goal.key: goal.as_json()}}
    print()
    print(table(["loop", "median tok/s", "min", "max"],
                [[name, stats.median, stats.min, stats.max]
                 for name, stats in (("pipeline (train entry)", pipeline_stats), ("bare PyTorch loop", bare_stats))],
                formats=dict.fromkeys(("median tok/s", "min", "max"), ",.0f")))
    print(f"pipeline overhead (median of per-repeat bare/pipeline - 1): {overhead:+.1%} "
          f"(goal < 10%: {goal.verdict}); per repeat: " + ", ".join(f"{r - 1:+.1%}" for r in ratios))
    print(f"same work: max |per-step loss difference| {max(results['loss_max_abs_difference']):.2e} "
          f"over {total} steps, {bare['tokens']:,} timed target tokens per repeat")
    if "demo" in results:
        demo = results["demo"]
        print(f"demo (python -m pipeline.train experiment=demo, {demo['steps']} steps): wall {demo['wall_s']:.0f} s "
              f"(train() {demo['train_wall_s']:.0f} s), CPU {demo['cpu_s']:.0f} s, peak RSS {demo['peak_rss_mib']:.0f} MiB")
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
