"""Batch geometry: how one optimizer step's global batch splits over ranks and micro-batches.

One place for the formula every part used to write itself::

    run.global_batch_size = world size x loader.micro_batch_size x accumulation
    world size            = trainer.num_nodes x trainer.devices

`loader.micro_batch_size: null` means each rank's whole share of the global batch in one
forward pass (accumulation 1). Every inconsistent combination is a `ValueError` that names
the three numbers and their config keys, raised by `BatchGeometry.of` before any data is
prepared or any process is started (`pipeline.train` calls `geometry_from_config` first).

Imports nothing from `pipeline/`: the sampler, datamodules, the training entry, the SLURM
script generator and the benchmarks all use it.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

WORLD_KEYS = "trainer.num_nodes x trainer.devices"


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_count(value: Any) -> Any:
    """Integer-like values (numpy integers) as int; anything else unchanged, for the message."""
    if isinstance(value, bool) or value is None:
        return value
    try:
        return operator.index(value)
    except TypeError:
        return value


@dataclass(frozen=True)
class BatchGeometry:
    """A consistent split: ``global_batch_size == world_size * micro_batch_size * accumulation``.

    Build it with `BatchGeometry.of`, which validates and explains; the constructor only
    refuses numbers that do not multiply out.
    """

    global_batch_size: int
    world_size: int
    micro_batch_size: int
    accumulation: int

    def __post_init__(self) -> None:
        numbers = (self.global_batch_size, self.world_size, self.micro_batch_size, self.accumulation)
        if not all(_is_count(n) and n >= 1 for n in numbers) or (
                self.world_size * self.micro_batch_size * self.accumulation != self.global_batch_size):
            raise ValueError(f"inconsistent batch geometry {self}: need global_batch_size = world_size x "
                             "micro_batch_size x accumulation, all positive integers (use BatchGeometry.of)")

    @property
    def per_rank_batch_size(self) -> int:
        """Examples each rank trains per optimizer step (its share of the global batch)."""
        return self.micro_batch_size * self.accumulation

    @classmethod
    def of(cls, global_batch_size: int, world_size: int, micro_batch_size: int | None = None,
           world_keys: str = WORLD_KEYS) -> BatchGeometry:
        """The geometry of a global batch over `world_size` ranks in micro-batches.

        Args:
            global_batch_size: examples per optimizer step over all ranks (`run.global_batch_size`).
            world_size: training processes (`trainer.num_nodes x trainer.devices`).
            micro_batch_size: examples per forward pass per rank (`loader.micro_batch_size`);
                None: the rank's whole share, no accumulation.
            world_keys: where `world_size` came from, for the message (e.g.
                ``"trainer.num_nodes=2 x trainer.devices=8"``).

        Raises:
            ValueError: a non-positive or non-integer number, a global batch that does not
                split evenly over the ranks, or a per-rank share the micro-batch does not
                divide. The message names all three numbers and their keys.
        """
        global_batch_size, world_size = _as_count(global_batch_size), _as_count(world_size)
        micro_batch_size = _as_count(micro_batch_size)
        context = (f"[run.global_batch_size={global_batch_size!r}, world size {world_size!r} "
                   f"({world_keys}), loader.micro_batch_size={micro_batch_size!r}]")

        def fail(problem: str) -> ValueError:
            return ValueError(f"batch geometry: {problem} {context}")

        if not _is_count(global_batch_size) or global_batch_size < 1:
            raise fail(f"run.global_batch_size={global_batch_size!r} must be a positive integer")
        if not _is_count(world_size) or world_size < 1:
            raise fail(f"world size {world_size!r} ({world_keys}) must be a positive integer")
        if micro_batch_size is not None and (not _is_count(micro_batch_size) or micro_batch_size < 1):
            raise fail(f"loader.micro_batch_size={micro_batch_size!r} must be a positive integer, or null for "
                       "each rank's whole share of the global batch (no accumulation)")
        if global_batch_size % world_size:
            raise fail(f"run.global_batch_size={global_batch_size} is not divisible by world size {world_size} "
                       f"({world_keys}): every rank must get the same number of examples")
        per_rank = global_batch_size // world_size
        micro = per_rank if micro_batch_size is None else micro_batch_size
        if per_rank % micro:
            divisors = [d for d in range(1, per_rank + 1) if per_rank % d == 0]
            raise fail(f"each rank's share {per_rank} (run.global_batch_size={global_batch_size} / world size "
                       f"{world_size}) is not divisible by loader.micro_batch_size={micro}; use one of "
                       f"{divisors[:12]}{' ...' if len(divisors) > 12 else ''} or null")
        return cls(global_batch_size, world_size, micro, per_rank // micro)


def check_micro_batch_size(micro_batch_size: Any) -> int | None:
    """`loader.micro_batch_size` as an int or None; what is wrong whatever the world size
    (zero, negative, not an integer) raises here."""
    micro = _as_count(micro_batch_size)
    if micro is not None and (not _is_count(micro) or micro < 1):
        raise ValueError(f"batch geometry: loader.micro_batch_size={micro_batch_size!r} must be a positive integer, "
                         "or null for each rank's whole share of the global batch (no accumulation)")
    return micro


# -- world size from the config, before any process starts -----------------------------------

_GPU_ACCELERATORS = ("gpu", "cuda")


def _devices_count(devices: Any, accelerator: str) -> int | None:
    """Devices per node as Lightning resolves `trainer.devices`; None where only the
    started Trainer can tell (``-1``/``"auto"`` without a countable accelerator here)."""
    if isinstance(devices, bool):
        return None  # Lightning rejects it with its own message
    if isinstance(devices, str):
        text = devices.strip()
        if text.lstrip("-").isdigit():
            devices = int(text)
        elif text == "auto":
            devices = "auto"
        elif "," in text and accelerator in _GPU_ACCELERATORS:
            return len([d for d in text.split(",") if d.strip()])
        else:
            return None
    if _is_count(devices) and devices != -1:
        return devices  # 0 and negatives: the geometry check reports the world size
    if isinstance(devices, Sequence) and not isinstance(devices, str):
        return len(devices) if accelerator in _GPU_ACCELERATORS else None
    # -1 or "auto": what the machine has.
    if accelerator == "cpu":
        return 1 if devices == "auto" else None  # Lightning: "auto" is 1 CPU process; -1 is an error
    if accelerator in _GPU_ACCELERATORS:
        import torch  # NVML-based count: does not initialise CUDA in this process

        count = torch.cuda.device_count()
        return count or None  # no GPU visible here: the Trainer raises its own error
    return None  # "auto" accelerator, MPS, TPU, ...: leave it to the Trainer


def config_world_size(trainer_cfg: Mapping[str, Any]) -> tuple[int | None, str]:
    """(world size or None, ``"trainer.num_nodes=N x trainer.devices=D"``) from the trainer config.

    None only when `trainer.devices` is ``-1``/``"auto"`` (or a form Lightning parses per
    accelerator) on an accelerator whose devices cannot be counted here; then the Trainer's
    `world_size` decides (`geometry_for_trainer`).
    """
    nodes = trainer_cfg.get("num_nodes", 1)
    devices = trainer_cfg.get("devices", "auto")
    keys = f"trainer.num_nodes={nodes} x trainer.devices={devices}"
    if isinstance(nodes, str) and nodes.strip().isdigit():
        nodes = int(nodes)
    count = _devices_count(devices, str(trainer_cfg.get("accelerator", "auto")).lower())
    if count is None:
        return None, keys
    if not _is_count(nodes):
        raise ValueError(f"batch geometry: trainer.num_nodes={nodes!r} must be a positive integer")
    return nodes * count, keys


def geometry_from_config(cfg: Any) -> BatchGeometry | None:
    """The run's geometry from `run.global_batch_size`, `trainer.*` and `loader.micro_batch_size`.

    Returns None when the world size is only known once the Trainer has started (see
    `config_world_size`); every other inconsistency raises here.
    """
    world, keys = config_world_size(cfg.trainer)
    micro = cfg.loader.get("micro_batch_size")
    if world is None:
        check_micro_batch_size(micro)  # no world size needed to see this
        return None
    return BatchGeometry.of(cfg.run.global_batch_size, world, micro, keys)


def geometry_for_trainer(cfg: Any, world_size: int, early: BatchGeometry | None = None) -> BatchGeometry:
    """The geometry for the started Trainer's `world_size`; checks it against the one
    computed from the config (`early`), which a launcher could contradict."""
    _, keys = config_world_size(cfg.trainer)
    if early is not None and early.world_size != world_size:
        raise ValueError(f"batch geometry: the Trainer runs {world_size} processes but {keys} gives world size "
                         f"{early.world_size}; the launcher (torchrun, srun) and the trainer config must agree")
    return early or BatchGeometry.of(cfg.run.global_batch_size, world_size, cfg.loader.get("micro_batch_size"),
                                     f"{keys}, resolved by the Trainer to {world_size}")
