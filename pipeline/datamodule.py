"""LightningDataModule: prepared sources -> mixture sampler -> tokenised, weighted batches.

Every batch carries, besides token ids:
  * ``source_ids`` (B,): which source each row came from (index into ``sources``);
  * ``token_weights`` (B, T): the plan's loss weight of the row's source at this step on
    every target token, 0 elsewhere (losses divide by a *global* target-token count, so
    the weights keep their meaning under gradient accumulation and data parallelism);
  * ``token_source_ids`` (B, T): source per token (differs from the row's when packing);
  * ``step`` (B,): the global step the rows belong to.

The stream position is the optimizer step: the datamodule's checkpoint state is the
sampler state at ``trainer.global_step``, so a resumed run (at any world size) continues
with the next global batch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from pipeline.sampler import MixtureSampler, RankBatchSampler

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
DIRECTIONS = ("both", "to_eng", "from_eng")


class MixtureDataset(Dataset):
    """Map-style dataset over (source_id, example_index, step) triples.

    Mono rows become ``<bos> text <eos>`` with every next token a target. Parallel rows
    become decoder-only translation: ``<2tgt> source-text <eos> target-text <eos>`` with
    targets only on the target side (GNMT's target-language tag).
    """

    def __init__(self, corpus, tokenizer, sources: Sequence[str], max_length: int = 128,
                 direction: str = "both"):
        if direction not in DIRECTIONS:
            raise ValueError(f"translation direction must be one of {DIRECTIONS}, got {direction!r}")
        if max_length < 4:
            raise ValueError(f"max_length must be >= 4 tokens, got {max_length}")
        self.corpus, self.tokenizer = corpus, tokenizer
        self.sources = list(sources)
        self.max_length = int(max_length)
        self.direction = direction

    def __getitems__(self, items: Sequence[tuple[int, int, int]]) -> list[dict[str, Any]]:
        """Fetch a micro-batch, reading each source's rows with one batched Arrow take."""
        examples: list[dict[str, Any] | None] = [None] * len(items)
        by_source: dict[int, list[int]] = {}
        for position, (source_id, _, _) in enumerate(items):
            by_source.setdefault(source_id, []).append(position)
        for source_id, positions in by_source.items():
            name = self.sources[source_id]
            rows = self.corpus.dataset(name)[[int(items[p][1]) for p in positions]]
            if self.corpus.kind(name) == "parallel":
                info = self.corpus.source_info(name)
                made = self._translation(rows["src"], rows["tgt"], info["src_lang"], info["tgt_lang"],
                                         [items[p][1] for p in positions])
            else:
                made = self._language_model(rows["text"])
            for p, example in zip(positions, made, strict=True):
                example.update(source_id=source_id, index=int(items[p][1]), step=int(items[p][2]))
                examples[p] = example
        return examples  # type: ignore[return-value]

    def __getitem__(self, item: tuple[int, int, int]) -> dict[str, Any]:
        return self.__getitems__([item])[0]

    def __len__(self) -> int:
        return sum(self.corpus.num_documents(name) for name in self.sources)

    def _language_model(self, texts: list[str]) -> list[dict[str, Any]]:
        tok = self.tokenizer
        out = []
        for ids in tok.encode(texts):
            ids = [tok.bos_id, *ids[: self.max_length - 2], tok.eos_id]
            out.append({"ids": ids, "target_from": 1})  # predict everything after <bos>
        return out

    def _translation(self, sources: list[str], targets: list[str], src_lang: str, tgt_lang: str,
                     indices: list[int]) -> list[dict[str, Any]]:
        tok = self.tokenizer
        src_ids, tgt_ids = tok.encode(list(sources)), tok.encode(list(targets))
        out = []
        for a, b, index in zip(src_ids, tgt_ids, indices, strict=True):
            # Direction per example is fixed by its index, so reruns see the same task.
            reverse = self.direction == "from_eng" or (self.direction == "both" and index % 2 == 1)
            (x, x_lang), (y, y_lang) = ((b, tgt_lang), (a, src_lang)) if reverse else ((a, src_lang), (b, tgt_lang))
            budget = self.max_length - 3
            x = x[: max(1, budget // 2)]
            y = y[: budget - len(x)]
            ids = [tok.lang_tag_id(y_lang), *x, tok.eos_id, *y, tok.eos_id]
            out.append({"ids": ids, "target_from": len(x) + 2})
        return out


class MixtureCollator:
    """Pads (or packs) examples into tensors and attaches per-token loss weights."""

    def __init__(self, sampler: MixtureSampler, pad_id: int, max_length: int, pack: bool = False):
        self.sampler, self.pad_id, self.max_length, self.pack = sampler, pad_id, max_length, pack

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        weights = {step: self.sampler.plan_at(step).loss_weights for step in {e["step"] for e in examples}}
        rows = self._packed_rows(examples) if self.pack else [[e] for e in examples]
        longest = max(len(e["ids"]) for e in examples) - 1
        length = self.max_length if self.pack else min(self.max_length, longest)
        batch = len(rows)
        input_ids = torch.full((batch, length), self.pad_id, dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        token_weights = torch.zeros(batch, length)
        token_sources = torch.full((batch, length), -1, dtype=torch.long)
        document_ids = torch.full((batch, length), -1, dtype=torch.long)
        for r, row in enumerate(rows):
            cursor = 0
            for d, example in enumerate(row):
                ids = example["ids"]
                n = min(len(ids) - 1, length - cursor)
                if n <= 0:
                    break
                span = slice(cursor, cursor + n)
                input_ids[r, span] = torch.tensor(ids[:n])
                target = torch.tensor(ids[1:n + 1])
                is_target = torch.arange(1, n + 1) >= example["target_from"]
                labels[r, span] = torch.where(is_target, target, IGNORE_INDEX)
                token_weights[r, span] = is_target.float() * float(weights[example["step"]][example["source_id"]])
                token_sources[r, span] = example["source_id"]
                document_ids[r, span] = d
                cursor += n
        return {
            "input_ids": input_ids,
            "labels": labels,
            "token_weights": token_weights,
            "token_source_ids": token_sources,
            "document_ids": document_ids,
            "attention_mask": (document_ids >= 0).long(),
            "source_ids": torch.tensor([row[0]["source_id"] for row in rows]),
            "step": torch.tensor([row[0]["step"] for row in rows]),
            "num_target_tokens": (labels != IGNORE_INDEX).sum(),
        }

    def _packed_rows(self, examples: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        """First-fit packing of whole examples into rows of max_length input tokens."""
        rows: list[list[dict[str, Any]]] = []
        free: list[int] = []
        for example in sorted(examples, key=lambda e: -len(e["ids"])):
            need = min(len(example["ids"]) - 1, self.max_length)
            slot = next((i for i, space in enumerate(free) if space >= need), None)
            if slot is None:
                rows.append([example])
                free.append(self.max_length - need)
            else:
                rows[slot].append(example)
                free[slot] -= need
        return rows


def select_sources(corpus, kinds: Sequence[str] = ("mono", "parallel"),
                   include: Sequence[str] | None = None, exclude: Sequence[str] = ()) -> list[str]:
    """Names of the prepared sources the mixture draws from (ValueError on unknown names)."""
    names = list(corpus.source_names)
    for key, listed in (("include", include or []), ("exclude", exclude or [])):
        unknown = sorted(set(listed) - set(names))
        if unknown:
            raise ValueError(f"sources.{key} names unknown source {unknown[0]!r}; corpus has {names}")
    chosen = [n for n in names if corpus.kind(n) in kinds and (include is None or n in include)
              and n not in set(exclude or [])]
    if not chosen:
        raise ValueError(f"no sources selected (kinds={list(kinds)}, include={include}, exclude={exclude})")
    return chosen


class MixtureDataLoader(DataLoader):
    """A DataLoader whose position is the trainer's optimizer step.

    It implements Lightning's stateful-loader protocol, so Lightning stores its state in
    the checkpoint and knows a mid-epoch resume is exact. The state itself is the
    sampler's at `consumed_steps()`: prefetched batches are not counted as consumed.
    """

    def __init__(self, *args, sampler_state, load_sampler_state, **kwargs):
        super().__init__(*args, **kwargs)
        self._sampler_state = sampler_state
        self._load_sampler_state = load_sampler_state

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self._sampler_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._load_sampler_state(state)


class MixtureDataModule(LightningDataModule):
    """Args:
        corpus: a `PreparedCorpus`; tokenizer: a `Tokenizer`.
        sampler: the run's `MixtureSampler` over `sources` (same order).
        micro_batch_size: rows per forward pass per rank.
        max_length: tokens per row (input length after the shift).
        pack: pack several examples per row (per-token source and document ids kept).
        num_workers: dataloader workers (the stream does not depend on it).
    """

    def __init__(self, corpus, tokenizer, sampler: MixtureSampler, micro_batch_size: int,
                 max_length: int = 128, pack: bool = False, num_workers: int = 0,
                 direction: str = "both"):
        super().__init__()
        self.corpus, self.tokenizer, self.sampler = corpus, tokenizer, sampler
        self.sources = list(sampler.sources)
        self.micro_batch_size = int(micro_batch_size)
        self.dataset = MixtureDataset(corpus, tokenizer, self.sources, max_length, direction)
        self.collate = MixtureCollator(sampler, tokenizer.pad_id, max_length, pack)
        self.num_workers = int(num_workers)
        self.start_step = 0

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def train_dataloader(self) -> DataLoader:
        rank, world = self._world()
        trainer = getattr(self, "trainer", None)
        # Read at every iter(): a resumed or second epoch continues at the optimizer step.
        start = (lambda: trainer.global_step) if trainer is not None else self.start_step
        batches = RankBatchSampler(self.sampler, rank, world, self.micro_batch_size, start_step=start)
        if trainer is not None and trainer.accumulate_grad_batches != batches.accumulation:
            raise ValueError(
                f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches} but the global "
                f"batch {self.sampler.global_batch_size} over {world} rank(s) in micro-batches of "
                f"{self.micro_batch_size} needs {batches.accumulation}; one optimizer step must "
                "consume exactly one global batch"
            )
        log.info("train stream: rank %d/%d from step %d, %d micro-batches per step",
                 rank, world, batches.steps().start, batches.accumulation)
        return MixtureDataLoader(
            self.dataset, batch_sampler=batches, collate_fn=self.collate, num_workers=self.num_workers,
            sampler_state=lambda: self.sampler.state_dict(self.consumed_steps()),
            load_sampler_state=self.load_state_dict,
        )

    def consumed_steps(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.global_step if trainer is not None else self.start_step

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict(self.consumed_steps())}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "sampler" not in state:
            raise ValueError("datamodule state has no 'sampler' entry (checkpoint from another datamodule?)")
        self.start_step = self.sampler.load_state_dict(state["sampler"])


def datamodule_from_config(cfg, corpus, tokenizer) -> MixtureDataModule:
    """The run's datamodule: selected sources, their sampler, and loader settings."""
    sampler = build_sampler_for(cfg, corpus)
    loader = cfg.loader
    return MixtureDataModule(corpus, tokenizer, sampler, loader.micro_batch_size, loader.max_length,
                             loader.pack, loader.num_workers, loader.direction)


def build_sampler_for(cfg, corpus) -> MixtureSampler:
    """Sampler over the sources selected by `cfg.sources`, sized in `cfg.mixture.size_unit`."""
    from pipeline.mixing.config import build_sampler, mixture_sizes

    names = select_sources(corpus, cfg.sources.kinds, cfg.sources.include, cfg.sources.exclude)
    sizes = mixture_sizes(cfg.mixture, corpus.sizes)
    documents = corpus.sizes("documents")
    return build_sampler(cfg, {n: documents[n] for n in names}, {n: sizes[n] for n in names})
