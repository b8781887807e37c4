"""`loader.*` checks that must run before any data work, without importing torch or Lightning
(`pipeline.prepare` runs them, and its spawned workers import it again)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

LOADER_UNITS = ("document", "window")


def loader_unit(cfg: DictConfig) -> str:
    """``loader.unit`` (default ``document``), checked against `LOADER_UNITS`."""
    unit = OmegaConf.select(cfg, "loader.unit", default="document")
    if unit not in LOADER_UNITS:
        raise ValueError(f"loader.unit must be one of {LOADER_UNITS}, got {unit!r}")
    if unit == "window" and OmegaConf.select(cfg, "loader.pack", default=False):
        raise ValueError("loader.pack=true packs whole documents, but loader.unit=window already fills every row "
                         "with a window; set loader.pack=false")
    return unit
