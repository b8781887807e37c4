"""SLURM batch scripts from the composed config (`scripts/make_sbatch.py`).

One srun task per device: ``--ntasks-per-node`` equals ``trainer.devices`` and
``--nodes`` equals ``trainer.num_nodes``, both read from the same composed config the
tasks train with, so the job and the Trainer cannot disagree. srun gives each task the
environment Lightning's `SLURMEnvironment` reads: ``SLURM_NTASKS`` (world size),
``SLURM_NTASKS_PER_NODE`` and ``SLURM_NNODES`` (checked against devices and num_nodes),
``SLURM_PROCID`` (global rank), ``SLURM_LOCALID`` (local rank), ``SLURM_NODEID`` (node
rank) and ``SLURM_NODELIST`` (the first host becomes MASTER_ADDR). ``SLURM_JOB_NAME`` must
not be ``bash`` or ``interactive``, or Lightning ignores SLURM.

Every task must write into the same run directory: the script fixes ``output_dir`` (Hydra's
default is a time stamp, which differs between tasks started a second apart) and gives each
task its own Hydra log directory.

Time limits and preemption: ``#SBATCH --signal=USR1@<launch.signal_seconds>`` (no ``B:``
prefix) makes SLURM send SIGUSR1 to every task of the job's steps -- the training processes,
since each task ``exec``s python -- that many seconds before the time limit. With ``B:`` only
the batch shell would get it (and, without a trap, die of it) while srun's tasks never would.
`pipeline.training.preemption` saves a complete checkpoint at the next optimizer step and rank zero
runs ``scontrol requeue``; ``--requeue`` allows that on clusters whose default is no requeue,
``--open-mode=append`` keeps the log of the earlier attempt, and the tasks pass
``ckpt_path=last`` (unless the overrides name a checkpoint) so the requeued job resumes.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from omegaconf import DictConfig

from pipeline.sampling.batch_geometry import BatchGeometry

# Overrides the script sets itself (from the config), removed from the user's list.
_SCRIPT_KEYS = ("trainer.num_nodes", "trainer.devices", "output_dir", "hydra.run.dir")
DEFAULT_SIGNAL_SECONDS = 120
_RESERVED_JOB_NAMES = ("bash", "interactive")  # Lightning's SLURM detection skips these


@dataclass(frozen=True)
class SlurmJob:
    """What one sbatch allocation runs: `nodes` x `tasks_per_node` training processes."""

    job_name: str
    nodes: int
    tasks_per_node: int
    gpus_per_node: int  # 0 on CPU nodes
    cpus_per_task: int

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


def _positive_int(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{key}={value!r}: an sbatch script needs an explicit positive count "
            f"(e.g. {key}=8); 'auto' and -1 are resolved per machine, after the job starts")
    return value


def slurm_job(cfg: DictConfig) -> SlurmJob:
    """The allocation the config asks for; ValueError names the key that cannot work."""
    launch = cfg.get("launch")
    if not launch:
        raise ValueError("no launch settings: compose with launch=slurm (conf/launch/slurm.yaml)")
    nodes = _positive_int(cfg.trainer.get("num_nodes", 1), "trainer.num_nodes")
    devices = _positive_int(cfg.trainer.get("devices", 1), "trainer.devices")
    job_name = str(launch.job_name)
    if job_name in _RESERVED_JOB_NAMES or not job_name:
        raise ValueError(f"launch.job_name={job_name!r}: Lightning ignores SLURM for jobs named "
                         f"{' or '.join(_RESERVED_JOB_NAMES)}; pick another name")
    BatchGeometry.of(cfg.run.global_batch_size, nodes * devices, cfg.loader.get("micro_batch_size"),
                     f"trainer.num_nodes={nodes} x trainer.devices={devices}")  # ValueError naming all three
    on_gpu = str(cfg.trainer.get("accelerator", "gpu")) in ("gpu", "cuda")
    return SlurmJob(job_name, nodes, devices, devices if on_gpu else 0,
                    _positive_int(launch.cpus_per_task, "launch.cpus_per_task"))


def is_launch_override(override: str) -> bool:
    key = override.lstrip("+~").split("=", 1)[0]
    return key == "launch" or key.startswith("launch.")


def training_overrides(overrides: Sequence[str]) -> list[str]:
    """The user's overrides the tasks train with: launch settings and the keys the script
    sets itself are dropped."""
    kept = []
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if is_launch_override(override) or key in _SCRIPT_KEYS:
            continue
        kept.append(override)
    return kept


def sbatch_script(cfg: DictConfig, overrides: Sequence[str], config_digest: str | None = None) -> str:
    """The batch script for `cfg` (composed from `overrides` with ``launch=slurm``).

    Raises:
        ValueError: counts that cannot be scheduled (see `slurm_job`).
    """
    job = slurm_job(cfg)
    launch = cfg.launch
    directives = [f"--job-name={job.job_name}", f"--nodes={job.nodes}",
                  f"--ntasks-per-node={job.tasks_per_node}"]
    if job.gpus_per_node:
        directives.append(f"--gpus-per-node={job.gpus_per_node}")
    directives.append(f"--cpus-per-task={job.cpus_per_task}")
    signal_seconds = launch.get("signal_seconds", DEFAULT_SIGNAL_SECONDS)
    if signal_seconds:  # null or 0: no warning signal (the job then ends at its time limit unsaved)
        # Every task of the job steps (not "B:", the batch shell only): see the module docstring.
        directives += [f"--signal=USR1@{_positive_int(signal_seconds, 'launch.signal_seconds')}",
                       "--requeue", "--open-mode=append"]
    for key, flag in (("mem", "mem"), ("time", "time"), ("partition", "partition"),
                      ("account", "account"), ("qos", "qos"), ("log_file", "output")):
        if launch.get(key) not in (None, ""):
            directives.append(f"--{flag}={launch[key]}")
    directives += [str(d) for d in launch.get("extra_sbatch") or []]

    run_dir = cfg.get("output_dir") or f"{launch.run_root}/{job.job_name}-${{SLURM_JOB_ID}}"
    python_args = [*shlex.split(str(launch.python)), "-m", "pipeline.train",
                   *training_overrides(overrides),
                   # A requeued job reruns this script: it must continue from the last checkpoint.
                   *([] if cfg.get("ckpt_path") else ["ckpt_path=last"]),
                   f"trainer.num_nodes={job.nodes}", f"trainer.devices={job.tasks_per_node}"]
    # Expanded by each task's shell: the run dir is shared, Hydra's log dir is per rank.
    per_task = (" ".join(shlex.quote(a) for a in python_args)
                + ' output_dir="$RUN_DIR" hydra.run.dir="$RUN_DIR/hydra/rank$SLURM_PROCID"')
    environment = {"OMP_NUM_THREADS": "${SLURM_CPUS_PER_TASK}",
                   **{str(k): str(v) for k, v in (launch.get("env") or {}).items()}}

    lines = ["#!/bin/bash",
             "# Generated by scripts/make_sbatch.py"
             + (f" (config digest {config_digest})" if config_digest else "") + ".",
             f"# {job.nodes} node(s) x {job.tasks_per_node} task(s) = world size {job.world_size}; "
             "one task per device, Lightning reads srun's SLURM_* variables.",
             *(f"#SBATCH {d}" for d in directives),
             "", "set -euo pipefail"]
    lines += [str(line) for line in launch.get("setup") or []]
    lines += [f"export {k}={_shell_value(v)}" for k, v in environment.items()]
    lines += [f"export RUN_DIR={_shell_value(run_dir)}",
              'mkdir -p "$RUN_DIR"',
              'echo "run directory: $RUN_DIR"',
              # --kill-on-bad-exit: one dead rank ends the job instead of hanging the others.
              f"srun --kill-on-bad-exit=1 bash -c {shlex.quote('exec ' + per_task)}", ""]
    return "\n".join(lines)


def _shell_value(value: str) -> str:
    """Double-quoted so ${VAR} expands in the batch shell; quotes and backslashes escaped."""
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`")
    return f'"{escaped}"'

