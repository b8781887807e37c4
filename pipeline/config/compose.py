"""Compose the root config without running a Hydra app (scripts, tests, `mixpipe-sbatch`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from pipeline.config.location import CONFIG_DIR


def compose_config(overrides: Sequence[str] = (), config_dir: str | Path = CONFIG_DIR,
                   return_hydra_config: bool = False) -> DictConfig:
    """`config.yaml` from `config_dir` with command-line style `overrides` applied.

    The schemas and resolvers are registered by importing `pipeline.config` (this module's
    package), so the result is checked exactly as `python -m pipeline.train` checks it.
    """
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=return_hydra_config)
