"""OmegaConf resolvers the configs use, registered once with the schemas.

`pipeline.config.schema` calls `register_resolvers()` when it registers `base_config`, and every
entry imports that module before composing, so an interpolation such as UniMax's
`${mul:${run.total_steps},${run.global_batch_size}}` resolves on every path (training, the
report, sweeps, make_sbatch), whichever module is imported first.
"""

from __future__ import annotations

from omegaconf import OmegaConf


def _multiply(a, b) -> int:
    """`${mul:a,b}`: integer product, e.g. a UniMax budget = total_steps x global_batch_size."""
    return int(a) * int(b)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("mul"):
        OmegaConf.register_new_resolver("mul", _multiply)
