"""The run's Lightning callbacks, and the small ones that audit resume and stop.

`build_callbacks` lists every callback a training run gets: online mixing (a no-op unless
the mixture ends with `OnlineBandit`), atomic checkpoints, rank agreement, batch-progress alignment, preemption, non-finite loss, validation at an early stop,
and (``record_consumed=true``) `ConsumedExamplesLog`, which writes which (source, example)
pairs each rank trained on, so tests and users can check that a resumed run continued the stream.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from omegaconf import DictConfig

from pipeline.models.data_accounting import reduce_source_losses
from pipeline.training.checkpointing import AtomicModelCheckpoint, checkpoints_dir_of
from pipeline.training.divergence import NonFiniteLoss
from pipeline.training.identity import config_digest
from pipeline.training.preemption import Preemption

log = logging.getLogger(__name__)


# -- online mixing -------------------------------------------------------------------------
class OnlineMixing(Callback):
    """Feeds the online mixing controller (`pipeline.mixing.online`) with training losses.

    After every optimizer step, each rank's per-source (loss sum, target tokens) of the step
    is summed over the ranks (`reduce_source_losses`: identical bits everywhere) and given to
    the sampler (`MixtureSampler.observe_losses`), whose schedule decides at the end of each
    window. It runs before the checkpoint callbacks (Lightning orders those last and this one
    is listed first), so a checkpoint at step t holds the observations of steps [0, t).
    A no-op when the run's mixture is not online.
    """

    def __init__(self):
        self.sampler = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        sampler = getattr(getattr(trainer, "datamodule", None), "sampler", None)
        if stage != "fit" or not getattr(sampler, "online", False):
            self.sampler = None
            return
        if not getattr(pl_module, "supports_source_losses", False):
            raise ValueError(f"mixture with OnlineBandit needs per-source training losses, which "
                             f"{type(pl_module).__name__} does not report; use a language model")
        pl_module.track_source_losses = True
        self.sampler = sampler

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.sampler is None:
            return
        step = int(batch["step"][0])
        if trainer.global_step != step + 1:  # not the step's last micro-batch (no optimizer step yet)
            return
        loss_sums, token_counts = reduce_source_losses(pl_module.pop_source_losses())
        decision = self.sampler.observe_losses(step, loss_sums, token_counts)
        if decision is not None and trainer.is_global_zero:
            log.info("online mixing: window %d observed, plan of window %d (steps from %d) decided: %s",
                     decision.window, decision.applies_to, decision.applies_to * self.sampler.schedule.update_steps,
                     ", ".join(f"{n}={p:.4f}" for n, p in zip(self.sampler.sources, decision.probs, strict=True)))


# -- the consumed stream -------------------------------------------------------------------
class ConsumedExamplesLog(Callback):
    """Writes every training micro-batch's (step, rank, source, example index) to
    ``<directory>/rank<r>-from<step>.jsonl`` (one JSON object per micro-batch, flushed).

    One file per rank and launch, named by the step the launch started at, so a relaunch
    after a crash never mixes with the steps the crashed launch did past its checkpoint.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._micro: dict[int, int] = defaultdict(int)
        self._path: Path | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._path = self.directory / f"rank{trainer.global_rank}-from{trainer.global_step:08d}.jsonl"
        self._path.write_text("")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = int(batch["step"][0])
        names = trainer.datamodule.sources
        record = {"step": step, "rank": trainer.global_rank, "micro": self._micro[step],
                  "source": [names[i] for i in batch["source_ids"].tolist()],
                  "index": batch["example_index"].tolist()}
        self._micro[step] += 1
        with open(self._path, "a") as stream:
            stream.write(json.dumps(record) + "\n")


def read_consumed(directory: str | Path) -> list[tuple[int, str, int]]:
    """The stream the run's final state was trained on: (step, source, index) in stream order.

    Launches are applied in the order of their start step: a launch that started at step S
    (a resume) supersedes whatever earlier launches logged for steps >= S. Within a step
    the order is rank-major, then micro-batch (rank r holds slice r of the global batch).

    Raises:
        ValueError: a micro-batch logged twice by one launch.
    """
    launches: dict[int, list[dict]] = defaultdict(list)
    for path in Path(directory).glob("rank*-from*.jsonl"):
        start = int(path.stem.rsplit("-from", 1)[1])
        launches[start] += [json.loads(line) for line in path.read_text().splitlines() if line]
    kept: dict[tuple[int, int, int], dict] = {}
    for start in sorted(launches):
        kept = {key: r for key, r in kept.items() if key[0] < start}
        logged = set()
        for r in launches[start]:
            key = (r["step"], r["rank"], r["micro"])
            if key in logged:
                raise ValueError(f"{directory}: step {key[0]} rank {key[1]} micro-batch {key[2]} "
                                 "logged twice by one launch")
            logged.add(key)
            kept[key] = r
    records = [kept[key] for key in sorted(kept)]
    return [(r["step"], s, i) for r in records for s, i in zip(r["source"], r["index"], strict=True)]


# -- ranks that disagree -------------------------------------------------------------------
class RankAgreement(Callback):
    """Fails fast, on every rank, when the ranks were started with different runs.

    Each rank all-gathers its config digest and run identity (sources, mixture, sampler
    stream, tokenizer, model shape) once the process group is up, before the first step.
    Ranks launched with different overrides, data or tokenizers would otherwise train on
    inconsistent streams or hang in a collective; here every rank raises the same
    `ValueError` naming the ranks and what differs.
    """

    def __init__(self, config_digest: str, identity: dict[str, Any] | None):
        self.summary = {"config_digest": config_digest, **(identity or {})}

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.world_size == 1:
            return
        import torch.distributed as dist

        gathered: list[Any] = [None] * trainer.world_size
        dist.all_gather_object(gathered, self.summary)
        reference = gathered[0]
        differing = {rank: sorted(k for k in set(s) | set(reference) if s.get(k) != reference.get(k))
                     for rank, s in enumerate(gathered) if s != reference}
        if differing:
            lines = "; ".join(f"rank {rank} differs from rank 0 in {', '.join(keys)}"
                              for rank, keys in differing.items())
            raise ValueError(f"ranks disagree about the run ({lines}): every node must be launched "
                             "with the same config overrides, prepared data and tokenizer")


class AlignBatchProgress(Callback):
    """Re-express Lightning's restored micro-batch counters in this run's accumulation.

    Lightning counts *micro-batches*: it steps the optimizer when the epoch's batch count
    is a multiple of `accumulate_grad_batches` and validates every `val_check_batch` of
    them. A checkpoint stores those counts in the accumulation of the run that wrote it.
    Resumed at another world size or micro-batch size (same global batch), the counts are
    in the wrong unit: optimizer steps then straddle two global batches (e.g. 3 steps x 2
    micro-batches = 6 restored, new accumulation 4: the next step is taken after 2) and the
    final validation is skipped. The sampler's position is the optimizer step, so the right
    counts follow from `global_step` alone; the shift keeps Lightning's restart offsets
    (a checkpoint written in `on_train_batch_end` has completed = ready - 1).
    """

    def on_train_start(self, trainer, pl_module) -> None:
        # Runs after the loops' state is restored and before the epoch loop's restart reset.
        accumulation = trainer.accumulate_grad_batches
        batches_per_pass = trainer.num_training_batches
        if batches_per_pass == float("inf") or trainer.global_step == 0:
            return
        steps_per_pass = int(batches_per_pass) // accumulation
        progress = trainer.fit_loop.epoch_loop.batch_progress
        in_pass = trainer.global_step - trainer.current_epoch * steps_per_pass
        for tracker, target in ((progress.current, in_pass * accumulation),
                                (progress.total, trainer.global_step * accumulation)):
            shift = target - tracker.ready
            if shift:
                for field in ("ready", "started", "processed", "completed"):
                    setattr(tracker, field, getattr(tracker, field) + shift)


def build_callbacks(cfg: DictConfig, output_dir: Path, identity: dict[str, Any] | None = None) -> list:
    callbacks: list = [OnlineMixing(), AtomicModelCheckpoint(
        identity=identity,
        dirpath=str(checkpoints_dir_of(output_dir)),
        filename="step{step:06d}",
        auto_insert_metric_name=False,
        every_n_train_steps=cfg.checkpoint.every_n_steps,
        save_top_k=-1,
        save_last=True,
    )]
    if cfg.get("logger") and cfg.logger.get("_target_"):
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    callbacks.append(RankAgreement(config_digest(cfg), identity))
    callbacks.append(AlignBatchProgress())
    callbacks.append(Preemption())  # SIGUSR1/SIGTERM: checkpoint at the next step, stop (requeue under SLURM)
    callbacks.append(NonFiniteLoss())  # NaN/inf loss: every rank stops before applying the step
    callbacks.append(ValidateAtStop(cfg.run.total_steps))  # `+trainer.max_steps` stop: a final validation
    if cfg.get("record_consumed"):
        callbacks.append(ConsumedExamplesLog(output_dir / "consumed"))
    return callbacks


class ValidateAtStop(Callback):
    """A run stopped by `+trainer.max_steps` before `run.total_steps` validates at its last step
    (asking the loop to stop makes Lightning validate then), and the step of the last
    validation is kept for results.json (`validated_at_step`)."""

    def __init__(self, planned_steps: int):
        self.planned_steps = planned_steps
        self.validated_at: int | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= trainer.max_steps and trainer.max_steps < self.planned_steps:
            trainer.should_stop = True  # same on every rank: a pure function of the step

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.validated_at = trainer.global_step
