"""Data parts from the composed config: the selected sources, their split, the datamodule.

Image-text sources train the contrastive model (`pipeline.data.image_text`), text the LM
(`pipeline.data.datamodule`); `datamodule_from_config` picks one from the corpus.
"""

from __future__ import annotations

from collections.abc import Mapping

from omegaconf import DictConfig

from pipeline.config.mixing import build_sampler
from pipeline.data.datamodule import MixtureDataModule, select_sources
from pipeline.data.image_text import ImageTextDataModule, image_text_info, reference_sources
from pipeline.data.split import SourceSplit
from pipeline.sampling.sampler import MixtureSampler


def selected_sources(cfg: DictConfig, corpus) -> list[str]:
    """The sources `cfg.sources` (kinds, include, exclude) selects from the prepared corpus."""
    return select_sources(corpus, cfg.sources.kinds, cfg.sources.include, cfg.sources.exclude)


def build_split(cfg: DictConfig, corpus, names) -> SourceSplit:
    """Held-out validation documents per source, from `cfg.validation`."""
    validation = cfg.get("validation", {}) or {}
    return SourceSplit({n: corpus.num_documents(n) for n in names},
                       val_documents=validation.get("documents_per_source", 32),
                       val_fraction=validation.get("max_fraction", 0.1),
                       seed=validation.get("seed", 0))


def build_sampler_for(cfg: DictConfig, corpus, split: SourceSplit | None = None, then=None,
                      document_sizes: Mapping[str, int] | None = None) -> MixtureSampler:
    """Sampler over the training side of the sources selected by `cfg.sources`.

    Args:
        then: an extra mixing stage applied after `cfg.mixture`'s (e.g. the `M4` stage of
            ``balance=m4``, whose plan carries ``example_keep`` or ``example_weights``).
        document_sizes: the sizes the stages see when ``mixture.size_unit=documents``
            (default: the training sizes; ``balance=m4`` subsample: the kept counts).
    """
    from pipeline.config.mixing import mixture_sizes

    names = selected_sources(cfg, corpus)
    split = split or build_split(cfg, corpus, names)
    sizes = mixture_sizes(cfg.mixture, corpus.sizes)
    if cfg.mixture.get("size_unit", "documents") == "documents":
        sizes = {**split.train, **(document_sizes or {})}
    num_documents, sizes = {n: split.train[n] for n in names}, {n: sizes[n] for n in names}
    return build_sampler(cfg, num_documents, sizes, then=then)


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
    split = build_split(cfg, corpus, names)
    sampler = build_sampler_for(cfg, corpus, split)
    loader = cfg.loader
    return MixtureDataModule(corpus, tokenizer, sampler, split, loader.micro_batch_size,
                             loader.max_length, loader.pack, loader.num_workers, loader.direction)


def image_text_datamodule_from_config(cfg: DictConfig, corpus, tokenizer) -> ImageTextDataModule:
    """The image-text datamodule: selected sources, split, optional M4 balancing, sampler."""
    from pipeline.balance.multimodal import balance_split

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
