"""Distributed strategies from config: single device, DDP, DeepSpeed ZeRO-1/2/3 (+ offload).

Lightning's `DeepSpeedStrategy` refuses non-CUDA accelerators in `setup_environment`,
validates CUDA device indices in `setup_distributed`, and hands `root_device.index` (None
on CPU) to DeepSpeed as the device rank. `DeepSpeedCPUAdapter` lifts exactly those three
restrictions when the accelerator is the CPU, so ZeRO sharding (and its checkpoints) runs
over gloo in tests and CI; on CUDA it is Lightning's strategy unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, Strategy
from torchmetrics import Metric

ZERO_STAGES = (1, 2, 3)


class DeepSpeedCPUAdapter(DeepSpeedStrategy):
    """`DeepSpeedStrategy` that also runs on CPU processes (gloo); unchanged on CUDA."""

    strategy_name = "deepspeed_cpu_adapter"

    def _on_cpu(self) -> bool:
        return not isinstance(self.accelerator, CUDAAccelerator)

    def setup_environment(self) -> None:
        if not self._on_cpu():
            return super().setup_environment()
        DDPStrategy.setup_environment(self)  # skip only the CUDA-accelerator check

    def setup_distributed(self) -> None:
        if not self._on_cpu():
            return super().setup_distributed()
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()  # gloo: the backend follows root_device.type

    def setup(self, trainer) -> None:
        # Lightning's DeepSpeed precision plugin casts the whole module with
        # `module.to(dtype=...)`, which (unlike `.float()`) also casts torchmetrics states:
        # the float64 per-source sums would become float32 and `index_add_` then refuses
        # float64 updates. Keep every metric state at the dtype it was created with.
        dtypes = _metric_state_dtypes(self.model)
        super().setup(trainer)
        _restore_metric_state_dtypes(dtypes)

    def _auto_select_batch_size(self) -> int:
        # DeepSpeed's `train_micro_batch_size_per_gpu` (x accumulation x world size = its train
        # batch size, which it asserts). Lightning looks for `batch_sampler.batch_size`, which
        # `RankBatchSampler` calls `micro_batch_size`; the datamodule's `geometry()` resolves
        # `loader.micro_batch_size: null` for this world size. Never build a dataloader to read it.
        datamodule = self.lightning_module.trainer.datamodule
        if hasattr(datamodule, "geometry"):
            return datamodule.geometry(self.world_size).micro_batch_size
        return super()._auto_select_batch_size()

    @property
    def root_device(self) -> torch.device:
        device = super().root_device
        if device.type == "cpu":
            # DeepSpeed reads the index as this process's device rank.
            return torch.device("cpu", self.local_rank)
        return device


def _metric_state_dtypes(module: torch.nn.Module | None) -> list[tuple[Metric, str, torch.dtype]]:
    if module is None:
        return []
    return [(metric, key, value.dtype) for metric in module.modules() if isinstance(metric, Metric)
            for key, value in metric._defaults.items() if isinstance(value, torch.Tensor)]


def _restore_metric_state_dtypes(dtypes: list[tuple[Metric, str, torch.dtype]]) -> None:
    for metric, key, dtype in dtypes:  # `module.to()` keeps module identity: same objects
        metric._defaults[key] = metric._defaults[key].to(dtype)
        setattr(metric, key, getattr(metric, key).to(dtype))


def deepspeed(stage: int = 2, offload_optimizer: bool = False, offload_parameters: bool = False,
              allgather_bucket_size: int = 200_000_000, reduce_bucket_size: int = 200_000_000,
              activation_checkpointing: bool = False, **kwargs: Any) -> DeepSpeedCPUAdapter:
    """A ZeRO strategy. Offloading needs stage >= 2 (optimizer) or 3 (parameters)."""
    if stage not in ZERO_STAGES:
        raise ValueError(f"strategy.stage must be one of {ZERO_STAGES}, got {stage!r}")
    if offload_parameters and stage != 3:
        raise ValueError("strategy.offload_parameters needs ZeRO stage 3")
    if offload_optimizer and stage < 2:
        raise ValueError("strategy.offload_optimizer needs ZeRO stage 2 or 3")
    return DeepSpeedCPUAdapter(
        stage=stage, offload_optimizer=offload_optimizer, offload_parameters=offload_parameters,
        allgather_bucket_size=allgather_bucket_size, reduce_bucket_size=reduce_bucket_size,
        partition_activations=activation_checkpointing, cpu_checkpointing=activation_checkpointing,
        **kwargs,
    )


def is_sharded(strategy: Any) -> bool:
    """Whether checkpoints are per-rank shards in a directory (DeepSpeed) rather than one file."""
    return isinstance(strategy, DeepSpeedStrategy)


def ddp(find_unused_parameters: bool = False, **kwargs: Any) -> DDPStrategy:
    return DDPStrategy(find_unused_parameters=find_unused_parameters, **kwargs)


def single(**kwargs: Any) -> str | Strategy:
    """Let Lightning pick the single-device strategy for the configured accelerator."""
    return "auto"
