"""Recipes: one module per corpus or format, turning raw files into named sources.

See ``data_recipes/README.md`` and :mod:`data_recipes.base` for the contract.
"""

from data_recipes.base import Recipe, SourceRecords
from data_recipes.embedded_cldr import EmbeddedCLDR
from data_recipes.hf_generic import HFGeneric
from data_recipes.parallel_tsv import ParallelTSV
from data_recipes.text_dir import TextDir

__all__ = ["EmbeddedCLDR", "HFGeneric", "ParallelTSV", "Recipe", "SourceRecords", "TextDir"]
