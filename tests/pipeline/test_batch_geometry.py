"""pipeline.sampling.batch_geometry: one formula for global batch / world size / micro-batch, checked
before any data is prepared; and real 2-process runs without a micro-batch override."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.sampling.batch_geometry import (
    BatchGeometry,
    config_world_size,
    geometry_for_trainer,
    geometry_from_config,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("world", "micro", "expected"), [
    (1, None, (64, 1)), (2, None, (32, 1)), (16, None, (4, 1)),   # null: each rank's share
    (2, 8, (8, 4)), (4, 16, (16, 1)), (1, 1, (1, 64)),
])
def test_geometry_splits_the_global_batch(world, micro, expected):
    geometry = BatchGeometry.of(64, world, micro)
    assert (geometry.micro_batch_size, geometry.accumulation) == expected
    assert geometry.per_rank_batch_size * world == 64 == geometry.world_size * geometry.micro_batch_size * geometry.accumulation


@pytest.mark.parametrize(("numbers", "problem"), [
    ((64, 2, 0), "loader.micro_batch_size=0 must be a positive integer"),
    ((64, 2, -4), "loader.micro_batch_size=-4 must be a positive integer"),
    ((64, 2, 2.5), "loader.micro_batch_size=2.5 must be a positive integer"),
    ((64, 2, True), "loader.micro_batch_size=True must be a positive integer"),
    ((64, 3, None), "run.global_batch_size=64 is not divisible by world size 3"),
    ((64, 2, 5), "each rank's share 32 .* is not divisible by loader.micro_batch_size=5"),
    ((64, 4, 32), "each rank's share 16 .* is not divisible by loader.micro_batch_size=32"),  # micro > share
    ((64, 0, None), "world size 0 .* must be a positive integer"),
    ((64, -2, 4), "world size -2 .* must be a positive integer"),
    ((0, 2, None), "run.global_batch_size=0 must be a positive integer"),
    ((-8, 1, None), "run.global_batch_size=-8 must be a positive integer"),
])
def test_every_bad_combination_names_the_three_numbers_and_keys(numbers, problem):
    global_batch, world, micro = numbers
    with pytest.raises(ValueError, match=problem) as raised:
        BatchGeometry.of(global_batch, world, micro, world_keys="trainer.num_nodes=1 x trainer.devices=X")
    message = str(raised.value)
    for part in (f"run.global_batch_size={global_batch}", f"world size {world}",
                 "trainer.num_nodes=1 x trainer.devices=X", f"loader.micro_batch_size={micro!r}"):
        assert part in message, (part, message)


def test_the_dataclass_refuses_numbers_that_do_not_multiply_out():
    assert BatchGeometry(64, 2, 8, 4).per_rank_batch_size == 32
    with pytest.raises(ValueError, match="inconsistent batch geometry"):
        BatchGeometry(64, 2, 8, 3)


@pytest.mark.parametrize(("trainer", "world"), [
    ({"accelerator": "cpu", "devices": 2, "num_nodes": 1}, 2),
    ({"accelerator": "cpu", "devices": "auto", "num_nodes": 3}, 3),      # Lightning: "auto" on CPU is 1
    ({"accelerator": "gpu", "devices": 8, "num_nodes": 2}, 16),
    ({"accelerator": "gpu", "devices": "0,1,2", "num_nodes": 1}, 3),
    ({"accelerator": "gpu", "devices": [0, 1], "num_nodes": 2}, 4),
    ({"accelerator": "gpu", "devices": "4", "num_nodes": 1}, 4),
    ({"accelerator": "cpu", "devices": 0, "num_nodes": 1}, 0),
    ({"accelerator": "gpu", "devices": -1, "num_nodes": 1}, None),       # no GPU visible here: the Trainer counts
    ({"accelerator": "auto", "devices": "auto", "num_nodes": 1}, None),
])
def test_world_size_from_the_trainer_config(trainer, world):
    assert config_world_size(trainer)[0] == world


def test_config_null_micro_is_each_ranks_share(compose_config):
    cfg = compose_config(["experiment=demo", "run.global_batch_size=8", "trainer.devices=2"])
    assert cfg.loader.micro_batch_size is None
    geometry = geometry_from_config(cfg)
    assert (geometry.world_size, geometry.micro_batch_size, geometry.accumulation) == (2, 4, 1)
    cfg = compose_config(["experiment=demo", "run.global_batch_size=8", "trainer.num_nodes=2", "trainer.devices=2",
                          "loader.micro_batch_size=1"])
    assert geometry_from_config(cfg) == BatchGeometry(8, 4, 1, 2)


def test_a_deferred_world_size_is_resolved_and_checked_against_the_trainer(compose_config):
    cfg = compose_config(["experiment=demo", "trainer=gpu", "run.global_batch_size=8"])  # devices=-1
    assert geometry_from_config(cfg) is None  # no GPU on this machine: the Trainer decides
    assert geometry_for_trainer(cfg, 4, None) == BatchGeometry(8, 4, 2, 1)
    with pytest.raises(ValueError, match="resolved by the Trainer to 3"):
        geometry_for_trainer(cfg, 3, None)
    cfg = compose_config(["experiment=demo", "run.global_batch_size=8", "trainer.devices=2"])
    with pytest.raises(ValueError, match="the Trainer runs 4 processes but trainer.num_nodes=1 x trainer.devices=2"):
        geometry_for_trainer(cfg, 4, geometry_from_config(cfg))
    cfg = compose_config(["experiment=demo", "trainer=gpu", "loader.micro_batch_size=0"])
    with pytest.raises(ValueError, match="loader.micro_batch_size=0"):  # wrong whatever the world size
        geometry_from_config(cfg)


def _entry(tmp_path: Path, cache: str, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "pipeline.train", "experiment=demo", "run.total_steps=2",
               "run.global_batch_size=8", "logger=none", "trainer.enable_progress_bar=false", "progress=false",
               "validation.documents_per_source=2", f"cache_dir={cache}", f"output_dir={out}",
               f"hydra.run.dir={out / 'hydra'}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    env.pop("MASTER_PORT", None)  # Lightning picks a free port for the pair
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_micro_batch_zero_fails_before_preparing_anything(tmp_path):
    cache = tmp_path / "empty-cache"
    result = _entry(tmp_path, str(cache), "trainer.devices=2", "strategy=ddp", "loader.micro_batch_size=0", timeout=120)
    assert result.returncode != 0
    assert "loader.micro_batch_size=0 must be a positive integer" in result.stderr
    assert "run.global_batch_size=8, world size 2 (trainer.num_nodes=1 x trainer.devices=2)" in result.stderr
    assert "ZeroDivisionError" not in result.stderr
    assert not cache.exists()  # nothing prepared
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["hydra"]  # only Hydra's own log directory


@pytest.mark.slow  # the default run has both: tests/docs runs the README's DDP and ZeRO-2 commands
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_zero2"])
def test_two_processes_without_a_micro_batch_override(strategy, demo_data, tmp_path):
    """The documented `trainer.devices=2 strategy=...` works with the default micro-batch
    (null: 8 / 2 ranks = 4 rows per forward pass, no accumulation)."""
    result = _entry(tmp_path, demo_data[0].cache_dir, "trainer.devices=2", f"strategy={strategy}")
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["status"] == "completed" and record["global_steps"] == 2 and record["world_size"] == 2
    assert sum(s["samples_seen"] for s in record["sources"].values()) == 2 * 8
