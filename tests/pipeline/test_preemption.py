"""A signal during training (SLURM's time-limit warning SIGUSR1, or SIGTERM) saves a complete
checkpoint through the periodic path (last.json names it), stops with a non-zero status and a
one-line reason, requeues a SLURM job, and `ckpt_path=last` finishes the run.

Each test runs the real entry, ``python -m pipeline.train experiment=demo``, as a subprocess on
the tiny demo model. "Training has started" is a file: the first periodic checkpoint's
``checkpoints/last.json`` (every 2 steps here); the signal is sent then.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
STEPS = 60  # far more than the few steps a signal needs to land: the run must not finish first
RUN = ["experiment=demo", f"run.total_steps={STEPS}", "run.global_batch_size=2", "logger=none",
       "trainer.enable_progress_bar=false", "progress=false", "validation.documents_per_source=2",
       "checkpoint.every_n_steps=2", "model.schedule.warmup_steps=0"]

FAKE_SCONTROL = r'''
import json, os, sys
with open(os.environ["SCONTROL_LOG"], "a") as stream:
    stream.write(json.dumps({"argv": sys.argv[1:], "SLURM_JOB_ID": os.environ.get("SLURM_JOB_ID")}) + "\n")
'''


def _command(out: Path, cache: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.train", *RUN, f"cache_dir={cache}", f"output_dir={out}",
            f"hydra.run.dir={out / 'hydra'}", *extra]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", **extra)
    env.pop("MASTER_PORT", None)
    return env


def _signal_once_training(out: Path, command: list[str], env: dict, signum: int, tmp_path: Path):
    """Start the run, send `signum` after its first checkpoint; (returncode, stderr)."""
    log = open(tmp_path / "run.log", "w+")  # noqa: SIM115  (read back after the process ends)
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    pointer = out / "checkpoints" / "last.json"
    deadline = time.monotonic() + 300
    try:
        while not pointer.is_file():
            assert process.poll() is None, f"the run ended before its first checkpoint:\n{_tail(log)}"
            assert time.monotonic() < deadline, f"no checkpoint after 300 s:\n{_tail(log)}"
            time.sleep(0.05)
        process.send_signal(signum)
        returncode = process.wait(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return returncode, _tail(log)


def _tail(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-8000:]


def _stopped_step(output: str, signal_name: str) -> int:
    match = re.search(rf"stopped by {signal_name} at step (\d+); checkpoint at step \1 \(step\d+\.ckpt\); "
                      r"(resume with ckpt_path=last|SLURM job \d+ requeued; it resumes with ckpt_path=last)$",
                      output, flags=re.M)
    assert match, f"no one-line stop reason in the output:\n{output}"
    return int(match.group(1))


def _assert_checkpoint_at(out: Path, step: int) -> None:
    pointer = json.loads((out / "checkpoints" / "last.json").read_text())
    assert pointer["global_step"] == step and pointer["checkpoint"] == f"step{step:06d}.ckpt"
    state = torch.load(out / "checkpoints" / pointer["checkpoint"], map_location="cpu", weights_only=False)
    assert state["global_step"] == step and state["optimizer_states"] and state["mixpipe_identity"]
    assert not list((out / "checkpoints").glob(".*"))  # no staging leftovers
    assert not list(out.rglob("hpc_ckpt_*"))  # Lightning's own SLURM checkpoints bypass last.json
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == f"preempted: checkpoint at step {step}"
    assert results["global_steps"] == step


def _resume_finishes(out: Path, cache: str, env: dict) -> None:
    result = subprocess.run(_command(out, cache, "ckpt_path=last"), cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    assert "resuming from" in result.stdout + result.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed" and results["global_steps"] == STEPS
    # Counts continue across the stop: every global batch trained exactly once.
    assert sum(s["samples_seen"] for s in results["sources"].values()) == STEPS * 2


def test_sigterm_saves_a_checkpoint_exits_nonzero_and_resumes(demo_data, tmp_path):
    out, cache = tmp_path / "run", demo_data[0].cache_dir
    returncode, output = _signal_once_training(out, _command(out, cache), _env(), signal.SIGTERM, tmp_path)
    assert returncode == 1, output
    step = _stopped_step(output, "SIGTERM")
    assert 2 <= step < STEPS
    assert "resume with ckpt_path=last" in output and "Traceback" not in output
    _assert_checkpoint_at(out, step)
    _resume_finishes(out, cache, _env())


def test_slurm_time_limit_signal_requeues_the_job(demo_data, tmp_path):
    """Under SLURM (srun's variables set, one task): SIGUSR1 saves, rank 0 runs
    `scontrol requeue $SLURM_JOB_ID` (a stand-in on PATH records it), Lightning's own
    auto-requeue (hpc_ckpt_*.ckpt) stays off."""
    out, cache = tmp_path / "run", demo_data[0].cache_dir
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!{sys.executable}\n{FAKE_SCONTROL}")
    (bin_dir / "scontrol").chmod(0o755)
    calls = tmp_path / "scontrol.jsonl"
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "mixpipe", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
             "SLURM_NNODES": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
             "SLURM_NODELIST": "localhost", "SCONTROL_LOG": str(calls),
             "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    returncode, output = _signal_once_training(out, _command(out, cache), _env(**slurm), signal.SIGUSR1, tmp_path)
    assert returncode == 1, output
    step = _stopped_step(output, "SIGUSR1")
    assert "SLURM job 4242 requeued" in output
    assert [json.loads(line) for line in calls.read_text().splitlines()] == [
        {"argv": ["requeue", "4242"], "SLURM_JOB_ID": "4242"}]
    _assert_checkpoint_at(out, step)
    _resume_finishes(out, cache, _env(**{k: v for k, v in slurm.items() if k != "SLURM_JOB_ID"},
                                      SLURM_JOB_ID="4242"))  # the requeued job: same id, ckpt_path=last
    assert len(calls.read_text().splitlines()) == 1  # a run that finishes requeues nothing


@pytest.mark.slow
@pytest.mark.distributed
def test_a_signal_to_one_rank_stops_both_at_the_same_step(demo_data, tmp_path):
    """DDP, 2 processes: only rank 0 gets SIGTERM; the all-reduced flag makes both ranks save
    the same step together, and both exit non-zero."""
    out, cache = tmp_path / "run", demo_data[0].cache_dir
    command = _command(out, cache, "trainer.devices=2", "strategy=ddp")
    returncode, output = _signal_once_training(out, command, _env(), signal.SIGTERM, tmp_path)
    assert returncode != 0, output
    step = _stopped_step(output, "SIGTERM")
    assert f"stopped by a signal on another rank at step {step}" in output  # rank 1 agreed
    _assert_checkpoint_at(out, step)
