"""Training entry: ``python -m pipeline.train experiment=demo [overrides]``.

Compose the config, prepare data (cached), print the mixture plan, build the parts from
their configs, fit, and write ``results.json`` in the run directory. It wires parts; the
parts live in their own modules.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import lightning.pytorch as pl
from filelock import FileLock
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf

from pipeline.batch_geometry import geometry_for_trainer, geometry_from_config
from pipeline.checkpointing import AtomicCheckpointIO, check_resume_identity, resolve_checkpoint
from pipeline.config_location import CONFIG_DIR
from pipeline.config_schema import check_targets  # (importing it registers base_config)
from pipeline.datamodule import datamodule_from_config
from pipeline.divergence import Diverged
from pipeline.image_text import image_text_datamodule_from_config, is_image_text
from pipeline.mixing.report import build_report, format_report
from pipeline.preemption import Preempted, cluster_plugins
from pipeline.prepare import prepare
from pipeline.run_lock import claim_output_dir
from pipeline.run_outputs import (
    build_callbacks,
    build_logger,
    checkpoints_dir_of,
    config_digest,
    end_status,
    format_results_table,
    log_run_start,
    results_record,
    run_identity,
    write_results,
)
from pipeline.strategies import is_sharded

log = logging.getLogger(__name__)


def output_dir_of(cfg: DictConfig) -> Path:
    """The run directory: `output_dir` if set, else Hydra's, else ./outputs/<time>."""
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path("outputs") / time.strftime("%Y-%m-%d_%H-%M-%S")


def resume_checkpoint(cfg: DictConfig, output_dir: Path, identity: dict) -> tuple[str | None, bool]:
    """(checkpoint to load or None, whether the data stream restarts at its step).

    `ckpt_path=last` follows `checkpoints/last.json` (none yet: start from scratch). The
    checkpoint's identity is checked here, before any weights load or process starts.
    """
    path = resolve_checkpoint(cfg.get("ckpt_path"), checkpoints_dir_of(output_dir))
    if path is None:
        if cfg.get("ckpt_path"):
            rank_zero_info(f"ckpt_path={cfg.ckpt_path}: no complete checkpoint yet, starting from scratch")
        return None, False
    differing = check_resume_identity(path, identity, bool(cfg.resume.allow_mismatch))
    if differing:
        log.warning("resuming from %s although %s differ (resume.allow_mismatch=true)", path, ", ".join(differing))
    rank_zero_info(f"resuming from {path}")
    return str(path), bool(set(differing) & {"sources", "mixture", "sampler_stream"})


def train(cfg: DictConfig) -> dict:
    """Run one training job; returns the results record (also written to results.json)."""
    started = time.time()
    # Global batch / world size / micro-batch checked before any data is prepared or process
    # started; None only for devices=-1/"auto" on an accelerator counted by the Trainer.
    geometry = geometry_from_config(cfg)
    check_targets(cfg)  # mixture stage and data recipe keys against their _target_, before any work
    output_dir = output_dir_of(cfg)
    # One job per output_dir, and no fresh run over a previous one (overwrite=true replaces
    # it, ckpt_path resumes it): refused here, before any data is prepared.
    with claim_output_dir(output_dir, overwrite=bool(cfg.get("overwrite")), resuming=bool(cfg.get("ckpt_path"))):
        return _train(cfg, output_dir, geometry, started)


def _train(cfg: DictConfig, output_dir: Path, geometry, started: float) -> dict:
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    cache = Path(cfg.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / ".prepare.lock")):  # every launched process runs this entry
        corpus, tokenizer = prepare(cfg)
    # Image-text sources train the contrastive model (pipeline/image_text.py); text the LM.
    build = image_text_datamodule_from_config if is_image_text(cfg, corpus) else datamodule_from_config
    datamodule = build(cfg, corpus, tokenizer)
    report = build_report(datamodule.sampler, size_unit=cfg.mixture.size_unit,
                          max_epochs=cfg.report.max_epochs)
    rank_zero_info("\n" + format_report(report))
    identity = run_identity(cfg, datamodule, tokenizer)
    ckpt_path, restart_stream = resume_checkpoint(cfg, output_dir, identity)

    sources = datamodule.sources
    model = instantiate(
        cfg.model, vocab_size=tokenizer.vocab_size, sources=sources, total_steps=cfg.run.total_steps,
        loss=OmegaConf.to_container(cfg.loss, resolve=True, enum_to_str=True),
        source_kinds=[corpus.kind(n) for n in sources],
        target_languages=sorted({lang for n in sources if corpus.kind(n) == "parallel"
                                 for lang in (corpus.source_info(n)["src_lang"], corpus.source_info(n)["tgt_lang"])}),
        tokenizer_path=str(tokenizer.path), _convert_="all",
    )
    datamodule.restart_stream_on_load = restart_stream  # the datamodule owns the stream (and its restart)
    logger = build_logger(cfg, output_dir)
    strategy = instantiate(cfg.strategy)
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    # `+trainer.max_steps=N` stops this invocation early (a time-limited job); the plan, the
    # schedule and the mixture still span run.total_steps, so a resume continues the same run.
    max_steps = trainer_args.pop("max_steps", None) or cfg.run.total_steps
    trainer = pl.Trainer(
        **trainer_args,
        strategy=strategy,
        # Sharded (DeepSpeed) checkpoints are directories staged by the checkpoint callback;
        # under SLURM, Lightning's auto-requeue is off (pipeline/preemption.py saves instead).
        plugins=[*cluster_plugins(), *([] if is_sharded(strategy) else [AtomicCheckpointIO()])] or None,
        logger=logger,
        callbacks=build_callbacks(cfg, output_dir, identity),
        max_steps=max_steps,
        default_root_dir=str(output_dir),
        use_distributed_sampler=False,  # the datamodule shards the global stream by rank
    )
    trainer.accumulate_grad_batches = geometry_for_trainer(cfg, trainer.world_size, geometry).accumulation
    if cfg.evaluation.every_n_steps:  # in micro-batches for Lightning; at most one pass
        every = min(cfg.evaluation.every_n_steps, cfg.run.total_steps)
        trainer.val_check_interval = every * trainer.accumulate_grad_batches
    log_run_start(logger, cfg, report)

    status = "completed"
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        # "stopped: max_steps N of M planned" when `+trainer.max_steps` ended it early (exit 0).
        status = end_status(trainer.global_step, cfg.run.total_steps)
    except Preempted as stop:  # a signal: complete checkpoint saved, exit status 1
        status = f"preempted: checkpoint at step {stop.step}"
        raise
    except Diverged as stop:  # NaN/inf loss on some rank: every rank stops, exit status 1
        status = f"failed: non-finite loss at step {stop.step}"
        raise
    except BaseException as error:
        status = f"failed: {type(error).__name__}: {error}"
        raise
    finally:
        record = results_record(cfg, trainer, model, datamodule, status, time.time() - started)
        if trainer.is_global_zero:
            write_results(output_dir / "results.json", record)
    rank_zero_info("\n" + format_results_table(record))
    return record


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def _train_app(cfg: DictConfig) -> None:
    log.info("config digest %s", config_digest(cfg))
    train(cfg)


def main() -> None:
    """`python -m pipeline.train [overrides]` / `mixpipe-train [overrides]` (Hydra's CLI)."""
    _train_app()


if __name__ == "__main__":
    main()
