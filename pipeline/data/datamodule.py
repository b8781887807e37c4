"""LightningDataModule: prepared sources -> mixture sampler -> tokenised, weighted batches.

Every batch carries, besides token ids (see `pipeline.data.text_rows`):
  * ``source_ids`` (B,): which source each row came from (index into ``sources``);
  * ``token_weights`` (B, T): the plan's loss weight of the row's source at this step on
    every target token, 0 elsewhere;
  * ``token_source_ids`` (B, T): source per token (differs from the row's when packing);
  * ``step_target_tokens``: on a step's first micro-batch, the rank's target tokens over
    the whole step (losses divide by the all-reduced sum: a *global* normaliser, so
    weights keep their meaning under gradient accumulation and data parallelism).

The stream position is the optimizer step: the checkpoint state is the sampler state at
``trainer.global_step``, so a resumed run (at any world size) continues with the next
global batch. A resume that `resume.allow_mismatch=true` let change the stream sets
`restart_stream_on_load`: this run's stream then continues at the checkpoint's step.
The plan's ``example_keep`` is applied by the sampler, its ``example_weights`` by the
collator (`pipeline.data.text_rows.plan_loss_weight`). Each source keeps a held-out validation split (`pipeline.data.split`).

Online mixing: the sampler's plan history is part of the sampler state (so of this state),
and `train_dataloader` refuses a loader that can run further ahead than the controller's lag
(`check_online_lag`); the sampler raises if it ever does. Batches are drawn in the main
process, whose sampler the controller updates; the collator (in the workers, on copies of the
sampler that never see a decision) reads only the loss weights, which the controller leaves
to the stages on its left (`MixtureSampler.loss_weights_at`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from pipeline.data.split import SourceSplit
from pipeline.data.text_rows import PADDING_STEP, VALIDATION_STEP, MixtureCollator, MixtureDataset
from pipeline.sampling.batch_geometry import BatchGeometry, check_micro_batch_size
from pipeline.sampling.sampler import MixtureSampler, RankBatchSampler

log = logging.getLogger(__name__)

PREFETCH_FACTOR = 2  # torch's default: batches each worker holds ahead


def loader_lookahead(num_workers: int, prefetch_factor: int = PREFETCH_FACTOR) -> int:
    """Micro-batches the loader may take from the batch sampler beyond the one being trained:
    the indices torch keeps outstanding (prefetch_factor per worker; none without workers)
    plus Lightning's one-batch lookahead (its fetcher holds the next batch to detect the last).
    Measured on the demo with 2 workers (lag check disabled): a slack of 4 micro-batches
    trained, 3 raised PlanNotDecidedError; this bound (5) keeps one micro-batch of margin."""
    return (num_workers * prefetch_factor if num_workers > 0 else 0) + 1


def check_online_lag(sampler: MixtureSampler, accumulation: int, num_workers: int) -> None:
    """ValueError unless the online controller's lag exceeds what the loader can prefetch.

    The decision from window k (steps [kN, (k+1)N)) is made after its last step and applies
    from step (k + 1 + lag) N, so when it is made the loader may hold micro-batches of the
    next lag * N steps without touching an undecided plan: lag * N * accumulation must be at
    least the loader's lookahead.
    """
    if not sampler.online:
        return
    schedule = sampler.schedule
    slack = schedule.lag_windows * schedule.update_steps * accumulation
    ahead = loader_lookahead(num_workers)
    if slack < ahead:
        raise ValueError(
            f"online mixing lag too short for the loader: lag_windows x update_every x accumulation = "
            f"{schedule.lag_windows} x {schedule.update_steps} x {accumulation} = {slack} micro-batches, but "
            f"loader.num_workers={num_workers} can prefetch {ahead}; raise the OnlineBandit's lag_windows or "
            "update_every (a plan must be decided before the loader reads its step)"
        )


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
        sampler: the run's `MixtureSampler` over the training side of `split`.
        split: per-source train/validation split (its `train` sizes are the sampler's).
        micro_batch_size: rows per forward pass per rank (None: the rank's whole share of
            the global batch, no accumulation); `geometry()` resolves it for the world size.
        max_length: tokens per row (input length after the shift).
        pack: pack several examples per row (per-token source and document ids kept).
        num_workers: dataloader workers (the stream does not depend on it).
        direction: translation direction (both, to_eng, from_eng).
        windows: window mode (``loader.unit=window``): {mono source: its `TokenWindows`};
            the sampler, the split and the example indices of those sources count windows.
    """

    def __init__(self, corpus, tokenizer, sampler: MixtureSampler, split: SourceSplit,
                 micro_batch_size: int | None, max_length: int = 128, pack: bool = False,
                 num_workers: int = 0, direction: str = "both", windows: Mapping[str, Any] | None = None):
        super().__init__()
        self.corpus, self.tokenizer, self.sampler, self.split = corpus, tokenizer, sampler, split
        self.sources = list(sampler.sources)
        mismatch = [n for n in self.sources if int(sampler.total_documents[self.sources.index(n)]) != split.train[n]]
        if mismatch:
            raise ValueError(f"sampler sizes disagree with the split's training sizes for {mismatch[0]!r}")
        self.micro_batch_size = check_micro_batch_size(micro_batch_size)  # None allowed; see geometry()
        self.max_length = int(max_length)
        if windows and pack:
            raise ValueError("loader.pack=true packs whole documents, but loader.unit=window already fills every "
                             "row with a window; set loader.pack=false")
        self.windows = dict(windows or {})
        self.train_set = MixtureDataset(corpus, tokenizer, self.sources, split, "train", max_length, direction,
                                        self.windows)
        self.val_set = MixtureDataset(corpus, tokenizer, self.sources, split, "val", max_length, direction,
                                      self.windows)
        self.collate = MixtureCollator(sampler.loss_weights_at,
                                       tokenizer.pad_id, max_length, pack, example_weights=sampler.example_weights)
        self.val_collate = MixtureCollator(lambda step: None, tokenizer.pad_id, max_length, pack=False)
        self.num_workers = int(num_workers)
        self.start_step = 0
        # Set by pipeline.train when `resume.allow_mismatch=true` resumes a checkpoint of another
        # stream (other sources, mixture or sampler): its saved sampler state is not checked,
        # only its step is kept, and this run's stream continues there.
        self.restart_stream_on_load = False

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def geometry(self, world_size: int | None = None) -> BatchGeometry:
        """The global batch over `world_size` ranks (default: the attached Trainer's) in
        micro-batches: `micro_batch_size` resolved, and the accumulation."""
        world = self._world()[1] if world_size is None else world_size
        return BatchGeometry.of(self.sampler.global_batch_size, world, self.micro_batch_size)

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
                f"{batches.micro_batch_size} needs {batches.accumulation}; one optimizer step must "
                "consume exactly one global batch"
            )
        check_online_lag(self.sampler, batches.accumulation, self.num_workers)
        log.info("train stream: rank %d/%d from step %d, %d micro-batches per step",
                 rank, world, batches.steps().start, batches.accumulation)
        return MixtureDataLoader(
            self.train_set, batch_sampler=batches, collate_fn=self.collate, num_workers=self.num_workers,
            sampler_state=lambda: self.sampler.state_dict(self.consumed_steps()),
            load_sampler_state=self.load_state_dict,
        )

    def val_items(self, rank: int = 0, world_size: int = 1) -> list[list[tuple[int, int, int]]]:
        """This rank's validation micro-batches: every source's held-out rows, sharded by
        rank and padded so every rank runs the same number of forward passes (ZeRO-3
        gathers parameters collectively in forward)."""
        items = self.validation_items()
        if not items:
            return []
        per_rank = -(-len(items) // world_size)
        items = items + [(items[0][0], items[0][1], PADDING_STEP)] * (per_rank * world_size - len(items))
        mine = items[rank::world_size]
        # Validation has no optimizer step: rows per forward pass as in training, no divisibility needed.
        size = self.micro_batch_size or max(1, self.sampler.global_batch_size // world_size)
        return [mine[i:i + size] for i in range(0, len(mine), size)]

    def validation_items(self) -> list[tuple[int, int, int]]:
        """Every (source id, held-out index, VALIDATION_STEP) of one validation pass."""
        return [(s, j, VALIDATION_STEP) for s, name in enumerate(self.sources) for j in range(self.split.val[name])]

    def val_dataloader(self) -> DataLoader:
        rank, world = self._world()
        return DataLoader(self.val_set, batch_sampler=self.val_items(rank, world),
                          collate_fn=self.val_collate, num_workers=self.num_workers)

    def consumed_steps(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.global_step if trainer is not None else self.start_step

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict(self.consumed_steps())}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume the stream from a saved state (the datamodule's own checkpoint entry and
        the fit loop's dataloader state both come here). With `restart_stream_on_load` the
        state is another stream's: only its step is read."""
        if "sampler" not in state:
            raise ValueError("datamodule state has no 'sampler' entry (checkpoint from another datamodule?)")
        if self.restart_stream_on_load:
            if self.sampler.online:
                raise ValueError("resume.allow_mismatch=true cannot restart an online mixture (OnlineBandit) on "
                                 "another stream: its plan history belongs to the checkpoint's stream; start a "
                                 "fresh run or resume without the mismatch")
            if "step" not in state["sampler"]:
                raise ValueError("sampler state is missing key 'step'")
            self.start_step = int(state["sampler"]["step"])
            return
        self.start_step = self.sampler.load_state_dict(state["sampler"])

