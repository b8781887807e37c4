"""Prepared corpora, tokenizers, splits, rows and collators, and the Lightning data modules."""
