"""Typed schemas for the root config and its groups, registered in Hydra's ConfigStore.

`conf/config.yaml` lists `base_config` first in its defaults, so every composed config is
checked against these dataclasses: a misspelt key (``run.total_step=5``,
``loss.imp=fused``) or a wrong type (``run.total_steps=ten``) fails at compose time with the
key's name, before any work. Enum-typed keys (``sampler.mode``, ``loss.impl``,
``tokenizer.model_type``, ``balance.mode|solver|on_violation``) reject other values with
the key and the allowed values.

How each group is typed:

* one shape for every option (loss, sampler, tokenizer, loader, trainer, launch):
  a field of `RootSchema` typed as the group's dataclass;
* shapes that depend on the option (model, strategy, logger), and balance (``balance=m4``;
  bare ``+balance.method=m4`` keys stay untyped and the balancing code checks them): each
  option's yaml lists its schema first in its own defaults (``defaults: [lm_schema, _self_]``),
  stored in that group;
* keys that depend on a `_target_` inside a list (mixture stages) or on a data recipe:
  :func:`check_targets` compares them with the target's signature (call it before
  preparing data).

One copy of each value: the yaml files hold the values (with their comments); the schemas
hold types and allowed values, and `MISSING` where a yaml sets the key. A default lives in a
schema only for keys no shipped yaml sets (``balance.batch_size``), and for
``launch.signal_seconds`` (120), which the launch code reads whether or not a yaml sets it.

Enum values compose as `StrEnum` members: they compare, hash, format and serialise as
their plain strings (``cfg.loss.impl == "fused"``).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum  # members compare, hash, print and serialise as their string values
from typing import Any, Optional  # Optional, not `X | None`: OmegaConf 2.3 rejects the latter

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from pipeline.config.resolvers import register_resolvers


# -- enum-like values ------------------------------------------------------------------------
class SamplerMode(StrEnum):
    exact = "exact"
    stochastic = "stochastic"


class LoaderUnit(StrEnum):
    document = "document"
    window = "window"


class LossImpl(StrEnum):
    torch = "torch"
    fused = "fused"


class TokenizerModelType(StrEnum):
    unigram = "unigram"
    bpe = "bpe"
    char = "char"
    word = "word"


class BalanceMode(StrEnum):
    subsample = "subsample"
    weights = "weights"


class BalanceSolver(StrEnum):
    streaming = "streaming"
    exact = "exact"


# OmegaConf matches a value against member names, and `raise` is a keyword: functional API.
OnViolation = StrEnum("OnViolation", [(v, v) for v in ("warn", "raise", "ignore")], module=__name__)


# -- root blocks -----------------------------------------------------------------------------
@dataclass
class RunSchema:
    total_steps: int = MISSING  # planned optimizer steps: progress = step / total_steps
    global_batch_size: int = MISSING  # examples per optimizer step, all ranks and micro-batches


@dataclass
class SourcesSchema:
    kinds: list[str] = MISSING
    include: Optional[list[str]] = MISSING  # noqa: UP045
    exclude: list[str] = MISSING


@dataclass
class LoaderSchema:
    micro_batch_size: Optional[int] = None  # noqa: UP045  (null: each rank's share of the global batch, no accumulation)
    unit: LoaderUnit = LoaderUnit.document
    max_length: int = MISSING
    pack: bool = MISSING
    num_workers: int = MISSING
    direction: str = MISSING


@dataclass
class SamplerSchema:
    mode: SamplerMode = MISSING
    update_steps: Optional[int] = MISSING  # noqa: UP045


@dataclass
class MixtureSchema:
    size_unit: str = MISSING
    stages: list[Any] = MISSING  # each stage's keys: check_targets()


@dataclass
class ValidationSchema:
    documents_per_source: int = MISSING
    max_fraction: float = MISSING
    seed: int = MISSING


@dataclass
class CheckpointSchema:
    every_n_steps: int = MISSING


@dataclass
class ResumeSchema:
    allow_mismatch: bool = MISSING  # resume although sources, mixture or tokenizer changed


@dataclass
class EvaluationSchema:
    every_n_steps: Optional[int] = MISSING  # noqa: UP045


@dataclass
class ReportSchema:
    max_epochs: float = MISSING


# -- single-shape groups ---------------------------------------------------------------------
@dataclass
class LossSchema:  # conf/loss/*.yaml -> pipeline.models.losses.LossConfig
    impl: LossImpl = MISSING
    label_smoothing: float = MISSING
    z_loss: float = MISSING


@dataclass
class TokenizerSchema:  # conf/tokenizer/*.yaml -> pipeline.data.tokenizer.TokenizerConfig
    _target_: str = MISSING
    vocab_size: int = MISSING
    character_coverage: float = MISSING
    model_type: TokenizerModelType = MISSING
    byte_fallback: bool = MISSING
    temperature: float = MISSING
    sample_sentences: int = MISSING
    seed: int = MISSING
    num_threads: int = MISSING
    max_sentence_length: int = MISSING


@dataclass
class PrepareSchema:  # conf/config.yaml `prepare:` -> pipeline.prepare.prepare_options
    pretokenize: bool = MISSING  # tokenise each source once into a token store (pipeline/data/token_store.py)
    workers: int = MISSING  # processes that encode the token stores on this machine
    shard_documents: int = MISSING  # documents per work unit (same value for every task and the publish step)
    shard: Optional[int] = None  # noqa: UP045  (one task of a job array: encode units shard::num_shards)
    num_shards: Optional[int] = None  # noqa: UP045


@dataclass
class TrainerSchema:
    """Lightning Trainer arguments (conf/trainer/*.yaml). Other Trainer arguments are added
    with `+trainer.<name>=...`, e.g. `+trainer.max_steps=N` to stop this invocation early
    (pipeline/train.py pops it; the plan still spans run.total_steps)."""

    accelerator: str = MISSING
    devices: Any = MISSING  # int, list of ids or "auto"
    num_nodes: int = MISSING
    precision: str = MISSING
    gradient_clip_val: Optional[float] = MISSING  # noqa: UP045
    log_every_n_steps: int = MISSING
    enable_progress_bar: bool = MISSING
    enable_model_summary: bool = MISSING
    num_sanity_val_steps: int = MISSING


@dataclass
class LaunchSchema:  # conf/launch/slurm.yaml (scripts/make_sbatch.py, pipeline/training/slurm.py)
    job_name: str = MISSING
    partition: Optional[str] = MISSING  # noqa: UP045
    account: Optional[str] = MISSING  # noqa: UP045
    qos: Optional[str] = MISSING  # noqa: UP045
    time: str = MISSING
    cpus_per_task: int = MISSING
    mem: Optional[str] = MISSING  # noqa: UP045
    run_root: str = MISSING
    log_file: str = MISSING
    python: str = MISSING
    setup: list[str] = MISSING
    env: dict[str, Any] = MISSING
    extra_sbatch: list[str] = MISSING
    signal_seconds: int = 120  # SIGUSR1 this many seconds before the time limit


@dataclass
class BalanceSchema:  # conf/balance/m4.yaml (pipeline/balance/multimodal.py); listed in its defaults
    method: str = MISSING
    mode: BalanceMode = MISSING
    eta: float = MISSING
    pi: Any = MISSING  # scalar or one rate per attribute
    eps_r: float = MISSING
    eps_a: float = MISSING
    enforcement: float = MISSING
    solver: BalanceSolver = MISSING
    passes: int = MISSING
    on_violation: OnViolation = MISSING
    seed: Optional[int] = MISSING  # noqa: UP045
    batch_size: Optional[int] = None  # noqa: UP045  (streaming mini-batch; null: the solver's default)


# -- option-dependent groups: each option's yaml lists its schema in its defaults ------------
@dataclass
class SingleStrategySchema:  # conf/strategy/single.yaml
    _target_: str = MISSING


@dataclass
class DDPStrategySchema:  # conf/strategy/ddp.yaml
    _target_: str = MISSING
    find_unused_parameters: bool = MISSING


@dataclass
class DeepSpeedStrategySchema:  # conf/strategy/deepspeed_*.yaml
    _target_: str = MISSING
    stage: int = MISSING
    offload_optimizer: bool = MISSING
    offload_parameters: bool = MISSING
    activation_checkpointing: bool = MISSING


@dataclass
class NoLoggerSchema:  # conf/logger/none.yaml
    pass


@dataclass
class CSVLoggerSchema:  # conf/logger/csv.yaml
    _target_: str = MISSING
    name: str = MISSING


@dataclass
class WandbLoggerSchema:  # conf/logger/wandb.yaml
    _target_: str = MISSING
    project: str = MISSING
    offline: bool = MISSING
    log_model: Any = MISSING  # false | true | "all"


@dataclass
class OptimizerSchema:
    lr: float = MISSING
    weight_decay: float = MISSING
    betas: list[float] = MISSING


@dataclass
class ScheduleSchema:
    name: str = MISSING  # cosine | linear | constant (checked by pipeline.models.optim)
    warmup_steps: int = MISSING
    min_lr_ratio: float = MISSING


@dataclass
class TransformerSchema:  # pipeline.models.transformer.TransformerConfig
    d_model: int = MISSING
    n_layers: int = MISSING
    n_heads: int = MISSING
    d_ff: int = MISSING
    max_length: int = MISSING
    dropout: float = MISSING


@dataclass
class TranslationEvalSchema:
    examples_per_source: int = MISSING  # held-out rows per parallel source decoded for chrF (0: off)
    max_new_tokens: int = MISSING


@dataclass
class LMSchema:  # conf/model/lm_*.yaml -> pipeline.models.lm.LanguageModel
    _target_: str = MISSING
    transformer: TransformerSchema = MISSING
    optimizer: OptimizerSchema = MISSING
    schedule: ScheduleSchema = MISSING
    translation_eval: TranslationEvalSchema = MISSING


@dataclass
class ImageTowerSchema:
    kind: str = MISSING  # vit | conv
    image_size: int = MISSING
    patch_size: int = MISSING
    width: int = MISSING
    n_layers: int = MISSING
    n_heads: int = MISSING
    d_ff: int = MISSING


@dataclass
class BiasEvalSchema:
    pi: Any = MISSING  # target attribute rate: scalar or one per attribute


@dataclass
class ContrastiveSchema:  # conf/model/clip_tiny.yaml -> pipeline.models.contrastive.ContrastiveModel
    _target_: str = MISSING
    objective: str = MISSING  # softmax | sigmoid (checked by the model)
    embed_dim: int = MISSING
    init_logit_scale: float = MISSING
    init_logit_bias: float = MISSING
    image_tower: ImageTowerSchema = MISSING
    text_tower: TransformerSchema = MISSING
    optimizer: OptimizerSchema = MISSING
    schedule: ScheduleSchema = MISSING
    bias_eval: BiasEvalSchema = MISSING


GROUP_SCHEMAS: dict[str, dict[str, type]] = {
    "strategy": {"single_schema": SingleStrategySchema, "ddp_schema": DDPStrategySchema,
                 "deepspeed_schema": DeepSpeedStrategySchema},
    "logger": {"none_schema": NoLoggerSchema, "csv_schema": CSVLoggerSchema, "wandb_schema": WandbLoggerSchema},
    "model": {"lm_schema": LMSchema, "contrastive_schema": ContrastiveSchema},
    "balance": {"m4_schema": BalanceSchema},
}


@dataclass
class RootSchema:
    data: Any = MISSING  # keys depend on the recipe's _target_: check_targets()
    tokenizer: TokenizerSchema = MISSING
    prepare: PrepareSchema = MISSING
    mixture: MixtureSchema = MISSING
    sampler: SamplerSchema = MISSING
    seed: int = MISSING
    cache_dir: str = MISSING
    progress: bool = MISSING
    experiment_name: Optional[str] = None  # noqa: UP045  (set by experiment files)
    output_dir: Optional[str] = MISSING  # noqa: UP045
    ckpt_path: Optional[str] = MISSING  # noqa: UP045
    overwrite: bool = MISSING  # replace a previous run in output_dir (else refused unless ckpt_path resumes it)
    model: Any = MISSING  # typed by the option's schema (lm_schema, contrastive_schema)
    loss: LossSchema = MISSING
    trainer: TrainerSchema = MISSING
    strategy: Any = MISSING  # typed by the option's schema (single_schema, ddp_schema, deepspeed_schema)
    logger: Any = None  # typed by the option's schema (none_schema, csv_schema, wandb_schema)
    record_consumed: bool = MISSING  # log each rank's trained (step, source, index) to <run>/consumed/
    launch: Optional[LaunchSchema] = None  # noqa: UP045  (launch=slurm; training ignores it)
    balance: Any = None  # typed by the option's schema (balance=m4: m4_schema)
    checkpoint: CheckpointSchema = MISSING
    resume: ResumeSchema = MISSING
    evaluation: EvaluationSchema = MISSING
    run: RunSchema = MISSING
    sources: SourcesSchema = MISSING
    loader: LoaderSchema = MISSING
    validation: ValidationSchema = MISSING
    report: ReportSchema = MISSING


# -- keys that depend on a _target_ ----------------------------------------------------------
def _signature_keys(target: str) -> tuple[set[str], bool]:
    """(named parameters of `target`'s constructor or function, whether it takes **kwargs)."""
    module_name, _, name = target.rpartition(".")
    obj = getattr(importlib.import_module(module_name), name)
    params = inspect.signature(obj).parameters.values()
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return named, any(p.kind is p.VAR_KEYWORD for p in params)


def _check_node(node: Any, where: str) -> None:
    if not isinstance(node, Mapping | DictConfig) or not node.get("_target_"):
        return
    target = str(node["_target_"])
    try:
        named, any_kwargs = _signature_keys(target)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"{where}._target_={target!r} cannot be imported: {error}") from error
    if any_kwargs:
        return
    unknown = sorted(str(k) for k in node if not str(k).startswith("_") and str(k) not in named)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} for {target}; its arguments: {sorted(named)}")


def check_targets(cfg: DictConfig) -> None:
    """Keys that no dataclass can type: each `mixture.stages[i]` and `data` against its
    `_target_`'s signature. Cheap (imports and signatures only): call it before preparing data.

    Raises:
        ValueError: naming the entry, the unknown key(s) and the target's arguments.
    """
    stages = OmegaConf.select(cfg, "mixture.stages", default=None)
    if isinstance(stages, ListConfig | list):
        for position, stage in enumerate(stages):
            _check_node(stage, f"mixture.stages[{position}]")
    _check_node(OmegaConf.select(cfg, "data", default=None), "data")


def register_schemas() -> None:
    store = ConfigStore.instance()
    store.store(name="base_config", node=RootSchema)
    for group, schemas in GROUP_SCHEMAS.items():
        for name, node in schemas.items():
            store.store(group=group, name=name, node=node)
    register_resolvers()  # before any compose: interpolations such as ${mul:...} resolve everywhere
