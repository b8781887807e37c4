"""Checkpoints that are complete or absent, and a pointer to the last complete one.

Lightning's `TorchCheckpointIO` writes the final path directly, so a process killed while
saving leaves a truncated file that `ckpt_path=last` would then pick. Here the bytes go
to a temporary file in the same directory, are fsynced, and replace the target with one
`os.replace`; readers see the old checkpoint or the new one, never half of one. Sharded
DeepSpeed checkpoints (a directory of per-rank shards) are staged in a hidden directory
and renamed once every rank has written. `checkpoints/last.json` names the newest complete
checkpoint and is what `ckpt_path=last` resolves through.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any
from weakref import proxy

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from pipeline.atomic import atomic_write, atomic_write_json
from pipeline.strategies import is_sharded


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_write(path, lambda stream: torch.save(checkpoint, stream), binary=True, suffix=_STAGING_SUFFIX)


# -- periodic checkpoints and the "last complete checkpoint" pointer ---------------------------

POINTER_NAME = "last.json"
IDENTITY_KEY = "mixpipe_identity"  # what the run was (data, tokenizer, model shape), in every checkpoint
_STAGING_SUFFIX = ".tmp"
_ASIDE_SUFFIX = ".old"


class CheckpointError(ValueError):
    """A checkpoint path, pointer or identity that cannot be resumed from."""


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Indented, sorted JSON published atomically (pointer and identity files)."""
    atomic_write_json(path, payload, suffix=_STAGING_SUFFIX, indent=2, sort_keys=True, default=str)


def write_last_pointer(checkpoints_dir: Path, checkpoint: Path, global_step: int,
                       identity: dict[str, Any] | None) -> Path:
    """Name `checkpoint` (complete, inside `checkpoints_dir`) as the run's last checkpoint.

    The pointer is ``<checkpoints_dir>/last.json``: ``{"checkpoint": <name relative to the
    directory>, "global_step": int, "sharded": bool, "identity": {...}}``. Relative, so a run
    directory can be moved or mounted elsewhere.
    """
    checkpoints_dir, checkpoint = Path(checkpoints_dir), Path(checkpoint)
    payload = {"checkpoint": os.path.relpath(checkpoint, checkpoints_dir), "global_step": int(global_step),
               "sharded": checkpoint.is_dir(), "identity": identity}
    pointer = checkpoints_dir / POINTER_NAME
    write_json_atomic(pointer, payload)
    return pointer


def read_last_pointer(checkpoints_dir: Path) -> dict[str, Any] | None:
    """The pointer's content with `path` resolved, or None when no checkpoint completed yet.

    Raises:
        CheckpointError: the pointer is unreadable or names a checkpoint that is gone.
    """
    pointer = Path(checkpoints_dir) / POINTER_NAME
    if not pointer.is_file():
        return None
    try:
        payload = json.loads(pointer.read_text())
        path = Path(checkpoints_dir) / payload["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"checkpoint pointer {pointer} is unreadable: {error}") from error
    if not path.exists():
        raise CheckpointError(f"checkpoint pointer {pointer} names {path}, which does not exist")
    return {**payload, "path": path}


def resolve_checkpoint(ckpt_path: str | os.PathLike | None, checkpoints_dir: Path) -> Path | None:
    """`ckpt_path` from the config as a checkpoint to load: None, "last" or a path.

    "last" follows ``<checkpoints_dir>/last.json``; with no pointer yet (the first start of a
    job that is always launched with ``ckpt_path=last``) it returns None: train from scratch.

    Raises:
        CheckpointError: an explicit path that does not exist, or a broken pointer.
    """
    if ckpt_path is None or str(ckpt_path) == "":
        return None
    if str(ckpt_path) == "last":
        pointer = read_last_pointer(checkpoints_dir)
        return None if pointer is None else pointer["path"]
    path = Path(ckpt_path)
    if not path.exists():
        raise CheckpointError(f"ckpt_path={str(ckpt_path)!r} does not exist")
    if path.name.endswith(_STAGING_SUFFIX) or path.name.endswith(_ASIDE_SUFFIX):
        raise CheckpointError(f"ckpt_path={str(ckpt_path)!r} is an incomplete (staging) checkpoint")
    return path


def read_identity(checkpoint: Path) -> dict[str, Any] | None:
    """The run identity a checkpoint was written with (None for checkpoints without one).

    A file checkpoint holds it under ``mixpipe_identity``; a sharded (DeepSpeed) directory
    holds it in ``mixpipe_identity.json`` so it is read without loading any shard.
    """
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        sidecar = checkpoint / f"{IDENTITY_KEY}.json"
        return json.loads(sidecar.read_text()) if sidecar.is_file() else None
    try:
        state = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=False)
    except Exception as error:  # noqa: BLE001  (torch raises several types for a bad file)
        raise CheckpointError(f"checkpoint {checkpoint} cannot be read: {error}") from error
    return state.get(IDENTITY_KEY)


def identity_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One line per identity key whose value differs: `key: checkpoint X, this run Y`."""
    lines = []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            lines.append(f"{key}: checkpoint {_short(saved.get(key))}, this run {_short(current.get(key))}")
    return lines


def _short(value: Any, limit: int = 300) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class AtomicModelCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` whose checkpoints are complete or absent, plus a "last" pointer.

    * File checkpoints (single device, DDP) go through the strategy's `AtomicCheckpointIO`.
    * Sharded checkpoints (DeepSpeed: a directory, one shard per rank) are written into
      ``.<name>.tmp`` by every rank, then renamed by rank zero after a barrier.
    * After a checkpoint is complete on every rank, rank zero atomically rewrites
      ``last.json`` to name it. ``ckpt_path=last`` follows only that pointer, so a writer
      killed mid-checkpoint leaves the previous checkpoint as "last".
    * "Last" is the newest step checkpoint, never a second copy: at the end of a run the
      final step is saved under its step name if the periodic schedule missed it.

    Args:
        identity: what the run is (sources, mixture, tokenizer, model shape), stored in every
            checkpoint and in the pointer so a resume can check it before loading anything.
    """

    def __init__(self, *args: Any, identity: dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.identity = identity

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath and Path(self.dirpath).is_dir():
            # Leftovers of a writer that was killed: never complete, never pointed at.
            for stale in Path(self.dirpath).glob(f".*{_STAGING_SUFFIX}"):
                _remove(stale)
        trainer.strategy.barrier("mixpipe_checkpoint_setup")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[IDENTITY_KEY] = self.identity

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        target = Path(filepath)
        if is_sharded(trainer.strategy):
            self._save_sharded(trainer, target)
        else:
            trainer.save_checkpoint(target, self.save_weights_only)  # AtomicCheckpointIO: temp + rename
        trainer.strategy.barrier("mixpipe_checkpoint_saved")
        if trainer.is_global_zero:
            write_last_pointer(Path(self.dirpath), target, trainer.global_step, self.identity)
        trainer.strategy.barrier("mixpipe_pointer_written")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = str(target)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def _save_sharded(self, trainer, target: Path) -> None:
        staging = target.with_name(f".{target.name}{_STAGING_SUFFIX}")
        if trainer.is_global_zero:
            _remove(staging)
        trainer.strategy.barrier("mixpipe_staging_clean")
        trainer.save_checkpoint(staging, self.save_weights_only)  # every rank writes its shard
        trainer.strategy.barrier("mixpipe_shards_written")
        if trainer.is_global_zero:
            write_json_atomic(staging / f"{IDENTITY_KEY}.json", self.identity or {})
            aside = target.with_name(f".{target.name}{_ASIDE_SUFFIX}{_STAGING_SUFFIX}")
            if target.exists():  # re-saving a step (after a resume): move the old one aside first
                _remove(aside)
                os.replace(target, aside)
            os.replace(staging, target)
            _fsync_directory(target.parent)
            _remove(aside)

    def _save_last_checkpoint(self, trainer, monitor_candidates: dict[str, Any]) -> None:
        if not self.save_last:
            return
        if self._last_global_step_saved != trainer.global_step or not self._last_checkpoint_saved:
            self._save_checkpoint(trainer, self.format_checkpoint_name(monitor_candidates))
        self.last_model_path = self._last_checkpoint_saved

    def on_train_end(self, trainer, pl_module) -> None:
        # Lightning saves "last" only at steps the periodic schedule hit; a finished run's
        # final state must be resumable too (e.g. to extend the run).
        if self.save_last and trainer.global_step > 0 and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable (POSIX: the directory entry lives in the directory's inode)."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


# Identity keys a resume may override with `resume.allow_mismatch=true`: the weights still
# fit. A different model shape never loads, so it is always an error.
OVERRIDABLE = ("sources", "mixture", "sampler_stream", "tokenizer")


def check_resume_identity(checkpoint: Path, current: dict[str, Any], allow_mismatch: bool = False) -> list[str]:
    """Compare a checkpoint's identity with this run's before anything is loaded.

    Returns the differing keys (empty when they agree) when `allow_mismatch` lets them through.

    Raises:
        CheckpointError: a difference (naming each key, with both values) and the flag is off,
            or the model shape differs (the weights cannot load whatever the flag says).
    """
    saved = read_identity(checkpoint)
    if saved is None:
        if allow_mismatch:
            return []
        raise CheckpointError(f"checkpoint {checkpoint} records no run identity (written outside "
                              "pipeline.train?); pass resume.allow_mismatch=true to resume from it anyway")
    differences = identity_differences(saved, current)
    if not differences:
        return []
    keys = [line.split(":", 1)[0] for line in differences]
    detail = "\n  ".join(differences)
    if "model_shape" in keys:
        raise CheckpointError(f"cannot resume from {checkpoint}: the model shape differs, so its weights "
                              f"cannot load:\n  {detail}")
    if not allow_mismatch:
        raise CheckpointError(f"cannot resume from {checkpoint}: this run differs in {', '.join(keys)}:\n  "
                              f"{detail}\npass resume.allow_mismatch=true to continue the model with this run's "
                              "data (the data stream restarts its bookkeeping at the checkpoint's step)")
    return keys
