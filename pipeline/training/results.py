"""What a run reports at its end: its status, `results.json` (strict JSON) and the printed table."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from pipeline.evaluation.metrics import source_key
from pipeline.storage.atomic import atomic_write_json
from pipeline.training.callbacks import ValidateAtStop
from pipeline.training.divergence import Diverged
from pipeline.training.identity import config_digest
from pipeline.training.preemption import Preempted


def failure_status(error: BaseException) -> str:
    """Status of a run whose `fit` raised (its process exits 1): preempted with a complete
    checkpoint, diverged (NaN/inf loss on some rank), or failed with the error's one line."""
    if isinstance(error, Preempted):
        return f"preempted: checkpoint at step {error.step}"
    if isinstance(error, Diverged):
        return f"failed: non-finite loss at step {error.step}"
    return f"failed: {type(error).__name__}: {error}"


def end_status(global_step: int, planned_steps: int) -> str:
    """Status of a run whose `fit` returned: completed, or stopped short of the plan (a
    `+trainer.max_steps` stop; resuming with ckpt_path=last finishes it)."""
    if global_step >= planned_steps:
        return "completed"
    return f"stopped: max_steps {global_step} of {planned_steps} planned"


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
        # What documents_train/_val, samples_seen and epochs count for mono sources (loader.unit).
        "draw_unit": "windows" if getattr(datamodule, "windows", None) else "documents",
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
    if isinstance(value, np.ndarray):
        return strict_json(value.tolist())
    if isinstance(value, np.floating | np.integer):
        return strict_json(value.item())
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
