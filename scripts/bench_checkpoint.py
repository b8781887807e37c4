"""Checkpoint cost per strategy: sharded ZeRO-1/2/3 against a plain single-file checkpoint.

    .venv/bin/python scripts/bench_checkpoint.py                       # lm_tiny and lm_small, 2 ranks
    .venv/bin/python scripts/bench_checkpoint.py --models lm_tiny --repeats 2   # quick

For each model, every strategy (ddp = Lightning's plain single file written by rank 0, the
baseline; deepspeed_zero1/2/3) runs in its own 2-process torchrun job on CPU (gloo): one
optimizer step through the real pipeline (config, datamodule, LanguageModel, Trainer), then
`--repeats` timed saves (`trainer.save_checkpoint`, barrier to barrier, slowest rank) and
loads (DDP: read the file and load model and optimizer state; ZeRO: the DeepSpeed engine's
`load_checkpoint`, which reads the rank's shards and restores them). Sizes are per rank:
the files each rank writes. Then, in this process, resuming at world size 1: for ZeRO,
consolidating the shards (`pipeline.training.zero_checkpoint.consolidate_zero_checkpoint`) and loading the
result into a LanguageModel and AdamW; for DDP, loading its file the same way; and for
ZeRO-1/2, re-writing the shards for one rank (`reshard_zero12_checkpoint`), after which
DeepSpeed's own load applies (its cost is the load column). Medians of
the repeats; ratios are against DDP measured in the same invocation.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_harness import DEFAULT_CACHE, REPO, measure, ratio, table, timed, worker_env, write_json

STRATEGIES = ("ddp", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3")
BASE = ["experiment=demo", "run.total_steps=2", "run.global_batch_size=8", "loader.micro_batch_size=4",
        "logger=none", "trainer.enable_progress_bar=false", "progress=false", "validation.documents_per_source=2",
        "evaluation.every_n_steps=null"]


# ------------------------------------------------------------------------- worker side
def _compose(overrides):
    from pipeline.config.compose import compose_config

    return compose_config(overrides)


def _rank_bytes(path: Path, rank: int) -> int:
    """Bytes of the files rank `rank` wrote: its shards (and rank 0 the model states), or
    the whole file for a single-file checkpoint (written by rank 0)."""
    if path.is_file():
        return path.stat().st_size if rank == 0 else 0
    total = 0
    for file in path.rglob("*.pt"):
        name = file.name
        mine = f"zero_pp_rank_{rank}_" in name or (rank == 0 and name.startswith("mp_rank_"))
        total += file.stat().st_size if mine else 0
    return total


def worker(args) -> None:
    import lightning.pytorch as pl
    import torch
    import torch.distributed as dist
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from pipeline.config.data import datamodule_from_config
    from pipeline.prepare import prepare
    from pipeline.sampling.batch_geometry import geometry_for_trainer, geometry_from_config
    from pipeline.training.checkpointing import AtomicCheckpointIO
    from pipeline.training.strategies import is_sharded

    cfg = _compose([*BASE, f"model={args.model}", f"strategy={args.strategy}", "trainer.devices=2",
                    f"cache_dir={args.cache}"])
    corpus, tokenizer = prepare(cfg, progress=False)
    datamodule = datamodule_from_config(cfg, corpus, tokenizer)
    model = instantiate(cfg.model, vocab_size=tokenizer.vocab_size, sources=datamodule.sources,
                        total_steps=cfg.run.total_steps, loss=OmegaConf.to_container(cfg.loss, resolve=True),
                        _convert_="all")
    num_parameters = model.model.num_parameters()  # before ZeRO-3 partitions the parameters
    strategy = instantiate(cfg.strategy)
    trainer = pl.Trainer(**OmegaConf.to_container(cfg.trainer, resolve=True), strategy=strategy, logger=False,
                         enable_checkpointing=False, max_steps=1, use_distributed_sampler=False,
                         plugins=None if is_sharded(strategy) else [AtomicCheckpointIO()])
    trainer.accumulate_grad_batches = geometry_for_trainer(cfg, trainer.world_size, geometry_from_config(cfg)).accumulation
    trainer.fit(model, datamodule=datamodule)
    rank = trainer.global_rank
    out = Path(args.out)

    def save(path: Path) -> None:
        trainer.save_checkpoint(path)
        dist.barrier()  # barrier to barrier: the slowest rank's time

    def load(path: Path) -> None:
        if is_sharded(strategy):
            strategy.deepspeed_engine.load_checkpoint(str(path), load_optimizer_states=True,
                                                      load_lr_scheduler_states=False)
        else:
            state = torch.load(path, map_location="cpu", weights_only=False)
            model.load_state_dict(state["state_dict"])
            trainer.optimizers[0].load_state_dict(state["optimizer_states"][0])
        dist.barrier()

    saves, loads = [], []
    for repeat in range(args.repeats):
        path = out / f"{args.strategy}-{repeat}.ckpt"
        dist.barrier()
        saves.append(timed(save, path)[1])
        dist.barrier()
        loads.append(timed(load, path)[1])
    sizes = [None] * trainer.world_size
    dist.all_gather_object(sizes, _rank_bytes(out / f"{args.strategy}-0.ckpt", rank))
    if rank == 0:
        record = {"model": args.model, "strategy": args.strategy, "world_size": trainer.world_size,
                  "num_parameters": num_parameters, "save_s": saves, "load_s": loads,
                  "bytes_per_rank": sizes, "checkpoint": str(out / f"{args.strategy}-0.ckpt")}
        Path(args.result).write_text(json.dumps(record))


# ------------------------------------------------------------------------- driver side
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def resume_at_world_one(checkpoint: Path, sharded: bool, repeats: int) -> list[float]:
    """Seconds to get a world-size-1 model and optimizer from the checkpoint (median input)."""
    import deepspeed.utils.zero_to_fp32  # noqa: F401  (imported before timing)
    import torch

    from pipeline.models.lm import LanguageModel
    from pipeline.training.zero_checkpoint import consolidate_zero_checkpoint

    def resume() -> None:
        state = (consolidate_zero_checkpoint(checkpoint) if sharded
                 else torch.load(checkpoint, map_location="cpu", weights_only=False))
        model = LanguageModel(**state["hyper_parameters"])
        model.load_state_dict(state["state_dict"])
        optimizer = model.configure_optimizers()["optimizer"]
        optimizer.load_state_dict(state["optimizer_states"][0])

    return list(measure(resume, repeats=repeats).samples)


def run_case(model: str, strategy: str, cache: str, out: Path, repeats: int) -> dict:
    result = out / f"{model}-{strategy}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
               "127.0.0.1", "--master-port", str(_free_port()), str(Path(__file__).resolve()), "--worker",
               "--model", model, "--strategy", strategy, "--cache", cache, "--out", str(out / model),
               "--repeats", str(repeats), "--result", str(result)]
    done = subprocess.run(command, cwd=REPO, env=worker_env(OMP_NUM_THREADS="1", WANDB_MODE="offline"),
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{model} {strategy} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    record = json.loads(result.read_text())
    record["resume_w1_s"] = resume_at_world_one(Path(record["checkpoint"]), strategy != "ddp", repeats)
    record["reshard_w1_s"] = (reshard_to_world_one(Path(record["checkpoint"]), out, repeats)
                              if strategy in ("deepspeed_zero1", "deepspeed_zero2") else None)
    return record


def reshard_to_world_one(checkpoint: Path, out: Path, repeats: int) -> list[float]:
    """Seconds to re-write ZeRO-1/2 shards for one rank (what DeepSpeed then loads natively)."""
    from pipeline.training.zero_checkpoint import reshard_zero12_checkpoint

    targets = iter(out / f"resharded-{repeat}.ckpt" for repeat in range(repeats))
    return list(measure(lambda: reshard_zero12_checkpoint(checkpoint, next(targets), 1), repeats=repeats).samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="lm_tiny,lm_small")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache", default=str(DEFAULT_CACHE))
    parser.add_argument("--json", type=Path, help="also write all records here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0

    from pipeline.prepare import prepare

    prepare(_compose([*BASE, f"cache_dir={args.cache}"]), progress=False)  # once, before the jobs
    records = []
    with tempfile.TemporaryDirectory(prefix="bench_checkpoint-") as tmp:
        for model in args.models.split(","):
            for strategy in args.strategies.split(","):
                print(f"{model} {strategy} ...", file=sys.stderr, flush=True)
                records.append(run_case(model, strategy, args.cache, Path(tmp), args.repeats))
    if args.json:
        write_json(args.json, records)

    median = statistics.median
    print(f"\n2 ranks (CPU, gloo), medians of {args.repeats}; ratios against ddp (plain single file) of the same model")
    rows = []
    for model in args.models.split(","):
        records_of_model = [r for r in records if r["model"] == model]
        base = next((r for r in records_of_model if r["strategy"] == "ddp"), None)
        for r in records_of_model:
            save, load, resume = median(r["save_s"]), median(r["load_s"]), median(r["resume_w1_s"])
            mib = [b / 2**20 for b in r["bytes_per_rank"]]

            def x_ddp(value, key, base=base):
                return ratio(value, median(base[key])) if base else None
            rows.append([model, r["num_parameters"], r["strategy"], save, x_ddp(save, "save_s"), load,
                         x_ddp(load, "load_s"), mib[0], mib[1], sum(mib), resume, x_ddp(resume, "resume_w1_s"),
                         median(r["reshard_w1_s"]) if r.get("reshard_w1_s") else None])
    print(table(["model", "params", "strategy", "save s", "x ddp", "load s", "x ddp", "MiB rank0", "MiB rank1",
                 "MiB total", "resume@W=1 s", "x ddp", "reshard W=1 s"], rows,
                formats={"save s": ".3f", "x ddp": ".2f", "load s": ".3f", "MiB rank0": ".2f", "MiB rank1": ".2f",
                         "MiB total": ".2f", "resume@W=1 s": ".3f", "reshard W=1 s": ".3f"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
