"""Build the Trainer side of a run from the composed config: run folder, resume point,
logger, strategy, plugins, callbacks and the Trainer itself (`pipeline.train` wires these)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from pipeline.sampling.batch_geometry import BatchGeometry, geometry_for_trainer
from pipeline.training.callbacks import ValidateAtStop, build_callbacks
from pipeline.training.checkpointing import (
    AtomicCheckpointIO,
    check_resume_identity,
    checkpoints_dir_of,
    resolve_checkpoint,
)
from pipeline.training.preemption import cluster_plugins
from pipeline.training.strategies import is_sharded

log = logging.getLogger(__name__)


def build_logger(cfg: DictConfig, output_dir: Path):
    """The configured logger (`logger=wandb|csv|none`); wandb is offline unless told otherwise."""
    logger_cfg = cfg.get("logger")
    if not logger_cfg or not logger_cfg.get("_target_"):
        return False
    if logger_cfg.get("offline", False):
        os.environ.setdefault("WANDB_MODE", "offline")
    return instantiate(logger_cfg, save_dir=str(output_dir))


def log_run_start(logger, cfg: DictConfig, report) -> None:
    """Composed config as hyperparameters and the pre-flight mixture table (rank zero)."""
    # Every launched process runs the entry; another rank would open its own CSV version
    # directory (the next free number) just to write mixture.csv there.
    if not logger or rank_zero_only.rank != 0:
        return
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    rows = report.rows()
    columns = list(rows[0])
    if isinstance(logger, WandbLogger):
        logger.log_table(key="data/mixture", columns=columns, data=[[r[c] for c in columns] for r in rows])
    elif isinstance(logger, CSVLogger):
        path = Path(logger.log_dir) / "mixture.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(",".join(columns) + "\n" + "\n".join(",".join(str(r[c]) for c in columns) for r in rows) + "\n")


def check_max_steps(cfg: DictConfig) -> None:
    """Refuse `trainer.max_steps` past `run.total_steps` when a mixture stage caps epochs per
    source (UniMax): its cap holds over the planned run only, and the sampler refuses the
    steps after it. Reads only the stages' classes, so it runs before any data is prepared.

    Raises:
        ValueError: naming both keys and values.
    """
    max_steps = (cfg.get("trainer") or {}).get("max_steps")
    if max_steps is None or 0 <= int(max_steps) <= int(cfg.run.total_steps):
        return  # unset: the run stops at run.total_steps (-1, Lightning's "no limit", does not)
    capping = [stage.get("_target_") for stage in (cfg.get("mixture") or {}).get("stages") or []
               if stage.get("_target_") and getattr(get_class(stage.get("_target_")), "caps_epochs", False)]
    if capping:
        raise ValueError(f"trainer.max_steps={int(max_steps)} exceeds run.total_steps={int(cfg.run.total_steps)}, but "
                         f"mixture stage {capping[0]} caps epochs over the planned run; raise run.total_steps instead")


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


def build_trainer(cfg: DictConfig, output_dir: Path, identity: dict[str, Any],
                  geometry: BatchGeometry | None, logger) -> pl.Trainer:
    """The Trainer for `cfg.trainer` with the run's strategy, plugins, callbacks and step counts.

    `+trainer.max_steps=N` stops this invocation early (a time-limited job); the plan, the
    schedule and the mixture still span `run.total_steps`, so a resume continues the same run.
    Gradient accumulation follows the batch geometry (global batch / (world x micro-batch)).
    """
    strategy = instantiate(cfg.strategy)
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    max_steps = trainer_args.pop("max_steps", None) or cfg.run.total_steps
    trainer = pl.Trainer(
        **trainer_args,
        strategy=strategy,
        # Sharded (DeepSpeed) checkpoints are directories staged by the checkpoint callback;
        # under SLURM, Lightning's auto-requeue is off (pipeline/training/preemption.py saves instead).
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
    return trainer


def fit(trainer: pl.Trainer, model, datamodule, ckpt_path: str | None) -> None:
    """`trainer.fit`, then one validation pass if this invocation validated nothing.

    A resume from the run's final checkpoint trains no step, so Lightning never reaches the
    end of an epoch and never validates; the results.json written next would otherwise
    replace the measured losses with nulls. The pass is on the restored weights.
    """
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    validation = next((c for c in trainer.callbacks if isinstance(c, ValidateAtStop)), None)
    if validation is not None and validation.validated_at is None and trainer.global_step > 0:
        rank_zero_info(f"no validation ran in this invocation (resumed at step {trainer.global_step}); "
                       "validating the restored weights")
        trainer.validate(model, datamodule=datamodule, verbose=False)
        validation.validated_at = trainer.global_step
