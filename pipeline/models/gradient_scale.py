"""The factor a returned loss is multiplied by so the summed gradient is the global loss's.

Lightning divides a returned loss by the accumulation steps, data parallelism averages
gradients over ranks, and DeepSpeed's `engine.backward` divides by
`gradient_accumulation_steps` a second time (`scale_wrt_gas`) after Lightning's closure did.
A loss already normalised over the whole step (all micro-batches, all ranks) undoes all of
these. Measured on 2 CPU ranks, ZeRO-2, accumulation 2: global grad norm 1.2411 vs 2.4822
single-process without the DeepSpeed factor (tests/pipeline/test_distributed_train.py).
"""

from __future__ import annotations

from lightning.pytorch.strategies import DeepSpeedStrategy


def gradient_scale(trainer, per_micro_batch_loss: bool) -> float:
    """world x DeepSpeed's accumulation, x Lightning's accumulation when the returned loss is
    one micro-batch's share of a step-normalised objective (the LM); the contrastive kernel's
    loss is the whole global batch's already, so Lightning's 1/accumulation stays undone."""
    accumulation = trainer.accumulate_grad_batches
    scale = trainer.world_size * (accumulation if per_micro_batch_loss else 1)
    if isinstance(trainer.strategy, DeepSpeedStrategy):
        scale *= accumulation
    return float(scale)
