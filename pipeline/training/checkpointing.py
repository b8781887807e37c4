"""Checkpoints that are complete or absent, and a pointer to the last complete one.

Lightning's `TorchCheckpointIO` writes the final path directly, so a process killed while
saving leaves a truncated file that `ckpt_path=last` would then pick. Here the bytes go
to a temporary file in the same directory, are fsynced, and replace the target with one
`os.replace`; readers see the old checkpoint or the new one, never half of one. Sharded
DeepSpeed checkpoints (a directory of per-rank shards) are staged in a hidden directory
and renamed once every rank has written. `checkpoints/last.json` names the newest complete
checkpoint and is what `ckpt_path=last` resolves through.

Every checkpoint carries checksums taken while it was written (pipeline/storage/integrity.py,
XXH3-128): a file checkpoint ``stepN.ckpt`` has ``stepN.ckpt.checksum.json`` beside it
(written before the checkpoint is published), a sharded directory holds
``mixpipe_integrity/checksums.json`` over each of its files (written into the staging directory before
it is renamed into place). They are verified before a checkpoint is used; a corrupted
checkpoint is an error naming the file, and ``ckpt_path=last`` then falls back to the newest
checkpoint that verifies, saying which one it skipped. Checkpoints written before checksums
existed still load, with a warning that they are unverified: refusing them would strand runs
whose checkpoints were fine, and nothing recorded could tell good from bad for them anyway.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any
from weakref import proxy

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from pipeline.storage.atomic import atomic_write, atomic_write_json, reraise_disk_full
from pipeline.storage.integrity import (
    ALGORITHM,
    IntegrityError,
    checksum_files,
    files_under,
    new_hasher,
    verify_files,
)
from pipeline.training.strategies import is_sharded

log = logging.getLogger(__name__)


class _HashingWriter:
    """A write-only stream that hashes what passes through it (no second read of the file)."""

    def __init__(self, stream, hasher):
        self.stream, self.hasher, self.size = stream, hasher, 0

    def write(self, data) -> int:
        self.hasher.update(data)
        self.size += len(memoryview(data).cast("B"))
        return self.stream.write(data)

    def flush(self) -> None:
        self.stream.flush()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint files published atomically, with a checksum record written first, and
    verified before they load."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        record = checksum_path(path)
        previous = record.read_bytes() if record.is_file() else None
        wrote_record = False

        def write(stream) -> None:
            nonlocal wrote_record
            writer = _HashingWriter(stream, new_hasher(ALGORITHM))
            torch.save(checkpoint, writer)
            # The record goes first: a crash before the rename leaves a record that does not
            # match (this checkpoint is refused, the previous one is used), never a checkpoint
            # without its record.
            atomic_write_json(record, {"algorithm": ALGORITHM, "global_step": checkpoint.get("global_step"),
                                       "files": {path.name: {"size": writer.size,
                                                             "digest": writer.hasher.hexdigest()}}},
                              **_JSON_FORMAT)
            wrote_record = True

        try:
            with reraise_disk_full(path):
                atomic_write(path, write, binary=True, suffix=_STAGING_SUFFIX)
        except BaseException:
            if wrote_record:  # the checkpoint was not replaced: put its own record back
                if previous is None:
                    record.unlink(missing_ok=True)
                else:
                    atomic_write(record, lambda stream: stream.write(previous), binary=True, suffix=_STAGING_SUFFIX)
            raise

    def load_checkpoint(self, path, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        verify_checkpoint(Path(path))  # free when resolve_checkpoint verified it already
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        checksum_path(Path(path)).unlink(missing_ok=True)


# -- periodic checkpoints and the "last complete checkpoint" pointer ---------------------------

POINTER_NAME = "last.json"
IDENTITY_KEY = "mixpipe_identity"  # what the run was (data, tokenizer, model shape), in every checkpoint
_STAGING_SUFFIX = ".tmp"
_ASIDE_SUFFIX = ".old"
# Pointer, identity and checksum files: sorted, indented JSON (anything else as str), staged as
# `.<name>.<random>.tmp` beside the target; `atomic_write_json(path, obj, **_JSON_FORMAT)`.
_JSON_FORMAT: dict[str, Any] = {"suffix": _STAGING_SUFFIX, "indent": 2, "sort_keys": True, "default": str}
CHECKSUM_SUFFIX = ".checksum.json"  # beside a file checkpoint: <name>.checksum.json
# Inside a sharded (directory) checkpoint, in a folder of its own: tools that rebuild a
# directory from another (pipeline/training/zero_checkpoint.py resharding) copy its top-level files, and a
# record of the old shards would then describe files the new directory does not have.
SHARD_CHECKSUMS = "mixpipe_integrity/checksums.json"
_STEP_RE = re.compile(r"step=?(\d+)")


class CheckpointError(ValueError):
    """A checkpoint path, pointer or identity that cannot be resumed from."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint whose bytes differ from the checksums recorded when it was written."""


def checksum_path(checkpoint: Path) -> Path:
    """Where a checkpoint's checksum record lives (inside a directory, beside a file)."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        return checkpoint / SHARD_CHECKSUMS
    return checkpoint.with_name(checkpoint.name + CHECKSUM_SUFFIX)


def write_shard_checksums(directory: Path, global_step: int | None = None) -> Path:
    """Checksum every file of a sharded checkpoint directory into ``mixpipe_integrity/checksums.json``
    (call on the staging directory, before it is published)."""
    directory = Path(directory)
    record = checksum_files(directory, files_under(directory, exclude=[SHARD_CHECKSUMS]))
    record["global_step"] = global_step
    target = directory / SHARD_CHECKSUMS
    atomic_write_json(target, record, **_JSON_FORMAT)
    return target


_verified: dict[str, tuple] = {}  # path -> stat signature of what verified, so a re-check is free


def _signature(checkpoint: Path) -> tuple:
    paths = sorted(p for p in checkpoint.rglob("*") if p.is_file()) if checkpoint.is_dir() else [
        checkpoint, checksum_path(checkpoint)]
    out = []
    for path in paths:
        try:
            stat = path.stat()
        except OSError:
            return ()
        out.append((str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino))
    return tuple(out)


def verify_checkpoint(checkpoint: Path) -> bool:
    """Check a checkpoint against the checksums recorded when it was written.

    Returns True when it verified, False for a checkpoint with no checksum record (written
    before checksums existed: usable, unverified; a warning says so).

    Raises:
        CorruptCheckpointError: naming the file that is missing, truncated or changed.
    """
    checkpoint = Path(checkpoint)
    record_path = checksum_path(checkpoint)
    signature = _signature(checkpoint)
    if signature and _verified.get(str(checkpoint)) == signature:
        return True
    if not record_path.is_file():
        _rank_zero_warning(f"checkpoint {checkpoint} has no checksum record (written before checksums existed?); "
                           "using it unverified")
        return False
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError) as error:
        raise CorruptCheckpointError(f"checkpoint {checkpoint}: checksum record {record_path} is unreadable: "
                                     f"{error}") from error
    root = checkpoint if checkpoint.is_dir() else checkpoint.parent
    try:
        verify_files(root, record, f"sharded checkpoint {checkpoint}" if checkpoint.is_dir() else "checkpoint")
    except IntegrityError as error:
        raise CorruptCheckpointError(str(error)) from error
    if signature:
        _verified[str(checkpoint)] = signature
    return True


def _rank_zero_warning(message: str) -> None:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) == 0:
        log.warning("%s", message)


def _recorded_step(checkpoint: Path) -> int:
    """The global step a checkpoint was saved at (its checksum record, else its name; -1)."""
    try:
        step = json.loads(checksum_path(checkpoint).read_text()).get("global_step")
        if isinstance(step, int):
            return step
    except (OSError, ValueError, AttributeError):
        pass
    match = _STEP_RE.search(checkpoint.name)
    return int(match.group(1)) if match else -1


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Published checkpoints in a directory, newest (highest step, then mtime) first: files
    ending in ``.ckpt`` and directories; staging, set-aside and hidden entries excluded."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.iterdir()
             if not p.name.startswith(".") and (p.is_dir() or (p.is_file() and p.suffix == ".ckpt"))]
    return sorted(found, key=lambda p: (_recorded_step(p), p.stat().st_mtime_ns, p.name), reverse=True)


def newest_verified_checkpoint(checkpoints_dir: Path, skip: Path | None = None) -> tuple[Path | None, list[str]]:
    """(newest checkpoint that verifies or predates checksums, one line per corrupted one skipped)."""
    skipped = []
    for candidate in complete_checkpoints(checkpoints_dir):
        if skip is not None and candidate == Path(skip):
            continue
        try:
            verify_checkpoint(candidate)
        except CorruptCheckpointError as error:
            skipped.append(str(error))
            continue
        return candidate, skipped
    return None, skipped


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
    atomic_write_json(pointer, payload, **_JSON_FORMAT)
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
        return _resolve_last(Path(checkpoints_dir))
    path = Path(ckpt_path)
    if not path.exists():
        raise CheckpointError(f"ckpt_path={str(ckpt_path)!r} does not exist")
    if path.name.endswith(_STAGING_SUFFIX) or path.name.endswith(_ASIDE_SUFFIX):
        raise CheckpointError(f"ckpt_path={str(ckpt_path)!r} is an incomplete (staging) checkpoint")
    verify_checkpoint(path)  # an explicit path that is corrupted is an error naming it
    return path


def _resolve_last(checkpoints_dir: Path) -> Path | None:
    """`last.json`'s checkpoint if it verifies; else the newest checkpoint that does, with one
    warning line naming what was skipped and why; None when there is no checkpoint at all."""
    try:
        pointer = read_last_pointer(checkpoints_dir)
    except CheckpointError as error:
        pointer_problem: CheckpointError | None = error
        pointer = None
    else:
        pointer_problem = None
    if pointer is not None:
        try:
            verify_checkpoint(pointer["path"])
            return pointer["path"]
        except CorruptCheckpointError as error:
            pointer_problem = error
    fallback, skipped = newest_verified_checkpoint(checkpoints_dir, skip=None if pointer is None else pointer["path"])
    if pointer_problem is not None:
        if fallback is None:
            raise pointer_problem if not skipped else CorruptCheckpointError(
                f"{pointer_problem}; no other checkpoint in {checkpoints_dir} verifies either: " + "; ".join(skipped))
        reasons = "; ".join([str(pointer_problem), *skipped])
        _rank_zero_warning(f"ckpt_path=last: falling back to {fallback} (newest checkpoint that verifies): {reasons}")
        return fallback
    if fallback is not None:  # no last.json, yet complete checkpoints exist (e.g. it was deleted)
        extra = f"; skipped: {'; '.join(skipped)}" if skipped else ""
        _rank_zero_warning(f"ckpt_path=last: {checkpoints_dir / POINTER_NAME} is missing; resuming from {fallback}, "
                           f"the newest complete checkpoint that verifies{extra}")
        return fallback
    if skipped:
        raise CorruptCheckpointError(f"ckpt_path=last: no checkpoint in {checkpoints_dir} verifies: "
                                     + "; ".join(skipped))
    return None


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
            # A checksum record whose checkpoint was never published (killed in between).
            for record in Path(self.dirpath).glob(f"*{CHECKSUM_SUFFIX}"):
                if not record.with_name(record.name[: -len(CHECKSUM_SUFFIX)]).exists():
                    record.unlink(missing_ok=True)
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
        with reraise_disk_full(staging):
            trainer.save_checkpoint(staging, self.save_weights_only)  # every rank writes its shard
        trainer.strategy.barrier("mixpipe_shards_written")
        if trainer.is_global_zero:
            atomic_write_json(staging / f"{IDENTITY_KEY}.json", self.identity or {}, **_JSON_FORMAT)
            # Checksums of every file, in the staging directory before it is published. (Shards
            # on other nodes' local disks are not visible here; with a shared file system they are.)
            write_shard_checksums(staging, trainer.global_step)
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


def checkpoints_dir_of(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"
