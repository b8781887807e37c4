"""What a run writes: logger, checkpoints, the pre-flight mixture table, results.json."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from pipeline.atomic import atomic_write_json
from pipeline.checkpointing import AtomicModelCheckpoint
from pipeline.divergence import NonFiniteLoss
from pipeline.elastic import AlignBatchProgress, ConsumedExamplesLog, RankAgreement
from pipeline.metrics import source_key
from pipeline.preemption import Preemption

# Keys that say where a run lives, not what it computes: left out of the digest.
_PLACE_KEYS = ("output_dir", "ckpt_path", "overwrite", "resume", "cache_dir", "progress", "launch", "record_consumed")


def config_digest(cfg: DictConfig) -> str:
    """sha256 (16 hex) of the resolved config without its location keys."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in _PLACE_KEYS:
        container.pop(key, None)
    return hashlib.sha256(json.dumps(container, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_logger(cfg: DictConfig, output_dir: Path):
    """The configured logger (`logger=wandb|csv|none`); wandb is offline unless told otherwise."""
    logger_cfg = cfg.get("logger")
    if not logger_cfg or not logger_cfg.get("_target_"):
        return False
    if logger_cfg.get("offline", False):
        os.environ.setdefault("WANDB_MODE", "offline")
    return instantiate(logger_cfg, save_dir=str(output_dir))


# Transformer settings that decide parameter shapes (dropout, max_length do not).
_SHAPE_KEYS = ("d_model", "n_layers", "n_heads", "d_ff")


def run_identity(cfg: DictConfig, datamodule, tokenizer) -> dict[str, Any]:
    """What a checkpoint must agree with to be resumed: data, stream, tokenizer, model shape.

    Stored in every checkpoint and in `checkpoints/last.json`; `pipeline.train` compares it
    before loading anything. `sampler_stream` is the sampler's fingerprint (mode, seed, global
    batch size and the mixture schedule over `run.total_steps`).
    """
    model = OmegaConf.to_container(cfg.model, resolve=True)
    # The LM has `transformer`; the contrastive model `text_tower` plus `image_tower`.
    transformer = model.get("transformer") or model.get("text_tower") or {}
    extra = {"image_tower": model["image_tower"]} if "image_tower" in model else {}
    return {
        "sources": list(datamodule.sources),
        "mixture": OmegaConf.to_container(cfg.mixture, resolve=True),
        "sampler_stream": datamodule.sampler.fingerprint,
        "tokenizer": tokenizer.content_hash,
        "model_shape": {"vocab_size": tokenizer.vocab_size,
                        **{key: transformer.get(key) for key in _SHAPE_KEYS}, **extra},
    }


def checkpoints_dir_of(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def build_callbacks(cfg: DictConfig, output_dir: Path, identity: dict[str, Any] | None = None) -> list:
    callbacks: list = [AtomicModelCheckpoint(
        identity=identity,
        dirpath=str(checkpoints_dir_of(output_dir)),
        filename="step{step:06d}",
        auto_insert_metric_name=False,
        every_n_train_steps=cfg.checkpoint.every_n_steps,
        save_top_k=-1,
        save_last=True,
    )]
    if cfg.get("logger") and cfg.logger.get("_target_"):
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    callbacks.append(RankAgreement(config_digest(cfg), identity))
    callbacks.append(AlignBatchProgress())
    callbacks.append(Preemption())  # SIGUSR1/SIGTERM: checkpoint at the next step, stop (requeue under SLURM)
    callbacks.append(NonFiniteLoss())  # NaN/inf loss: every rank stops before applying the step
    callbacks.append(ValidateAtStop(cfg.run.total_steps))  # `+trainer.max_steps` stop: a final validation
    if cfg.get("record_consumed"):
        callbacks.append(ConsumedExamplesLog(output_dir / "consumed"))
    return callbacks


class ValidateAtStop(Callback):
    """A run stopped by `+trainer.max_steps` before `run.total_steps` validates at its last step
    (asking the loop to stop makes Lightning validate then), and the step of the last
    validation is kept for results.json (`validated_at_step`)."""

    def __init__(self, planned_steps: int):
        self.planned_steps = planned_steps
        self.validated_at: int | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= trainer.max_steps and trainer.max_steps < self.planned_steps:
            trainer.should_stop = True  # same on every rank: a pure function of the step

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.validated_at = trainer.global_step


def end_status(global_step: int, planned_steps: int) -> str:
    """Status of a run whose `fit` returned: completed, or stopped short of the plan (a
    `+trainer.max_steps` stop; resuming with ckpt_path=last finishes it)."""
    if global_step >= planned_steps:
        return "completed"
    return f"stopped: max_steps {global_step} of {planned_steps} planned"


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


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def results_record(cfg: DictConfig, trainer, model, datamodule, status: str, wall_time: float) -> dict[str, Any]:
    """Everything sweeps and scaling fits read about a run (same on every rank)."""
    completed = status == "completed" or status.startswith(("preempted", "stopped", "failed: non-finite loss"))
    # compute() synchronises across ranks: only when every rank got here normally (a
    # preemption or a non-finite loss stops every rank at the same step, after an all-reduced
    # decision; a max_steps stop is the same step everywhere).
    tokens = (model.seen_tokens.per_source()[0] if completed else model.seen_tokens.sums).reshape(-1)
    rows = (model.seen_rows.per_source()[0] if completed else model.seen_rows.sums).reshape(-1)
    metrics = {k: _float(v) for k, v in trainer.callback_metrics.items()}
    validation = next((c for c in trainer.callbacks if isinstance(c, ValidateAtStop)), None)
    validated_at = validation.validated_at if validation is not None else None
    sampler, split = datamodule.sampler, datamodule.split
    step = trainer.global_step
    plan = sampler.plan_at(max(0, step - 1))
    epochs = sampler.epochs(step)
    sources = {}
    for i, name in enumerate(datamodule.sources):
        key = source_key(name)
        val_loss = metrics.get(f"val/loss/{key}", math.nan)
        kind = datamodule.corpus.kind(name)
        chrf = metrics.get(f"val/chrf/{key}", math.nan)
        sources[name] = {
            "kind": kind,
            "documents_train": split.train[name],
            "documents_val": split.val[name],
            "tokens_seen": float(tokens[i]),
            "samples_seen": float(rows[i]),
            "epochs": epochs[name],
            "final_prob": plan.prob(name),
            "final_loss_weight": plan.weight(name),
            "val_loss": val_loss,
            "val_ppl": metrics.get(f"val/ppl/{key}", math.nan),
            # Why val_loss / val_ppl may be null in results.json (strict JSON has no NaN).
            "val_status": _val_status(f"val/loss/{key}" in metrics, val_loss, validated_at),
            # chrF of this source's decoded held-out rows (sacrebleu chrF, 0-100, not chrF++),
            # logged per source by the LM; null (chrf_status says why) without a score.
            "val_chrf": chrf,
            "chrf_status": ("evaluated" if math.isfinite(chrf) else
                            "not a translation source" if kind != "parallel" else "not evaluated"),
        }
    return {
        "status": status,
        "config_digest": config_digest(cfg),
        "experiment": OmegaConf.select(cfg, "experiment_name", default=None),
        "wall_time_s": wall_time,
        "global_steps": step,
        "planned_steps": cfg.run.total_steps,
        "validated_at_step": validated_at,  # step of the last validation in this process (null: none)
        # Metrics that were NaN/inf (null in results.json), e.g. train/loss of a diverged run.
        "nonfinite_metrics": sorted(k for k, v in metrics.items() if not math.isfinite(v)),
        "global_batch_size": cfg.run.global_batch_size,
        "world_size": trainer.world_size,
        "num_parameters": model.model.num_parameters(),
        "tokens_seen_total": float(tokens.sum()),
        "mixture": OmegaConf.to_container(cfg.mixture, resolve=True),
        "sampler": OmegaConf.to_container(cfg.sampler, resolve=True),
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "seed": cfg.seed,
        "metrics": metrics,
        "sources": sources,
    }


def _val_status(logged: bool, val_loss: float, validated_at: int | None) -> str:
    if not logged:
        return "not evaluated" if validated_at is None else f"no validation rows (validated at step {validated_at})"
    if not math.isfinite(val_loss):
        return "non-finite" + ("" if validated_at is None else f" (validated at step {validated_at})")
    return "evaluated" if validated_at is None else f"evaluated at step {validated_at}"


def strict_json(value: Any) -> Any:
    """`value` with every NaN/inf float replaced by None (strict JSON: null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def write_results(path: Path, record: dict[str, Any]) -> None:
    """Atomic strict-JSON write (temp file + rename): readers never see half a results file,
    and NaN/inf are null (the record's `val_status`, `chrf_status` and `nonfinite_metrics` say
    why) so every JSON parser reads it."""
    atomic_write_json(path, strict_json(record), indent=2, sort_keys=True, default=str, allow_nan=False)


def format_results_table(record: dict[str, Any]) -> str:
    """Per-source table printed at the end of a run. A chrF column (sacrebleu chrF, 0-100, not
    chrF++; `val/chrf/lang=<source>`) appears when any source is parallel or has a score;
    sources without one show '-'."""
    sources = record["sources"]
    width = max(8, *(len(n) for n in sources))
    has_chrf = any(s.get("kind") == "parallel" or not math.isnan(_float(s.get("val_chrf"))) for s in sources.values())
    header = (f"{'source':<{width}} {'docs':>7} {'samples':>8} {'tokens':>9} {'epochs':>7} "
              f"{'val loss':>9} {'val ppl':>9}" + (f" {'chrF':>6}" if has_chrf else ""))
    lines = [f"Run {record['status']}: {record['global_steps']} steps, {record['num_parameters']:,} "
             f"parameters, {record['wall_time_s']:.0f} s, config {record['config_digest']}", header]
    for name, s in sources.items():
        line = (f"{name:<{width}} {s['documents_train']:7d} {s['samples_seen']:8.0f} {s['tokens_seen']:9.0f} "
                f"{s['epochs']:7.2f} {_cell(s['val_loss'], 9, '.3f')} {_cell(s['val_ppl'], 9, '.1f')}")
        if has_chrf:
            chrf = _float(s.get("val_chrf"))
            line += f" {chrf:6.1f}" if not math.isnan(chrf) else f" {'-':>6}"
        lines.append(line)
    overall = record["metrics"]
    not_evaluated = [n for n, s in sources.items() if str(s.get("val_status", "")).startswith("not evaluated")]
    if not_evaluated:
        lines.append(f"not evaluated ('-'): {len(not_evaluated)} of {len(sources)} source(s)")
    lines.append(f"val/loss (token-weighted) {overall.get('val/loss', math.nan):.3f}; "
                 f"val/loss_macro (per-source mean) {overall.get('val/loss_macro', math.nan):.3f}")
    if record["status"] != "completed":  # last line: nobody mistakes a partial or failed run
        lines.append(f"NOT COMPLETED: {record['status']}" + (
            " (resume with ckpt_path=last to finish the planned run)" if record["status"].startswith("stopped") else ""))
    return "\n".join(lines)


def _cell(value, width: int, spec: str) -> str:
    value = _float(value)
    return f"{'-':>{width}}" if math.isnan(value) else f"{value:{width}{spec}}"
