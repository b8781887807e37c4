"""AdamW with a warmup + decay learning-rate schedule, shared by the Lightning modules."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

SCHEDULES = ("cosine", "linear", "constant")


def check_schedule(schedule: Mapping[str, Any]) -> None:
    if schedule.get("name", "cosine") not in SCHEDULES:
        raise ValueError(f"model.schedule.name must be one of {SCHEDULES}, got {schedule.get('name')!r}")


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warmup, then cosine / linear decay to min_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * shape


def adamw_with_schedule(module: nn.Module, optimizer: Mapping[str, Any], schedule: Mapping[str, Any],
                        total_steps: int, default_betas: tuple[float, float]) -> dict[str, Any]:
    """Lightning's `configure_optimizers` result: AdamW with weight decay on matrices only
    (not on norms and biases), stepped per optimizer step through `lr_factor`."""
    params = [p for p in module.parameters() if p.requires_grad]
    adamw = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": optimizer.get("weight_decay", 0.0)},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
        lr=optimizer["lr"], betas=tuple(optimizer.get("betas", default_betas)),
    )
    warmup = schedule.get("warmup_steps", 0)
    name, floor = schedule.get("name", "cosine"), schedule.get("min_lr_ratio", 0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        adamw, lambda step: lr_factor(step, warmup, total_steps, name, floor))
    return {"optimizer": adamw, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
