"""Typed schemas for the root config, registered in Hydra's ConfigStore.

`conf/config.yaml` lists `base_config` first in its defaults, so every composed config is
checked against these dataclasses: a misspelt key (``run.total_step=5``) or a wrong type
(``run.total_steps=ten``) fails at compose time with the key's name, before any work.
Groups whose keys depend on their `_target_` (data recipes, mixing stages, tokenizer)
are typed `Any` here; their targets validate their own arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional  # Optional, not `X | None`: OmegaConf 2.3 rejects the latter

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class RunSchema:
    total_steps: int = 1000  # planned optimizer steps: progress = step / total_steps
    global_batch_size: int = 64  # examples per optimizer step, all ranks and micro-batches


@dataclass
class SourcesSchema:
    kinds: list[str] = field(default_factory=lambda: ["mono", "parallel"])
    include: Optional[list[str]] = None  # noqa: UP045
    exclude: list[str] = field(default_factory=list)


@dataclass
class LoaderSchema:
    micro_batch_size: Optional[int] = None  # noqa: UP045  (null: each rank's share of the global batch, no accumulation)
    max_length: int = 128
    pack: bool = False
    num_workers: int = 0
    direction: str = "both"


@dataclass
class SamplerSchema:
    mode: str = "exact"
    update_steps: Optional[int] = None  # noqa: UP045


@dataclass
class MixtureSchema:
    size_unit: str = "documents"
    stages: list[Any] = MISSING


@dataclass
class ValidationSchema:
    documents_per_source: int = 32
    max_fraction: float = 0.1
    seed: int = 0


@dataclass
class CheckpointSchema:
    every_n_steps: int = 100


@dataclass
class ResumeSchema:
    allow_mismatch: bool = False  # resume although sources, mixture or tokenizer changed


@dataclass
class EvaluationSchema:
    every_n_steps: Optional[int] = None  # noqa: UP045


@dataclass
class ReportSchema:
    max_epochs: float = 10.0


@dataclass
class RootSchema:
    data: Any = MISSING
    tokenizer: Any = MISSING
    mixture: MixtureSchema = field(default_factory=MixtureSchema)
    sampler: SamplerSchema = field(default_factory=SamplerSchema)
    seed: int = 1234
    cache_dir: str = ".cache/mixpipe"
    progress: bool = True
    experiment_name: Optional[str] = None  # noqa: UP045
    output_dir: Optional[str] = None  # noqa: UP045
    ckpt_path: Optional[str] = None  # noqa: UP045
    model: Any = MISSING
    loss: Any = MISSING
    trainer: Any = MISSING
    strategy: Any = MISSING
    logger: Any = None
    record_consumed: bool = False  # log each rank's trained (step, source, index) to <run>/consumed/
    launch: Any = None  # cluster job settings (scripts/make_sbatch.py); training ignores it
    balance: Any = None  # per-example balancing of image-text sources (balance=m4; conf/balance)
    checkpoint: CheckpointSchema = field(default_factory=CheckpointSchema)
    resume: ResumeSchema = field(default_factory=ResumeSchema)
    evaluation: EvaluationSchema = field(default_factory=EvaluationSchema)
    run: RunSchema = field(default_factory=RunSchema)
    sources: SourcesSchema = field(default_factory=SourcesSchema)
    loader: LoaderSchema = field(default_factory=LoaderSchema)
    validation: ValidationSchema = field(default_factory=ValidationSchema)
    report: ReportSchema = field(default_factory=ReportSchema)


def register_schemas() -> None:
    ConfigStore.instance().store(name="base_config", node=RootSchema)


register_schemas()
