"""Metrics (per-source, retrieval, chrF keys) and sweep collection."""
