"""Build mixing stages and the sampler from the composed Hydra config."""

from __future__ import annotations

from collections.abc import Mapping

from hydra.utils import instantiate
from omegaconf import DictConfig

from pipeline.mixing.base import Compose, MixingStage
from pipeline.sampling.sampler import MixtureSampler

SIZE_UNITS = ("documents", "tokens", "characters")


def build_stage(mixture_cfg: DictConfig) -> Compose:
    """`Compose` of the `mixture.stages` list, each instantiated from its `_target_`."""
    if "stages" not in mixture_cfg or not mixture_cfg.stages:
        raise ValueError("mixture config needs a non-empty `stages` list (see conf/mixture/)")
    stages = []
    for position, stage_cfg in enumerate(mixture_cfg.stages):
        try:
            stage = instantiate(stage_cfg)
        except Exception as error:  # Hydra wraps the stage's ValueError; name the entry
            cause = error.__cause__ if isinstance(error.__cause__, ValueError) else error
            raise ValueError(f"mixture.stages[{position}] ({stage_cfg.get('_target_')}): {cause}") from error
        if not isinstance(stage, MixingStage):
            raise ValueError(f"mixture.stages[{position}] built {stage!r}, not a MixingStage")
        stages.append(stage)
    return Compose(stages)


def mixture_sizes(mixture_cfg: DictConfig, sizes_by_unit) -> Mapping[str, int]:
    """Sizes in the configured unit; `sizes_by_unit(unit)` is e.g. `PreparedCorpus.sizes`."""
    unit = mixture_cfg.get("size_unit", "documents")
    if unit not in SIZE_UNITS:
        raise ValueError(f"mixture.size_unit must be one of {SIZE_UNITS}, got {unit!r}")
    return sizes_by_unit(unit)


def build_sampler(cfg: DictConfig, num_documents: Mapping[str, int],
                  sizes: Mapping[str, float] | None = None, then: MixingStage | None = None) -> MixtureSampler:
    """The run's sampler from `cfg.mixture`, `cfg.sampler`, `cfg.run` and `cfg.seed`.

    `then`: one more stage after the configured ones (the `M4` stage of ``balance=m4``).
    """
    stage = build_stage(cfg.mixture)
    return MixtureSampler(
        stage if then is None else Compose([*stage.stages, then]),
        num_documents,
        global_batch_size=cfg.run.global_batch_size,
        total_steps=cfg.run.total_steps,
        seed=cfg.seed,
        mode=cfg.sampler.mode,
        mixture_sizes=sizes,
        update_steps=cfg.sampler.get("update_steps"),
    )
