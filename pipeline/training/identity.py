"""What a run is, for resume checks and rank agreement: the config digest and the run identity."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Keys that say where a run lives, not what it computes: left out of the digest.
_PLACE_KEYS = ("output_dir", "ckpt_path", "overwrite", "resume", "cache_dir", "progress", "launch", "record_consumed",
               "prepare")  # prepare.*: how sources are built (processes, shards), not what trains


def config_digest(cfg: DictConfig) -> str:
    """sha256 (16 hex) of the resolved config without its location keys."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in _PLACE_KEYS:
        container.pop(key, None)
    return hashlib.sha256(json.dumps(container, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Transformer settings that decide parameter shapes (dropout, max_length do not).
_SHAPE_KEYS = ("d_model", "n_layers", "n_heads", "d_ff")


def run_identity(cfg: DictConfig, datamodule, tokenizer) -> dict[str, Any]:
    """What a checkpoint must agree with to be resumed: data, stream, tokenizer, model shape.

    Stored in every checkpoint and in `checkpoints/last.json`; `pipeline.train` compares it
    before loading anything. `sampler_stream` is the sampler's fingerprint (mode, seed, global
    batch size and the mixture schedule over `run.total_steps`).
    """
    model = OmegaConf.to_container(cfg.model, resolve=True)
    # The LM has `transformer`; the contrastive model `text_tower` plus `image_tower`.
    transformer = model.get("transformer") or model.get("text_tower") or {}
    extra = {"image_tower": model["image_tower"]} if "image_tower" in model else {}
    # Window mode draws other units (listed only then, so document-mode identities stay as they were).
    unit = {"draw_unit": f"window:{cfg.loader.max_length}"} if getattr(datamodule, "windows", None) else {}
    return {
        "sources": list(datamodule.sources),
        "mixture": OmegaConf.to_container(cfg.mixture, resolve=True),
        "sampler_stream": datamodule.sampler.fingerprint,
        **unit,
        "tokenizer": tokenizer.content_hash,
        "model_shape": {"vocab_size": tokenizer.vocab_size,
                        **{key: transformer.get(key) for key in _SHAPE_KEYS}, **extra},
    }
