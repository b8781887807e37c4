"""Hydra config: schemas, resolvers, and builders that turn a composed config into parts.

Importing this package (or any module in it) registers the structured-config schemas and the
OmegaConf resolvers (`${mul:...}`) exactly once, so an entry that composes a config needs
nothing more than an import of what it uses from here, e.g. `from pipeline.config import CONFIG_DIR`.
"""

from pipeline.config.location import CONFIG_DIR
from pipeline.config.schema import check_targets, register_schemas

register_schemas()  # idempotent (ConfigStore.store overwrites; resolvers are checked first)

__all__ = ["CONFIG_DIR", "check_targets", "register_schemas"]
