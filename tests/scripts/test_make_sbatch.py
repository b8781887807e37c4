"""scripts/make_sbatch.py: the generated job for 2 nodes x 8 GPUs, run through a simulated
sbatch + srun, gives Lightning's SLURMEnvironment world size 16 and the right ranks.

The simulation does what SLURM does with the script: sbatch reads the ``#SBATCH`` lines and
exports the allocation (SLURM_NNODES, SLURM_NTASKS_PER_NODE, ...), then runs the script;
`srun` (a stand-in on PATH) starts one task per (node, local rank) with SLURM_PROCID,
SLURM_LOCALID and SLURM_NODEID set; `python` (a stand-in on PATH) records its argv and
environment. Each recorded task is then composed from its own argv and handed to a real
Lightning Trainer under its own environment.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import SLURMEnvironment
from omegaconf import OmegaConf

from pipeline.sampling.batch_geometry import geometry_for_trainer, geometry_from_config

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "make_sbatch.py"
JOB = ["experiment=demo", "trainer=gpu", "strategy=deepspeed_zero3", "trainer.num_nodes=2",
       "trainer.devices=8", "run.global_batch_size=64", "loader.micro_batch_size=2",
       "launch.job_name=lm-zero3", "launch.partition=gpu", "launch.cpus_per_task=6",
       "sources.exclude=[glv,iku]"]

FAKE_SRUN = r'''
import os, subprocess, sys
args = sys.argv[1:]
while args and args[0].startswith("--"):
    args.pop(0)
nodes, per_node = int(os.environ["SLURM_NNODES"]), int(os.environ["SLURM_NTASKS_PER_NODE"])
for node in range(nodes):
    for local in range(per_node):
        env = dict(os.environ, SLURM_NODEID=str(node), SLURM_LOCALID=str(local),
                   SLURM_PROCID=str(node * per_node + local), SLURMD_NODENAME=f"gpu{node + 1:03d}")
        subprocess.run(args, env=env, check=True)
'''

FAKE_PYTHON = r'''
import json, os, sys
record = {"argv": sys.argv[1:], "env": {k: v for k, v in os.environ.items()
          if k.startswith("SLURM") or k in ("RUN_DIR", "OMP_NUM_THREADS")}}
path = os.path.join(os.environ["CAPTURE_DIR"], f"task{os.environ['SLURM_PROCID']}.json")
with open(path, "w") as stream:
    json.dump(record, stream)
'''


def _stand_in(path: Path, body: str) -> None:
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)


def _sbatch_environment(script: str, job_id: str) -> dict[str, str]:
    """What sbatch exports for the directives (the subset Lightning and srun read)."""
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", script, flags=re.M))
    nodes, per_node = int(directives["nodes"]), int(directives["ntasks-per-node"])
    return {"SLURM_JOB_ID": job_id, "SLURM_JOB_NAME": directives["job-name"],
            "SLURM_NNODES": str(nodes), "SLURM_JOB_NUM_NODES": str(nodes),
            "SLURM_NTASKS_PER_NODE": str(per_node), "SLURM_NTASKS": str(nodes * per_node),
            "SLURM_CPUS_PER_TASK": directives["cpus-per-task"],
            "SLURM_GPUS_PER_NODE": directives.get("gpus-per-node", "0"),
            "SLURM_NODELIST": f"gpu[001-{nodes:03d}]"}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sbatch")
    out = subprocess.run([sys.executable, str(SCRIPT), *JOB, "--output", str(tmp / "job.sbatch")],
                         capture_output=True, text=True, cwd=tmp, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp / "job.sbatch").read_text() == out.stdout
    return tmp, out.stdout


def test_directives_match_the_trainer_config(generated):
    _, script = generated
    directives = re.findall(r"^#SBATCH (\S+)$", script, flags=re.M)
    assert directives[:5] == ["--job-name=lm-zero3", "--nodes=2", "--ntasks-per-node=8",
                              "--gpus-per-node=8", "--cpus-per-task=6"]
    assert "--partition=gpu" in directives
    # Preemption: SIGUSR1 120 s before the time limit to every task of the steps (no "B:",
    # which would signal only the batch shell), requeue allowed, the log appended to.
    assert {"--signal=USR1@120", "--requeue", "--open-mode=append"} <= set(directives)
    assert "bash -c 'exec python -m pipeline.train" in script  # the task *is* python: it gets the signal
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # valid bash


@pytest.mark.parametrize(("setting", "expected"), [
    ([], ["--signal=USR1@120", "--requeue", "--open-mode=append"]),
    (["launch.signal_seconds=600"], ["--signal=USR1@600", "--requeue", "--open-mode=append"]),
    (["launch.signal_seconds=0"], []),
])
def test_signal_seconds_sets_the_warning_signal(setting, expected):
    from pipeline.training.slurm import sbatch_script

    overrides = ["experiment=demo", "trainer.devices=2", *setting]
    script = sbatch_script(_compose(["launch=slurm", *overrides]), overrides)
    directives = re.findall(r"^#SBATCH (\S+)$", script, flags=re.M)
    assert [d for d in directives if d.split("=")[0] in ("--signal", "--requeue", "--open-mode")] == expected


def test_requeued_tasks_resume_from_the_last_checkpoint():
    from pipeline.training.slurm import sbatch_script

    overrides = ["experiment=demo", "trainer.devices=2"]
    assert " ckpt_path=last " in sbatch_script(_compose(["launch=slurm", *overrides]), overrides)
    overrides.append("ckpt_path=/runs/a/checkpoints/step000100.ckpt")  # the user's choice is kept
    script = sbatch_script(_compose(["launch=slurm", *overrides]), overrides)
    assert "ckpt_path=last" not in script and "ckpt_path=/runs/a/checkpoints/step000100.ckpt" in script


def test_simulated_srun_tasks_give_lightning_world_16_and_their_ranks(generated, tmp_path, monkeypatch):
    workdir, script = generated
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stand_in(bin_dir / "srun", FAKE_SRUN)
    _stand_in(bin_dir / "python", FAKE_PYTHON)
    capture = tmp_path / "tasks"
    capture.mkdir()
    env = {**os.environ, **_sbatch_environment(script, job_id="4242"), "CAPTURE_DIR": str(capture),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", str(workdir / "job.sbatch")], env=env, cwd=tmp_path, check=True, timeout=120)
    tasks = [json.loads((capture / f"task{rank}.json").read_text()) for rank in range(16)]
    assert (tmp_path / "runs" / "lm-zero3-4242").is_dir()

    for rank, task in enumerate(tasks):
        argv = task["argv"]
        assert argv[:2] == ["-m", "pipeline.train"]
        overrides = argv[2:]
        assert f"hydra.run.dir={tmp_path / 'runs' / 'lm-zero3-4242'}/hydra/rank{rank}".replace(
            str(tmp_path) + "/", "") in overrides  # per-rank Hydra logs, shared run dir
        assert "output_dir=runs/lm-zero3-4242" in overrides
        assert "ckpt_path=last" in overrides  # a requeued job continues from checkpoints/last.json
        assert not any(o.startswith("launch") for o in overrides)
        cfg = _compose([o for o in overrides if not o.startswith("hydra.")])
        assert cfg.strategy.stage == 3 and list(cfg.sources.exclude) == ["glv", "iku"]

        for key in list(os.environ):
            if key.startswith("SLURM"):
                monkeypatch.delenv(key)
        for key, value in task["env"].items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("MASTER_ADDR", raising=False)
        monkeypatch.delenv("MASTER_PORT", raising=False)
        trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
        trainer_cfg["accelerator"] = "cpu"  # no GPU here: same ranks, CPU devices
        trainer = pl.Trainer(**trainer_cfg, strategy=instantiate(cfg.strategy), logger=False,
                             enable_checkpointing=False, use_distributed_sampler=False)
        environment = trainer.strategy.cluster_environment
        assert isinstance(environment, SLURMEnvironment)
        assert (trainer.num_nodes, trainer.num_devices, trainer.world_size) == (2, 8, 16)
        assert trainer.global_rank == rank
        assert (trainer.node_rank, trainer.local_rank) == divmod(rank, 8)
        assert environment.main_address == "gpu001"
        assert environment.main_port == 15000 + 4242
        _validate_at_launch(trainer)  # what Lightning checks when fit() starts: no error
        # The job's global batch splits evenly: 64 / (16 ranks x 2) = 2 micro-batches per step.
        assert geometry_for_trainer(cfg, trainer.world_size, geometry_from_config(cfg)).accumulation == 2


def test_ranks_refuse_a_job_whose_tasks_per_node_differ_from_devices(monkeypatch, compose_config):
    """The check the generated directives satisfy: Lightning rejects a mismatch."""
    cfg = compose_config(["experiment=demo", "trainer.num_nodes=2", "trainer.devices=8"])
    for key, value in {"SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "2",
                       "SLURM_JOB_NAME": "lm", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                       "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(key, value)
    trainer = pl.Trainer(**OmegaConf.to_container(cfg.trainer, resolve=True), strategy="ddp", logger=False)
    with pytest.raises(ValueError, match="ntasks-per-node=4"):
        _validate_at_launch(trainer)


def _validate_at_launch(trainer) -> None:
    launcher = trainer.strategy.launcher
    launcher.cluster_environment.validate_settings(num_devices=launcher.num_processes,
                                                   num_nodes=launcher.num_nodes)


def test_an_unschedulable_config_prints_the_key_and_no_script():
    out = subprocess.run([sys.executable, str(SCRIPT), "experiment=demo", "trainer=gpu"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "trainer.devices=-1" in out.stderr and not out.stdout


def _compose(overrides):
    from pipeline.config.compose import compose_config

    return compose_config(overrides)
