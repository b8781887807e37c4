"""Data parts from the composed config: the selected sources, their split, the datamodule.

Image-text sources train the contrastive model (`pipeline.data.image_text`), text the LM
(`pipeline.data.datamodule`); `datamodule_from_config` picks one from the corpus.

The draw unit is ``loader.unit``: ``document`` (a row is a document, truncated at
``loader.max_length``) or ``window`` (a mono source is its token stream cut into windows of
``max_length`` inputs, `pipeline.data.windows`; translation pairs stay whole). In window mode
the split, the sampler's sizes, epochs and the mixture's ``documents`` unit count windows, and
its ``tokens`` unit counts the targets the training windows actually train.
"""

from __future__ import annotations

from collections.abc import Mapping

from omegaconf import DictConfig

from pipeline.config.loader import loader_unit
from pipeline.config.mixing import build_sampler
from pipeline.data.datamodule import MixtureDataModule, select_sources
from pipeline.data.image_text import ImageTextDataModule, image_text_info, reference_sources
from pipeline.data.split import SourceSplit
from pipeline.data.windows import TokenWindows
from pipeline.sampling.sampler import MixtureSampler


def source_windows(cfg: DictConfig, corpus, tokenizer, names) -> dict[str, TokenWindows]:
    """Window mode: {mono source among `names`: its windows of ``loader.max_length``}; {} in
    document mode. Reads the token stores `pipeline.prepare` built (``corpus.token_stores``)."""
    if loader_unit(cfg) != "window":
        return {}
    stores = corpus.token_stores
    if stores is None:
        raise ValueError("loader.unit=window reads pre-tokenized sources, but the corpus has no token stores; "
                         "prepare it with this config (pipeline.prepare builds them when loader.unit=window)")
    if stores and next(iter(stores.values())).tokenizer_hash != tokenizer.content_hash:
        raise ValueError("the corpus's token stores belong to another tokenizer; prepare again with this config")
    return {n: TokenWindows(stores[n], int(cfg.loader.max_length), tokenizer.bos_id, tokenizer.eos_id)
            for n in names if corpus.kind(n) == "mono"}


def selected_sources(cfg: DictConfig, corpus) -> list[str]:
    """The sources `cfg.sources` (kinds, include, exclude) selects from the prepared corpus."""
    return select_sources(corpus, cfg.sources.kinds, cfg.sources.include, cfg.sources.exclude)


def build_split(cfg: DictConfig, corpus, names, windows: Mapping[str, TokenWindows] | None = None) -> SourceSplit:
    """Held-out validation documents (windows, for a windowed source) per source, from `cfg.validation`."""
    validation = cfg.get("validation", {}) or {}
    windows = windows or {}
    return SourceSplit({n: windows[n].num_windows if n in windows else corpus.num_documents(n) for n in names},
                       val_documents=validation.get("documents_per_source", 32),
                       val_fraction=validation.get("max_fraction", 0.1),
                       seed=validation.get("seed", 0))


def trained_tokens(windows: TokenWindows, split: SourceSplit) -> int:
    """Targets of one pass over a windowed source's training windows (held-out ones excluded)."""
    return windows.num_targets - int(windows.targets(split.val_rows(windows.source)).sum())


def stage_sizes(cfg: DictConfig, corpus, split: SourceSplit, document_sizes: Mapping[str, int] | None = None,
                windows: Mapping[str, TokenWindows] | None = None) -> dict[str, float]:
    """{selected source: the size the mixing stages see} in ``mixture.size_unit``.

    ``documents``: training draws (windows of a windowed source; ``document_sizes`` overrides,
    e.g. M4's kept counts); ``tokens``: the prepared token counts, or for a windowed source
    the targets its training windows train; ``characters``: the prepared source's characters.
    """
    from pipeline.config.mixing import mixture_sizes

    names = selected_sources(cfg, corpus)
    sizes = mixture_sizes(cfg.mixture, corpus.sizes)
    unit = cfg.mixture.get("size_unit", "documents")
    if unit == "documents":
        sizes = {**split.train, **(document_sizes or {})}
    elif unit == "tokens":
        sizes = {**sizes, **{n: trained_tokens(w, split) for n, w in (windows or {}).items()}}
    return {n: sizes[n] for n in names}


def build_sampler_for(cfg: DictConfig, corpus, split: SourceSplit | None = None, then=None,
                      document_sizes: Mapping[str, int] | None = None,
                      windows: Mapping[str, TokenWindows] | None = None) -> MixtureSampler:
    """Sampler over the training side of the sources selected by `cfg.sources`.

    Args:
        then: an extra mixing stage applied after `cfg.mixture`'s (e.g. the `M4` stage of
            ``balance=m4``, whose plan carries ``example_keep`` or ``example_weights``).
        document_sizes, windows: see `stage_sizes`; a windowed source is drawn by window.
    """
    names = selected_sources(cfg, corpus)
    split = split or build_split(cfg, corpus, names, windows)
    sizes = stage_sizes(cfg, corpus, split, document_sizes, windows)
    return build_sampler(cfg, {n: split.train[n] for n in names}, sizes, then=then)


def is_image_text(cfg: DictConfig, corpus) -> bool:
    """Whether the run's selected sources are image-text (then every one must be)."""
    kinds = {corpus.kind(n) for n in selected_sources(cfg, corpus)}
    if "image_text" in kinds and len(kinds) > 1:
        raise ValueError(f"sources mix image_text with {sorted(kinds - {'image_text'})}; a run trains "
                         "either a language model or a contrastive image-text model")
    return kinds == {"image_text"}


def text_datamodule_from_config(cfg: DictConfig, corpus, tokenizer) -> MixtureDataModule:
    """The text datamodule: selected sources, their split and sampler, loader settings."""
    names = selected_sources(cfg, corpus)
    windows = source_windows(cfg, corpus, tokenizer, names)
    split = build_split(cfg, corpus, names, windows)
    sampler = build_sampler_for(cfg, corpus, split, windows=windows)
    loader = cfg.loader
    return MixtureDataModule(corpus, tokenizer, sampler, split, loader.micro_batch_size,
                             loader.max_length, loader.pack, loader.num_workers, loader.direction, windows)


def image_text_datamodule_from_config(cfg: DictConfig, corpus, tokenizer) -> ImageTextDataModule:
    """The image-text datamodule: selected sources, split, optional M4 balancing, sampler."""
    from pipeline.balance.multimodal import balance_split

    if loader_unit(cfg) == "window":
        raise ValueError("loader.unit=window cuts text sources into token windows; image-text sources are drawn "
                         "by pair: set loader.unit=document")
    names = selected_sources(cfg, corpus)
    info = image_text_info(corpus, names)
    reference = [n for n in reference_sources(corpus) if n not in names]
    split = build_split(cfg, corpus, names)
    stage, report = None, None
    balance = cfg.get("balance") or {}
    if balance and balance.get("method", "none") != "none":
        # M4 is one more mixing stage: its plan keeps rows (subsample) or weights them.
        split, stage, report = balance_split(balance, corpus, names, split, info, seed=cfg.seed)
    sampler = build_sampler_for(cfg, corpus, split, then=stage,
                                document_sizes=(report or {}).get("kept_rows"))
    loader = cfg.loader
    datamodule = ImageTextDataModule(corpus, tokenizer, sampler, split, loader.micro_batch_size,
                                     loader.max_length, loader.num_workers, reference)
    datamodule.balance_report = report  # M4 data statistics before/after (None: no balancing)
    return datamodule


def datamodule_from_config(cfg: DictConfig, corpus, tokenizer) -> MixtureDataModule:
    """The run's datamodule: image-text sources -> contrastive rows, text -> LM rows."""
    build = image_text_datamodule_from_config if is_image_text(cfg, corpus) else text_datamodule_from_config
    return build(cfg, corpus, tokenizer)
