"""Failures are loud and nothing is lost (issue 11).

* a non-finite loss stops the run (exit 1, one stderr line naming the step and the loss,
  results.json `failed: non-finite loss at step N`, the sweep counts it failed);
* one run per output_dir: a second concurrent run is refused naming the holder, the ranks
  of one job are let in, a finished run is not overwritten unless `overwrite=true`;
* results.json is strict JSON (null, with a status saying why, where a metric is NaN);
* a `+trainer.max_steps` stop validates at its last step and says `stopped: ...`.

Subprocess runs use the real entry on the tiny demo model with the session's prepared cache.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.evaluation.sweeps import collect
from pipeline.train import train
from pipeline.training.results import format_results_table
from pipeline.training.run_lock import (
    LOCK_NAME,
    RunDirLock,
    RunRefused,
    job_key,
    launch_rank,
    wait_for_own_job,
)

REPO = Path(__file__).resolve().parents[2]
TINY = ["experiment=demo", "run.global_batch_size=2", "logger=none", "trainer.enable_progress_bar=false",
        "progress=false", "validation.documents_per_source=2", "model.schedule.warmup_steps=0",
        "model.translation_eval.max_new_tokens=4"]


def strict_loads(text: str):
    """json.loads that rejects NaN / Infinity, as Node's JSON.parse and other strict parsers do."""
    def reject(constant):
        raise ValueError(f"non-strict JSON constant {constant}")
    return json.loads(text, parse_constant=reject)


def _command(out: Path, cache: str, *extra: str, hydra_dir: Path | None = None) -> list[str]:
    return [sys.executable, "-m", "pipeline.train", *TINY, f"cache_dir={cache}", f"output_dir={out}",
            f"hydra.run.dir={hydra_dir or out / 'hydra'}", *extra]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in ("RANK", "LOCAL_RANK", "NODE_RANK",
                                                                        "MASTER_PORT", "MASTER_ADDR")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", **extra)
    return env


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


# -- a non-finite loss ---------------------------------------------------------------------
def test_nonfinite_loss_exits_nonzero_and_the_sweep_counts_it_failed(demo_data, tmp_path):
    out, cache = tmp_path / "sweep" / "nan", demo_data[0].cache_dir
    result = subprocess.run(_command(out, cache, "run.total_steps=8", "model.optimizer.lr=1e6", hydra_dir=out), cwd=REPO,
                            env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    last = _last_line(result.stderr)
    match = re.fullmatch(r"non-finite loss at step (\d+) \(loss (nan|inf|-inf) on rank 0\); the step was not "
                         r"applied, the run stopped \(.*\)", last)
    assert match, f"last stderr line: {last!r}\n{result.stderr[-3000:]}"
    step = int(match.group(1))
    assert 1 <= step < 8 and "Traceback" not in result.stderr
    record = strict_loads((out / "results.json").read_text())
    assert record["status"] == f"failed: non-finite loss at step {step}"
    assert record["global_steps"] == step - 1  # the bad step was not applied
    frame = collect(tmp_path / "sweep")
    assert set(frame["status"]) == {"failed"}
    assert set(frame["reason"]) == {f"failed: non-finite loss at step {step}"}


# -- one run per output_dir ----------------------------------------------------------------
def test_a_second_run_into_a_busy_output_dir_is_refused_naming_the_holder(demo_data, tmp_path):
    out, cache = tmp_path / "run", demo_data[0].cache_dir
    log = open(tmp_path / "first.log", "w+")  # noqa: SIM115  (read back below)
    first = subprocess.Popen(_command(out, cache, "run.total_steps=20000"), cwd=REPO, env=_env(),
                             stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / LOCK_NAME).is_file() or f'"pid": {first.pid}' not in (out / LOCK_NAME).read_text():
            assert first.poll() is None, "the first run ended before holding the lock"
            assert time.monotonic() < deadline, "the first run never held the lock"
            time.sleep(0.05)
        started = time.monotonic()
        second = subprocess.run(_command(out, cache, "run.total_steps=20000"), cwd=REPO, env=_env(),
                                capture_output=True, text=True, timeout=300)
        assert first.poll() is None, "the first run must still be running (the test needs it to hold the lock)"
        assert second.returncode == 1, second.stderr[-3000:]
        last = _last_line(second.stderr)
        assert last.startswith(f"output_dir {out} is in use by another run: pid {first.pid} on "
                               f"{socket.gethostname()}"), last
        assert "Flags:" not in second.stdout + second.stderr and time.monotonic() - started < 120  # no data work
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
        log.close()
    assert not (out / "results.json").exists()  # the refused run wrote nothing over the first


def test_the_ranks_of_one_job_are_let_in_and_another_job_is_not(tmp_path, monkeypatch):
    """Rank 0 holds the lock; a rank of the same job (same torchrun rendezvous, or a child
    process of rank 0 as Lightning's launcher starts them) waits for it and goes on; a rank
    of another job is refused instead of hanging."""
    torchrun = {"TORCHELASTIC_RUN_ID": "abc", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29512"}
    assert launch_rank({"RANK": "0", **torchrun}) == 0 and launch_rank({"RANK": "1"}) == 1
    assert launch_rank({"LOCAL_RANK": "1"}) != 0 and launch_rank({"NODE_RANK": "1", "LOCAL_RANK": "0"}) != 0
    assert launch_rank({}) == 0
    lock = RunDirLock(tmp_path, env={"RANK": "0", **torchrun}).acquire()
    try:
        wait_for_own_job(tmp_path, env={"RANK": "1", **torchrun}, wait_s=5)  # same job: in
        with pytest.raises(RunRefused, match=r"waited 1 s for rank 0 .* held by pid"):
            wait_for_own_job(tmp_path, env={"RANK": "1", **torchrun, "MASTER_PORT": "29513"}, wait_s=1)
        # A child of the holder (Lightning's launcher: LOCAL_RANK=1, no job key of the parent's).
        child = subprocess.run(
            [sys.executable, "-c", f"from pipeline.training.run_lock import wait_for_own_job; wait_for_own_job({str(tmp_path)!r}, "
                                   "env={'LOCAL_RANK': '1', 'MASTER_PORT': '40000'}, wait_s=5)"],
            cwd=REPO, capture_output=True, text=True, timeout=120)
        assert child.returncode == 0, child.stderr
        # Another job's rank 0 (a separate process): refused, naming this process.
        other = subprocess.run(
            [sys.executable, "-c", f"from pipeline.training.run_lock import RunDirLock; RunDirLock({str(tmp_path)!r}).acquire()"],
            cwd=REPO, capture_output=True, text=True, timeout=120)
        assert other.returncode == 1 and f"in use by another run: pid {os.getpid()}" in other.stderr
    finally:
        lock.release()
    assert job_key({"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0"}) == "slurm job 7 step 0"
    RunDirLock(tmp_path).acquire().release()  # released: free again


def test_a_finished_run_is_not_overwritten_unless_asked(compose_config, demo_data, tmp_path):
    run = [*TINY, f"cache_dir={demo_data[0].cache_dir}", f"output_dir={tmp_path}", "run.total_steps=2",
           "checkpoint.every_n_steps=1"]
    first = train(compose_config(run))
    assert first["status"] == "completed"
    before = (tmp_path / "results.json").read_text()
    with pytest.raises(RunRefused, match=r"holds a previous run \(results.json: status 'completed', 2 of 2 steps\); "
                                         r"pass ckpt_path=last to resume it, overwrite=true to replace it"):
        train(compose_config([*run, "run.total_steps=3"]))
    assert (tmp_path / "results.json").read_text() == before  # nothing of the first run lost
    record = train(compose_config([*run, "run.total_steps=3", "overwrite=true"]))
    assert record["status"] == "completed" and record["global_steps"] == 3
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt"))
    assert names == ["step000001.ckpt", "step000002.ckpt", "step000003.ckpt"], names  # no -v1 interleaving
    assert json.loads((tmp_path / "checkpoints" / "last.json").read_text())["checkpoint"] == "step000003.ckpt"


# -- max_steps stop; strict JSON -------------------------------------------------------------
def test_a_max_steps_stop_validates_says_stopped_and_a_resume_completes(compose_config, demo_data, tmp_path):
    run = [*TINY, f"cache_dir={demo_data[0].cache_dir}", f"output_dir={tmp_path / 'sweep' / 'run'}",
           "run.total_steps=4", "checkpoint.every_n_steps=2", "evaluation.every_n_steps=3"]
    record = train(compose_config([*run, "+trainer.max_steps=2"]))
    assert record["status"] == "stopped: max_steps 2 of 4 planned" and record["global_steps"] == 2
    assert format_results_table(record).splitlines()[-1].startswith("NOT COMPLETED: stopped: max_steps 2 of 4 planned")
    # results.json: strict JSON; mono sources have no chrF (null, and why); validated at the stop.
    saved = strict_loads((tmp_path / "sweep" / "run" / "results.json").read_text())
    assert saved["validated_at_step"] == 2
    for source in saved["sources"].values():
        assert 0 < source["val_loss"] < 20 and source["val_status"] == "evaluated at step 2"
        assert source["val_chrf"] is None and source["chrf_status"] == "not a translation source"
    frame = collect(tmp_path / "sweep")
    assert set(frame["status"]) == {"stopped"} and frame["source_val_chrf"].isna().all()
    assert frame["source_val_loss"].notna().all()
    resumed = train(compose_config([*run, "ckpt_path=last"]))
    assert resumed["status"] == "completed" and resumed["global_steps"] == 4
    assert set(collect(tmp_path / "sweep")["status"]) == {"completed"}


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_ranks_launched_by_lightning_share_the_lock(demo_data, tmp_path):
    """2-process DDP: Lightning re-runs the entry as a child of rank 0; the child is let in."""
    out, cache = tmp_path / "run", demo_data[0].cache_dir
    result = subprocess.run(_command(out, cache, "run.total_steps=2", "trainer.devices=2", "strategy=ddp"),
                            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert strict_loads((out / "results.json").read_text())["status"] == "completed"


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_ranks_share_the_lock_and_a_nonfinite_loss_stops_both(demo_data, tmp_path):
    """torchrun starts both ranks as separate processes: rank 1 is let in by the rendezvous key;
    a NaN loss stops both at the same step (exit non-zero)."""
    out, cache = tmp_path / "run", demo_data[0].cache_dir
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
               "pipeline.train", *_command(out, cache, "run.total_steps=8", "trainer.devices=2", "strategy=ddp",
                                           "model.optimizer.lr=1e6")[3:]]
    result = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    steps = {int(s) for s in re.findall(r"non-finite loss at step (\d+) \(", output)}
    assert len(steps) == 1, output[-3000:]
    record = strict_loads((out / "results.json").read_text())
    assert record["status"] == f"failed: non-finite loss at step {steps.pop()}" and record["world_size"] == 2


def test_steps_past_a_plan_that_caps_epochs_are_refused_before_any_data_work(compose_config, tmp_path):
    """UniMax's epoch cap holds over run.total_steps only: trainer.max_steps beyond it fails at
    once, naming both keys (no data prepared, no output directory created)."""
    cfg = compose_config(["experiment=demo", "mixture=unimax", "run.total_steps=10", "+trainer.max_steps=11",
                          f"cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match=r"trainer.max_steps=11 exceeds run.total_steps=10.*UniMax"):
        train(cfg)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()
