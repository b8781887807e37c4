"""Divergence: a non-finite training loss stops the run before its gradients are applied.

`NonFiniteLoss` looks at every micro-batch's loss just before its backward pass
(``on_before_backward``: the loss of every strategy, DDP and DeepSpeed included) and, at the
optimizer step (``on_before_optimizer_step``: after backward and the gradient all-reduce,
before the optimizer applies anything), all-reduces "some rank saw a NaN/inf loss" so every
rank stops at the same step. It then raises `Diverged` (a `SystemExit`, status 1, one line
on stderr naming the step and the loss), so the NaN gradients are never applied and the
last periodic checkpoint stays the newest one; `pipeline.train` writes
``status: "failed: non-finite loss at step N"`` in results.json, and sweeps count the run as
failed.

There is no option to skip bad steps: skipping would have to leave the optimizer state, the
learning-rate schedule, the sampler's stream position and every rank untouched for that step
(DeepSpeed keeps gradients in its own partitioned buffers), which this callback cannot
guarantee; a diverged run stops.
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import Callback


class Diverged(SystemExit):
    """Training stopped at a non-finite loss (exit status 1, one line)."""

    def __init__(self, message: str, step: int, loss: float | None):
        super().__init__(message)
        self.message, self.step, self.loss = message, step, loss


class NonFiniteLoss(Callback):
    """Stop every rank together at the first optimizer step whose loss is NaN or infinite."""

    def __init__(self) -> None:
        self.bad_loss: float | None = None  # this rank's first non-finite micro-batch loss of the step

    def on_train_start(self, trainer, pl_module) -> None:
        self.bad_loss = None

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        if self.bad_loss is None and not bool(torch.isfinite(loss.detach()).all()):
            self.bad_loss = float(loss.detach().float().sum())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # Every rank reaches every optimizer step, so this collective is matched on every rank.
        local = self.bad_loss is not None
        self.bad_loss, bad_loss = None, self.bad_loss
        if not trainer.strategy.reduce_boolean_decision(local, all=False):
            return
        step = trainer.global_step + 1  # the step being taken (1-based, as checkpoint names count)
        where = f"loss {bad_loss} on rank {trainer.global_rank}" if local else "on another rank"
        raise Diverged(f"non-finite loss at step {step} ({where}); the step was not applied, the run "
                       "stopped (lower model.optimizer.lr or resume from an earlier checkpoint)", step, bad_loss)

