"""The model from the composed config: `cfg.model`'s `_target_` with what the data decides."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf


def build_model(cfg: DictConfig, datamodule, corpus, tokenizer):
    """`cfg.model` instantiated with the vocabulary, the sources and their kinds, the loss
    settings and the translation target languages (both sides of every parallel source)."""
    sources = datamodule.sources
    kinds = [corpus.kind(n) for n in sources]
    target_languages = sorted({lang for n, kind in zip(sources, kinds, strict=True) if kind == "parallel"
                               for lang in (corpus.source_info(n)["src_lang"], corpus.source_info(n)["tgt_lang"])})
    return instantiate(
        cfg.model, vocab_size=tokenizer.vocab_size, sources=sources, total_steps=cfg.run.total_steps,
        loss=OmegaConf.to_container(cfg.loss, resolve=True, enum_to_str=True),
        source_kinds=kinds, target_languages=target_languages,
        tokenizer_path=str(tokenizer.path), _convert_="all",
    )
