"""pipeline.training.slurm: which allocations an sbatch script can ask for, and what the tasks run."""

import pytest

from pipeline.training.slurm import sbatch_script, slurm_job, training_overrides


@pytest.mark.parametrize(("overrides", "message"), [
    (["trainer=gpu"], "trainer.devices=-1"),
    (["trainer.devices=auto"], "trainer.devices='auto'"),
    (["trainer.num_nodes=0"], "trainer.num_nodes=0"),
    (["trainer.devices=3", "run.global_batch_size=8", "loader.micro_batch_size=1"], "not divisible by world size 3"),
    (["launch.job_name=interactive"], "launch.job_name='interactive'"),
    (["launch.job_name=bash"], "launch.job_name='bash'"),
])
def test_unschedulable_configs_name_the_key(compose_config, overrides, message):
    cfg = compose_config(["experiment=demo", "launch=slurm", *overrides])
    with pytest.raises(ValueError, match=message):
        slurm_job(cfg)


def test_without_launch_settings_it_says_how_to_add_them(compose_config):
    with pytest.raises(ValueError, match="launch=slurm"):
        slurm_job(compose_config(["experiment=demo"]))


def test_cpu_jobs_ask_for_no_gpus(compose_config):
    overrides = ["experiment=demo", "trainer.num_nodes=2", "trainer.devices=4", "loader.micro_batch_size=4"]
    cfg = compose_config(["launch=slurm", *overrides])
    job = slurm_job(cfg)
    assert (job.nodes, job.tasks_per_node, job.gpus_per_node, job.world_size) == (2, 4, 0, 8)
    script = sbatch_script(cfg, overrides)
    assert "--gpus-per-node" not in script and "#SBATCH --ntasks-per-node=4" in script


def test_tasks_train_with_the_users_overrides_only():
    given = ["experiment=demo", "launch=slurm", "launch.partition=a100", "+launch.extra=1",
             "trainer.devices=8", "trainer.num_nodes=2", "output_dir=/x", "strategy=deepspeed_zero3",
             "hydra.run.dir=/y", "model=lm_small"]
    assert training_overrides(given) == ["experiment=demo", "strategy=deepspeed_zero3", "model=lm_small"]


def test_fixed_output_dir_and_quoted_overrides(compose_config):
    overrides = ["experiment=demo", "output_dir=/shared/runs/a b", "sources.exclude=[glv,iku]",
                 "+launch.env.NCCL_DEBUG=WARN", "launch.setup=[module load cuda]"]
    script = sbatch_script(compose_config(["launch=slurm", *overrides]), overrides)
    assert 'export RUN_DIR="/shared/runs/a b"' in script
    assert 'export NCCL_DEBUG="WARN"' in script and "\nmodule load cuda\n" in script
    assert "'\"'\"'sources.exclude=[glv,iku]'\"'\"'" in script  # quoted for the inner bash -c
