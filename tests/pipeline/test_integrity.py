"""Issue 11: corruption is caught by checksums, progress is not lost, a full disk says so.

Checkpoints (pipeline/training/checkpointing.py) and prepared sources (written by
pipeline/data/build_corpus.py, verified by pipeline/data/corpus.py) carry checksums written when
they are saved and verified before they are used.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import pytest
import torch

import pipeline.storage.atomic
from pipeline.storage.atomic import atomic_write
from pipeline.storage.integrity import file_digest
from pipeline.training.checkpointing import (
    CHECKSUM_SUFFIX,
    SHARD_CHECKSUMS,
    AtomicCheckpointIO,
    CorruptCheckpointError,
    checksum_path,
    resolve_checkpoint,
    verify_checkpoint,
    write_last_pointer,
    write_shard_checksums,
)


def _save(checkpoints: Path, step: int, value: float = 0.0) -> Path:
    path = checkpoints / f"step{step:06d}.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": step, "weights": torch.full((4096,), value)}, path)
    return path


def _corrupt(path: Path, size: int = 4096) -> None:
    """Overwrite `size` bytes in the middle with random bytes: same file size."""
    before = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.seek(before // 2 - size // 2)
        handle.write(os.urandom(size))
    assert path.stat().st_size == before


# -- checkpoints -------------------------------------------------------------------------------

def test_a_checkpoint_carries_the_checksum_of_its_bytes(tmp_path):
    path = _save(tmp_path, 4)
    record = json.loads(checksum_path(path).read_text())
    assert checksum_path(path).name == "step000004.ckpt" + CHECKSUM_SUFFIX
    assert record["global_step"] == 4
    assert record["files"]["step000004.ckpt"] == {"size": path.stat().st_size,
                                                   "digest": file_digest(path, record["algorithm"])}
    assert verify_checkpoint(path) is True


def test_a_corrupted_checkpoint_is_an_error_naming_it(tmp_path):
    path = _save(tmp_path, 4)
    _corrupt(path)
    with pytest.raises(CorruptCheckpointError, match=r"step000004\.ckpt is corrupted"):
        resolve_checkpoint(path, tmp_path)
    with pytest.raises(CorruptCheckpointError, match=r"step000004\.ckpt is corrupted"):
        AtomicCheckpointIO().load_checkpoint(path)  # Lightning's own load path checks too


def test_last_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path, caplog):
    good = _save(tmp_path, 2)
    bad = _save(tmp_path, 4)
    write_last_pointer(tmp_path, bad, 4, None)
    _corrupt(bad)
    with caplog.at_level(logging.WARNING, logger="pipeline.training.checkpointing"):
        assert resolve_checkpoint("last", tmp_path) == good
    [line] = [r.getMessage() for r in caplog.records]
    assert "falling back to" in line and str(good) in line and "step000004.ckpt is corrupted" in line
    assert "\n" not in line


def test_last_with_only_corrupted_checkpoints_is_an_error_not_a_fresh_start(tmp_path):
    bad = _save(tmp_path, 4)
    write_last_pointer(tmp_path, bad, 4, None)
    _corrupt(bad)
    with pytest.raises(CorruptCheckpointError, match=r"step000004\.ckpt is corrupted"):
        resolve_checkpoint("last", tmp_path)


def test_last_without_its_pointer_uses_the_newest_complete_checkpoint(tmp_path, caplog):
    _save(tmp_path, 2)
    newest = _save(tmp_path, 10)
    _save(tmp_path, 6)  # written later, but an earlier step
    (tmp_path / ".step000012.ckpt.tmp").mkdir()  # a staging leftover is never a candidate
    assert not (tmp_path / "last.json").exists()
    with caplog.at_level(logging.WARNING, logger="pipeline.training.checkpointing"):
        assert resolve_checkpoint("last", tmp_path) == newest
    assert "last.json is missing; resuming from" in caplog.text and str(newest) in caplog.text


def test_a_checkpoint_without_checksums_still_loads_with_a_warning(tmp_path, caplog):
    path = tmp_path / "step000004.ckpt"
    torch.save({"global_step": 4}, path)  # as written before checksums existed
    with caplog.at_level(logging.WARNING, logger="pipeline.training.checkpointing"):
        assert resolve_checkpoint(path, tmp_path) == path
    assert "has no checksum record" in caplog.text and "unverified" in caplog.text
    assert AtomicCheckpointIO().load_checkpoint(path)["global_step"] == 4


def test_sharded_checkpoint_directories_checksum_each_file(tmp_path):
    staging = tmp_path / ".step000004.ckpt.tmp"
    (staging / "checkpoint").mkdir(parents=True)
    for rank in range(2):
        torch.save({"shard": torch.full((2048,), float(rank))},
                   staging / "checkpoint" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    (staging / "latest").write_text("checkpoint")
    write_shard_checksums(staging, 4)
    target = tmp_path / "step000004.ckpt"
    os.replace(staging, target)  # what AtomicModelCheckpoint._save_sharded does after the record
    record = json.loads((target / SHARD_CHECKSUMS).read_text())
    # Not a top-level file: resharding (pipeline/training/zero_checkpoint.py) copies those into the new directory.
    assert sorted(p.name for p in target.iterdir() if p.is_file()) == ["latest"]
    assert sorted(record["files"]) == ["checkpoint/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                       "checkpoint/zero_pp_rank_1_mp_rank_00_optim_states.pt", "latest"]
    assert verify_checkpoint(target) is True
    _corrupt(target / "checkpoint" / "zero_pp_rank_1_mp_rank_00_optim_states.pt", 1024)
    with pytest.raises(CorruptCheckpointError, match=r"zero_pp_rank_1_mp_rank_00_optim_states\.pt is corrupted"):
        resolve_checkpoint(target, tmp_path)


# -- a full disk ----------------------------------------------------------------------------------

class _FullDisk:
    """A stream whose device fills up after `room` bytes (what torch.save meets on a full disk)."""

    def __init__(self, stream, room: int):
        self.stream, self.room = stream, room

    def write(self, data) -> int:
        self.room -= len(data)
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.stream.write(data)

    def flush(self) -> None:
        self.stream.flush()


def test_a_full_disk_during_torch_save_names_the_path_and_errno(tmp_path):
    target = tmp_path / "step000004.ckpt"
    with pytest.raises(OSError) as raised:
        atomic_write(target, lambda stream: torch.save({"w": torch.zeros(10000)}, _FullDisk(stream, 1000)),
                     binary=True)
    message = str(raised.value)
    assert raised.value.errno == errno.ENOSPC
    assert str(target) in message and "errno 28 ENOSPC" in message and "\n" not in message
    assert "inline_container" not in message  # torch's RuntimeError is only the cause now
    assert not target.exists() and not list(tmp_path.iterdir())  # no temporary file left


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = _save(tmp_path, 4, value=1.0)

    def no_space(_fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pipeline.storage.atomic.os, "fsync", no_space)
    with pytest.raises(OSError, match=r"no space left writing .*step000004\.ckpt \(errno 28 ENOSPC"):
        AtomicCheckpointIO().save_checkpoint({"global_step": 4, "weights": torch.zeros(4096)}, path)
    monkeypatch.undo()
    assert verify_checkpoint(path) is True  # the old checkpoint and its own record, untouched
    assert torch.load(path, weights_only=False)["weights"][0] == 1.0


# -- prepared sources -------------------------------------------------------------------------------

class _Recipe:
    name = "tiny"

    def __init__(self):
        self.calls = 0

    def fingerprint(self):
        return {"recipe": self.name, "version": 1}

    def sources(self):
        from data_recipes.base import SourceRecords

        self.calls += 1
        yield SourceRecords("eng", "mono", [{"text": "the original sentence"}, {"text": "another one"}],
                            "eng", "Latn")


def test_a_prepared_arrow_file_edited_in_place_is_not_a_cache_hit(tmp_path, caplog):
    from pipeline.data.build_corpus import prepare_sources
    from pipeline.data.corpus import MANIFEST, PreparedCorpus

    corpus = prepare_sources(_Recipe(), tmp_path, progress=False)
    manifest = json.loads((corpus.path / MANIFEST).read_text())
    assert set(manifest["checksums"]["eng"]["files"]) >= {"data-00000-of-00001.arrow", "state.json"}
    [arrow] = (corpus.path / "sources" / "eng").glob("*.arrow")
    data = arrow.read_bytes()
    arrow.write_bytes(data.replace(b"the original sentence", b"THE ALTERED  SENTENCE"))  # same size
    assert arrow.stat().st_size == len(data)
    with pytest.raises(ValueError, match=r"prepared source 'eng': .*data-00000-of-00001\.arrow is corrupted"):
        PreparedCorpus.load(corpus.path)
    recipe = _Recipe()
    with caplog.at_level(logging.WARNING, logger="pipeline.data.build_corpus"):
        again = prepare_sources(recipe, tmp_path, progress=False)
    assert recipe.calls == 1  # rebuilt, not a cache hit
    [warning] = [r.getMessage() for r in caplog.records if r.name == "pipeline.data.build_corpus"]
    assert "data-00000-of-00001.arrow is corrupted" in warning and "rebuilding" in warning
    assert again.dataset("eng")[0]["text"] == "the original sentence"


def test_a_corpus_prepared_before_checksums_loads_with_a_warning(tmp_path, caplog):
    from pipeline.data.build_corpus import prepare_sources
    from pipeline.data.corpus import MANIFEST, PreparedCorpus

    corpus = prepare_sources(_Recipe(), tmp_path, progress=False)
    manifest = json.loads((corpus.path / MANIFEST).read_text())
    del manifest["checksums"]
    (corpus.path / MANIFEST).write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="pipeline.data.corpus"):
        assert PreparedCorpus.load(corpus.path).num_documents("eng") == 2
    assert any(r.name == "pipeline.data.corpus" and "has no checksums" in r.getMessage() for r in caplog.records)


def test_a_killed_preparation_leaves_no_temp_folder_for_good(tmp_path):
    import subprocess
    import sys

    from pipeline.data.build_corpus import make_temp_dir, prepare_sources

    prepared = tmp_path / "prepared"
    prepared.mkdir()
    # A temp folder owned by a process that is gone (what `kill -9` mid-build leaves) ...
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = make_temp_dir(prepared, "tiny-0123456789abcdef")
    orphan.rename(orphan.with_name(orphan.name.replace(f"-pid{os.getpid()}@", f"-pid{dead.stdout.strip()}@")))
    # ... one owned by a live process (ours: a concurrent build), and one from older code, fresh.
    live = make_temp_dir(prepared, "tiny-fedcba9876543210")
    unowned_fresh = prepared / ".tmp-tiny-0123456789abcdef-abc123"
    unowned_fresh.mkdir()
    unowned_old = prepared / ".tmp-tiny-0123456789abcdef-old999"
    unowned_old.mkdir()
    os.utime(unowned_old, (0, 0))
    prepare_sources(_Recipe(), tmp_path, progress=False)
    left = sorted(p.name for p in prepared.iterdir() if p.name.startswith(".tmp-"))
    assert left == sorted([live.name, unowned_fresh.name])


# -- end to end: a real run's checkpoints, last.json gone and the newest one corrupted -------------

def test_a_run_resumes_from_the_newest_verified_checkpoint_without_last_json(compose_config, demo_data, tmp_path,
                                                                             caplog):
    from pipeline.train import train

    HALF = 3  # checkpoints at steps 2 and 3 (the end of the first invocation); 6 steps in all
    run = ["experiment=demo", f"run.total_steps={2 * HALF}", "run.global_batch_size=8", "loader.micro_batch_size=4",
           "logger=none", "trainer.enable_progress_bar=false", "progress=false", "checkpoint.every_n_steps=2",
           "validation.documents_per_source=2", "evaluation.every_n_steps=null", "model.schedule.warmup_steps=2",
           f"cache_dir={demo_data[0].cache_dir}"]

    def _run(compose_config, demo_data, out, *overrides):
        return train(compose_config([*run, f"output_dir={out}", *overrides]))

    out = tmp_path / "run"
    first = _run(compose_config, demo_data, out, f"+trainer.max_steps={HALF}")
    assert first["global_steps"] == HALF
    checkpoints = out / "checkpoints"
    newest, older = checkpoints / f"step{HALF:06d}.ckpt", checkpoints / f"step{HALF - 1:06d}.ckpt"
    assert verify_checkpoint(newest) and verify_checkpoint(older)  # the training path writes records
    (checkpoints / "last.json").unlink()
    _corrupt(newest)
    with caplog.at_level(logging.WARNING, logger="pipeline.training.checkpointing"):
        second = _run(compose_config, demo_data, out, "ckpt_path=last")
    assert "last.json is missing; resuming from" in caplog.text and str(older) in caplog.text
    assert f"{newest} is corrupted" in caplog.text
    assert second["status"] == "completed" and second["global_steps"] == 2 * HALF
    assert verify_checkpoint(checkpoints / f"step{2 * HALF:06d}.ckpt")
    with pytest.raises(CorruptCheckpointError):  # the bad file is named, never deleted
        verify_checkpoint(newest)
