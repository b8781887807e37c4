"""Prepare a corpus: build its sources, train its tokenizer, count tokens, log a table.

Usage::

    python -m pipeline.prepare                         # embedded CLDR corpus, default tokenizer
    python -m pipeline.prepare data=tatoeba_mono data.languages=[eng,deu,swh]
    python -m pipeline.prepare cache_dir=/scratch/mixpipe tokenizer.vocab_size=16000
    python -m pipeline.prepare prepare.pretokenize=true prepare.workers=4   # token stores, 4 processes
    python -m pipeline.prepare prepare.pretokenize=true prepare.shard=3 prepare.num_shards=8  # one array task

Everything is cached under ``cache_dir`` by content hash, so a second run only loads.
Training and the mixture report call :func:`prepare` with their own composed config.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import hydra
from filelock import FileLock
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from data_recipes.base import Recipe
from pipeline.config import CONFIG_DIR, check_targets
from pipeline.config.loader import loader_unit
from pipeline.data.build_corpus import prepare_sources
from pipeline.data.corpus import PreparedCorpus
from pipeline.data.token_stats import count_tokens
from pipeline.data.token_store import DEFAULT_SHARD_DOCUMENTS, build_token_stores
from pipeline.data.tokenizer import Tokenizer, TokenizerConfig
from pipeline.data.train_tokenizer import train_tokenizer

log = logging.getLogger("pipeline.prepare")  # stable name under `python -m`


def build_recipe(data_cfg: Any) -> Recipe:
    """Instantiate the recipe from ``cfg.data``; config errors become ValueError."""
    target = OmegaConf.select(data_cfg, "_target_") if isinstance(data_cfg, DictConfig) else None
    try:
        recipe = instantiate(data_cfg)
    except Exception as err:  # hydra wraps constructor errors in InstantiationException
        cause = err.__cause__ if isinstance(err.__cause__, ValueError) else err
        raise ValueError(f"cannot build the data recipe {target!r} from cfg.data: {cause}") from err
    if not isinstance(recipe, Recipe):
        raise ValueError(
            f"cfg.data built {type(recipe).__name__}, which lacks the recipe interface "
            "(name, fingerprint(), sources())"
        )
    return recipe


def build_tokenizer_config(tok_cfg: Any) -> TokenizerConfig:
    """A TokenizerConfig from ``cfg.tokenizer`` (with or without ``_target_``)."""
    if tok_cfg is None:
        return TokenizerConfig()
    try:
        if isinstance(tok_cfg, DictConfig) and "_target_" in tok_cfg:
            config = instantiate(tok_cfg)
        else:
            container = (
                OmegaConf.to_container(tok_cfg, resolve=True)
                if isinstance(tok_cfg, DictConfig)
                else tok_cfg
            )
            config = TokenizerConfig(**container)
    except Exception as err:
        cause = err.__cause__ if isinstance(err.__cause__, (ValueError, TypeError)) else err
        raise ValueError(f"invalid cfg.tokenizer: {cause}") from err
    if not isinstance(config, TokenizerConfig):
        raise ValueError(f"cfg.tokenizer built {type(config).__name__}, expected TokenizerConfig")
    return config


def format_table(corpus: PreparedCorpus) -> str:
    """Per-source table: kind, language, documents, characters, tokens, tokens/char."""
    tokens = corpus.token_counts or {}
    header = ("source", "kind", "lang", "script", "documents", "characters", "tokens", "tok/char")
    rows = []
    totals = [0, 0, 0]
    for name in corpus.source_names:
        info = corpus.source_info(name)
        docs, chars = info["num_documents"], info["num_characters"]
        toks = tokens.get(name)
        totals[0] += docs
        totals[1] += chars
        totals[2] += toks or 0
        rows.append(
            (
                name,
                info["kind"],
                info["language"],
                info.get("script") or "-",
                f"{docs:,}",
                f"{chars:,}",
                "-" if toks is None else f"{toks:,}",
                "-" if toks is None or not chars else f"{toks / chars:.3f}",
            )
        )
    tok_total = f"{totals[2]:,}" if tokens else "-"
    ratio = f"{totals[2] / totals[1]:.3f}" if tokens and totals[1] else "-"
    rows.append(("TOTAL", "", "", "", f"{totals[0]:,}", f"{totals[1]:,}", tok_total, ratio))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for i, row in enumerate([header, *rows]):
        cells = [
            str(c).ljust(w) if j < 4 else str(c).rjust(w)
            for j, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if i == 0 or i == len(rows) - 1:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def prepare_options(cfg: Any) -> dict[str, Any]:
    """``cfg.prepare`` (absent keys take their defaults), checked: a bad value names its key."""
    options = {"pretokenize": False, "workers": 1, "shard_documents": DEFAULT_SHARD_DOCUMENTS,
               "shard": None, "num_shards": None}
    node = OmegaConf.select(cfg, "prepare", default=None) if isinstance(cfg, DictConfig) else None
    if node is not None:
        given = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        unknown = sorted(set(given) - set(options))
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in cfg.prepare; known: {sorted(options)}")
        options.update({k: v for k, v in given.items() if v is not None or k in ("shard", "num_shards")})
    for key in ("workers", "shard_documents"):
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"prepare.{key} must be a positive int, got {value!r}")
    if (options["shard"] is None) != (options["num_shards"] is None):
        raise ValueError("prepare.shard and prepare.num_shards go together (one task of a job array); got "
                         f"shard={options['shard']!r}, num_shards={options['num_shards']!r}")
    if options["shard"] is not None and not options["pretokenize"]:
        raise ValueError("prepare.shard is a shard of the token stores: set prepare.pretokenize=true too")
    return options


def prepare(cfg: DictConfig, progress: bool | None = None) -> tuple[PreparedCorpus, Tokenizer]:
    """Prepare ``cfg.data``, train/load ``cfg.tokenizer``, attach token counts, log a table.

    With ``prepare.pretokenize`` (implied by ``loader.unit=window``, which reads the stores),
    every source is also tokenised once into a memory-mapped token
    store (``prepare.workers`` processes; :mod:`pipeline.data.token_store`), set as
    ``corpus.token_stores``, and the token counts are read from the stores. With
    ``prepare.shard`` / ``prepare.num_shards`` only that task's share of the stores is encoded
    (into the shared cache) and nothing is counted or published: a later run without them
    publishes.

    Args:
        cfg: the composed root config (uses ``data``, ``tokenizer``, ``cache_dir``, ``prepare``).
        progress: show progress bars; defaults to ``cfg.progress`` if set, else True.

    Returns:
        (corpus with token counts attached, tokenizer).
    """
    if progress is None:
        progress = bool(OmegaConf.select(cfg, "progress", default=True))
    cache_dir = Path(OmegaConf.select(cfg, "cache_dir", default=".cache/mixpipe"))
    options = prepare_options(cfg)
    if loader_unit(cfg) == "window":
        options["pretokenize"] = True
    recipe = build_recipe(cfg.data)
    tok_config = build_tokenizer_config(OmegaConf.select(cfg, "tokenizer"))
    corpus = prepare_sources(recipe, cache_dir, progress=progress)
    tokenizer = train_tokenizer(corpus, tok_config, cache_dir)
    if options["pretokenize"]:
        stores = build_token_stores(corpus, tokenizer.model_file, tokenizer.vocab_size, tokenizer.content_hash,
                                    workers=options["workers"], shard_documents=options["shard_documents"],
                                    shard=options["shard"], num_shards=options["num_shards"], progress=progress)
        if stores is None:  # one task of a job array: its shards are in the cache
            return corpus, tokenizer
        corpus.token_stores = stores
        if corpus.load_token_counts(tokenizer.content_hash) is None:
            corpus.attach_token_counts({name: s.total_tokens for name, s in stores.items()},
                                       tokenizer.content_hash)
    if corpus.load_token_counts(tokenizer.content_hash) is None:
        counts = count_tokens(corpus, tokenizer, progress=progress)
        corpus.attach_token_counts(counts, tokenizer.content_hash)
    sizes = corpus.sizes("documents")
    ratio = max(sizes.values()) / max(1, min(sizes.values()))
    log.info(
        "corpus %s: %d sources, %d languages, largest/smallest source %.0f:1 (documents); "
        "tokenizer %s (vocab %d)",
        corpus.path,
        len(sizes),
        len(corpus.languages()),
        ratio if math.isfinite(ratio) else 0,
        tokenizer.path,
        tokenizer.vocab_size,
    )
    log.info("prepared sources\n%s", format_table(corpus))
    return corpus, tokenizer


def prepare_once(cfg: DictConfig) -> tuple[PreparedCorpus, Tokenizer]:
    """`prepare` under a lock in `cache_dir`: every launched process of a run calls it; the
    first builds what is missing, the others wait and load (`pipeline.train`)."""
    cache = Path(cfg.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / ".prepare.lock")):
        return prepare(cfg)


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def _prepare_app(cfg: DictConfig) -> None:
    check_targets(cfg)  # a misspelt data key fails before any reading
    prepare(cfg)


def main() -> None:
    """`python -m pipeline.prepare [overrides]` / `mixpipe-prepare [overrides]`."""
    _prepare_app()


if __name__ == "__main__":
    main()
