"""Preemption: a signal saves a complete checkpoint at the next optimizer step, then the run stops.

SLURM sends the signal the generated sbatch script asks for (``--signal=USR1@<seconds>``,
`pipeline/training/slurm.py`) some time before the job's time limit, and SIGTERM when it preempts or
cancels a job (SIGKILL follows after the cluster's grace time). `Preemption` handles both:

* the signal handler only sets a flag (no I/O, no collectives inside a handler);
* after each optimizer step every rank all-reduces its flag, so all ranks see the same
  decision at the same step, even when only one of them got the signal;
* they then save through the run's `AtomicModelCheckpoint` -- the path periodic
  checkpoints take -- so the checkpoint is complete or absent and ``checkpoints/last.json``
  names it once every rank has written;
* under SLURM rank zero runs ``scontrol requeue $SLURM_JOB_ID`` (the requeued job runs the
  same script, which passes ``ckpt_path=last``), and every rank stops with `Preempted`
  (a `SystemExit`, status 1, one line: ``stopped by SIGUSR1 at step N; ...``).

Lightning's own SLURM auto-requeue (``hpc_ckpt_*.ckpt`` written outside ``last.json``) is
disabled with `cluster_plugins`, and Lightning's SIGTERM handler (which kills the launched
ranks and raises at the next batch, without a checkpoint) is replaced once training starts.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback

from pipeline.training.checkpointing import AtomicModelCheckpoint

log = logging.getLogger(__name__)

PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(SystemExit):
    """Training stopped by a signal after a complete checkpoint (exit status 1, one line)."""

    def __init__(self, message: str, step: int, checkpoint: str | None):
        super().__init__(message)
        self.message, self.step, self.checkpoint = message, step, checkpoint


def cluster_plugins() -> list:
    """Trainer plugins for the cluster: under SLURM, Lightning's environment without its
    auto-requeue (so it never installs its SIGUSR1 handler nor writes ``hpc_ckpt_*.ckpt``)."""
    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def slurm_job_id() -> str | None:
    """The job to requeue (``<array job>_<task>`` for array jobs), or None outside SLURM."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID") or None


def requeue_slurm_job(job_id: str) -> bool:
    """``scontrol requeue <job_id>``; False (logged) when it fails or scontrol is missing."""
    if not re.fullmatch(r"[0-9_]+", job_id):
        log.warning("not requeueing SLURM job %r: not a job id", job_id)
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        log.warning("scontrol requeue %s failed: %s", job_id, error)
        return False
    if result.returncode != 0:
        log.warning("scontrol requeue %s failed (status %d): %s", job_id, result.returncode, result.stderr.strip())
        return False
    log.info("requeued SLURM job %s", job_id)
    return True


class Preemption(Callback):
    """Save a complete checkpoint and stop (requeue under SLURM) after a preemption signal.

    Args:
        signals: signals that request the stop (default SIGUSR1 and SIGTERM).
        requeue: requeue the SLURM job from rank zero (default: when ``SLURM_JOB_ID`` is set).
    """

    def __init__(self, signals: tuple[int, ...] = PREEMPTION_SIGNALS, requeue: bool | None = None):
        self.signals = tuple(signals)
        self.requeue = requeue
        self.received: int | None = None  # the signal number this process got, if any
        self._previous: dict[int, Any] = {}
        self._step_seen = -1

    # -- signal handling (the handler only records) -----------------------------------------
    def _handler(self, signum: int, frame) -> None:  # noqa: ARG002
        if self.received is None:
            self.received = signum
            # os.write: safe in a handler (logging takes locks the interrupted code may hold).
            os.write(2, f"received {signal.Signals(signum).name}: saving a checkpoint after the "
                        "current optimizer step\n".encode())

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers (e.g. a notebook's worker thread)
        for signum in self.signals:
            previous = signal.signal(signum, self._handler)
            self._previous.setdefault(signum, previous)

    def _restore(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, previous in self._previous.items():
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_start(self, trainer, pl_module) -> None:
        # Installed here, after Lightning registered its own SIGTERM handler (kill the launched
        # ranks, raise at the next batch, no checkpoint), which ours replaces for the training
        # loop. Lightning's teardown restores what was there before it, so installing earlier
        # would leave ours behind after `fit`. Before this point a signal acts as it would
        # without this callback (there is no training progress to save yet).
        self._install()
        self._step_seen = trainer.global_step

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore()

    # -- the safe point: after an optimizer step, all ranks together ------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step_seen:
            return  # mid accumulation: no optimizer step since the last check
        self._step_seen = trainer.global_step
        if trainer.global_step >= trainer.max_steps:
            return  # the last step: the run completes and saves its final checkpoint anyway
        # Every rank reaches each optimizer step, so this collective is matched on every rank.
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        self.stop(trainer)

    def stop(self, trainer) -> None:
        step = trainer.global_step
        checkpoint = self._save(trainer)
        name = signal.Signals(self.received).name if self.received else "a signal on another rank"
        job = slurm_job_id()
        requeue = self.requeue if self.requeue is not None else job is not None
        if requeue and job is not None:
            requeued = requeue_slurm_job(job) if trainer.is_global_zero else None
            then = {True: f"SLURM job {job} requeued; it resumes with ckpt_path=last",
                    False: f"requeueing SLURM job {job} failed; resubmit it with ckpt_path=last",
                    None: f"rank 0 requeues SLURM job {job}"}[requeued]
        else:
            then = "resume with ckpt_path=last"
        where = f" ({Path(checkpoint).name})" if checkpoint else ""
        raise Preempted(f"stopped by {name} at step {step}; checkpoint at step {step}{where}; {then}",
                        step, checkpoint)

    @staticmethod
    def _save(trainer) -> str | None:
        """The run's periodic checkpoint path (atomic, then last.json), all ranks together."""
        callbacks = [c for c in trainer.checkpoint_callbacks if isinstance(c, AtomicModelCheckpoint)]
        if not callbacks:
            log.warning("no AtomicModelCheckpoint callback: stopping without a checkpoint")
            return None
        callback = callbacks[0]
        # Saves under the step's name unless this step is already saved; rewrites last.json.
        callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))
        return callback._last_checkpoint_saved
