"""One run per output directory: a lock held for the whole run, and no silent overwrite.

`claim_output_dir` runs before any data is prepared:

* The job's launching process (global rank 0 by the launcher's variables: ``RANK`` under
  torchrun, ``SLURM_PROCID`` under srun, else ``NODE_RANK``/``LOCAL_RANK`` 0, i.e. the process
  a user started) takes a non-blocking ``flock`` on ``<output_dir>/.run.lock`` and writes who
  holds it (pid, host, job, start time) into that file. A second run is refused with a
  one-line `RunRefused` naming the holder. The kernel drops the lock when the process ends,
  however it ends, so a killed run leaves no stale lock behind.
* The other ranks of the same job take no lock (they would block their own rank 0); they
  wait until the holder is their job: the process that launched them (Lightning's DDP /
  DeepSpeed launcher re-runs the entry as child processes of rank 0), or the same job key
  (``SLURM_JOB_ID`` and step under srun; the rendezvous ``TORCHELASTIC_RUN_ID`` and
  ``MASTER_ADDR:MASTER_PORT`` under torchrun). A rank whose job never takes the lock (its
  rank 0 was refused) stops after `WAIT_S` seconds instead of hanging in the process group.
* With the lock held, rank 0 refuses a directory that holds a previous run (``results.json``
  or checkpoints) unless the run resumes (``ckpt_path`` set) or the user says
  ``overwrite=true``, which discards that run's results.json and checkpoints/ first (so new
  checkpoints never interleave with old ones nor ``last.json`` point at them).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.storage.atomic import discard_dir

log = logging.getLogger(__name__)

LOCK_NAME = ".run.lock"
WAIT_S = 120.0  # how long a non-zero rank waits for its own rank 0 to hold the lock


class RunRefused(SystemExit):
    """The run did not start: its output directory is busy or holds a previous run (status 1)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def launch_rank(env: Mapping[str, str] = os.environ) -> int:
    """This process's global rank as its launcher set it (0 for a process a user started)."""
    for name in ("RANK", "SLURM_PROCID"):
        value = env.get(name, "")
        if value.isdigit():
            return int(value)
    node = int(env.get("NODE_RANK") or env.get("GROUP_RANK") or 0)
    local = int(env.get("LOCAL_RANK") or 0)
    return 0 if node == 0 and local == 0 else 1 + local  # only "zero or not" matters here


def job_key(env: Mapping[str, str] = os.environ) -> str | None:
    """What every rank of one job shares and two concurrent jobs cannot (None: a plain process)."""
    if env.get("SLURM_JOB_ID"):
        job = (f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
               if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID") else env["SLURM_JOB_ID"])
        return f"slurm job {job} step {env.get('SLURM_STEP_ID', '-')}"
    if env.get("MASTER_PORT"):
        return (f"rendezvous {env.get('TORCHELASTIC_RUN_ID', '-')} at "
                f"{env.get('MASTER_ADDR', 'localhost')}:{env['MASTER_PORT']}")
    return None


def describe_holder(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process (it has not written who it is yet)"
    job = f", {holder['job']}" if holder.get("job") else ""
    started = holder.get("started")
    since = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}" if started else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}{since}"


def read_holder(path: Path) -> dict[str, Any] | None:
    """The holder record in a lock file (None: absent, empty or being written)."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


class RunDirLock:
    """A non-blocking exclusive ``flock`` on ``<output_dir>/.run.lock`` naming its holder."""

    def __init__(self, output_dir: Path, env: Mapping[str, str] = os.environ):
        self.path = Path(output_dir) / LOCK_NAME
        self.env = env
        self._fd: int | None = None

    def acquire(self) -> RunDirLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's record stays readable
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                # A file system without flock (some Lustre mounts): run, but say it is unguarded.
                log.warning("cannot lock %s (%s): two runs into this output_dir would not be refused",
                            self.path, error)
                return self
            holder = None
            for _ in range(20):  # the holder writes its record right after locking
                holder = read_holder(self.path)
                if holder:
                    break
                time.sleep(0.05)
            raise RunRefused(f"output_dir {self.path.parent} is in use by another run: {describe_holder(holder)}; "
                             "wait for it to finish or choose another output_dir") from None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "job": job_key(self.env),
                  "started": time.time(), "argv": sys.argv}
        data = (json.dumps(record) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # a finished run names no holder
            fcntl.flock(fd, fcntl.LOCK_UN)  # also for forked children (dataloader workers) sharing it
        finally:
            os.close(fd)


def wait_for_own_job(output_dir: Path, env: Mapping[str, str] = os.environ, wait_s: float = WAIT_S) -> None:
    """A non-zero rank: return once the lock's holder is this process's job, else `RunRefused`."""
    path = Path(output_dir) / LOCK_NAME
    mine, host, parent = job_key(env), socket.gethostname(), os.getppid()
    deadline = time.monotonic() + wait_s
    while True:
        holder = read_holder(path)
        if holder and ((mine is not None and holder.get("job") == mine)
                       or (holder.get("pid") == parent and holder.get("host") == host)):
            return
        if time.monotonic() >= deadline:
            held = f"it is held by {describe_holder(holder)}" if holder else "nobody holds it"
            raise RunRefused(f"output_dir {path.parent}: rank {launch_rank(env)} waited {wait_s:.0f} s for rank 0 "
                             f"of its job ({mine or f'parent pid {parent}'}) to lock it; {held}")
        time.sleep(0.2)


def previous_run(output_dir: Path) -> str | None:
    """What a previous run left in `output_dir` (None: nothing that a new run would clobber)."""
    results = Path(output_dir) / "results.json"
    if results.is_file():
        try:
            record = json.loads(results.read_text())
            return (f"results.json: status {record.get('status')!r}, {record.get('global_steps')} of "
                    f"{record.get('planned_steps')} steps")
        except (OSError, ValueError, AttributeError):
            return "results.json"
    checkpoints = Path(output_dir) / "checkpoints"
    if checkpoints.is_dir() and any(not p.name.startswith(".") for p in checkpoints.iterdir()):
        return "checkpoints/ (no results.json)"
    return None


def check_previous_run(output_dir: Path, *, overwrite: bool, resuming: bool) -> None:
    """Refuse to start a fresh run over a previous one unless told to overwrite it."""
    if resuming:
        return
    found = previous_run(output_dir)
    if found is None:
        return
    if not overwrite:
        raise RunRefused(f"output_dir {output_dir} holds a previous run ({found}); pass ckpt_path=last to "
                         "resume it, overwrite=true to replace it, or choose another output_dir")
    log.warning("overwrite=true: discarding the previous run in %s (%s)", output_dir, found)
    (Path(output_dir) / "results.json").unlink(missing_ok=True)
    checkpoints = Path(output_dir) / "checkpoints"
    if checkpoints.is_dir():
        discard_dir(checkpoints, ".")


@contextlib.contextmanager
def claim_output_dir(output_dir: Path, *, overwrite: bool, resuming: bool,
                     env: Mapping[str, str] = os.environ) -> Iterator[None]:
    """Hold `output_dir` for one job while the block runs (see the module docstring)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if launch_rank(env) != 0:
        wait_for_own_job(output_dir, env)
        yield
        return
    lock = RunDirLock(output_dir, env).acquire()
    try:
        check_previous_run(output_dir, overwrite=overwrite, resuming=resuming)
        yield
    finally:
        lock.release()
