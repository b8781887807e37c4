"""Two CPU processes (gloo) against one: DDP, DeepSpeed ZeRO-2 and ZeRO-3 on the same global batches.

Each 2-process run is the real entry (`python -m pipeline.train ... trainer.devices=2`, Lightning
starts the second process), trains 4 steps and writes checkpoints. The reference is one process
on the same global batches: global batch 8 in micro-batches of 2, so one process accumulates 4
micro-batches and each of the two ranks accumulates 2 (DeepSpeed's own 1/accumulation is then in
play, which `LanguageModel.gradient_scale` undoes).

What must match, per optimizer step: `train/loss` (the global objective) and `train/grad_norm`
(the pre-clipping norm of its gradient: a wrong accumulation or world-size factor changes it by
that factor, which Adam's scale invariance would hide from the losses), and the parameters after
the last step.

Tolerances (all float32): the runs differ only in summation order (per rank, per micro-batch,
then all-reduced), which moves a float32 sum of a few hundred terms by a few ulp, about 1e-6
relative. Losses and gradient norms: rtol 2e-5. Parameters after 4 Adam steps at lr 3e-3: atol
2e-5, since Adam divides by sqrt(v), coordinates with tiny gradients amplify ulp-level gradient
differences up to ~1e-3 of one update (3e-6); a wrong batch or a wrong scale moves parameters
and losses by 1e-3 or more.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
STEPS = 4
RUN = ["experiment=demo", f"run.total_steps={STEPS}", "run.global_batch_size=8", "loader.micro_batch_size=2",
       "logger=csv", "trainer.enable_progress_bar=false", "progress=false", "trainer.log_every_n_steps=1",
       "checkpoint.every_n_steps=2", "validation.documents_per_source=2",
       # Full learning rate from the first step, so 4 steps move the parameters measurably.
       "model.schedule.warmup_steps=0"]


def _train(tmp_path: Path, cache: str, name: str, strategy: str, devices: int, *extra: str) -> Path:
    """`python -m pipeline.train ...` in a subprocess (Lightning starts rank 1 itself); the run dir."""
    out = tmp_path / name
    command = [sys.executable, "-m", "pipeline.train", *RUN, f"cache_dir={cache}", f"output_dir={out}",
               f"hydra.run.dir={out / 'hydra'}", f"trainer.devices={devices}", f"strategy={strategy}", *extra]
    # One thread per process: two ranks on two cores, and the reference alike.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    env.pop("MASTER_PORT", None)  # Lightning picks a free port for the pair
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return out


@pytest.fixture(scope="module")
def reference_run(demo_data, tmp_path_factory) -> Path:
    """One process on the same global batches (accumulation 4)."""
    return _train(tmp_path_factory.mktemp("reference"), demo_data[0].cache_dir, "single", "single", 1)


def _assert_matches_reference(run: Path, reference: Path, tmp_path: Path) -> None:
    pointer = json.loads((run / "checkpoints" / "last.json").read_text())
    assert pointer["checkpoint"] == f"step{STEPS:06d}.ckpt" and pointer["global_step"] == STEPS
    assert (run / "checkpoints" / "step000002.ckpt").exists()
    assert not list((run / "checkpoints").glob(".*"))  # no staging leftovers
    assert all((v / "metrics.csv").is_file() for v in (run / "csv").glob("version_*"))  # rank 1 logs nothing
    for key in ("train/loss", "train/grad_norm"):
        got = torch.tensor(_metric_series(run, key), dtype=torch.float64)
        want = torch.tensor(_metric_series(reference, key), dtype=torch.float64)
        assert len(got) == len(want) == STEPS, key
        print(f"{run.name} {key}: max relative difference {float(((got - want) / want).abs().max()):.2e}")
        torch.testing.assert_close(got, want, rtol=2e-5, atol=0, msg=lambda m, k=key: f"{k}: {m}")
    assert abs(float(want[0] - want[-1])) > 0.1  # the norm (and loss) move: not comparing constants
    final = f"step{STEPS:06d}.ckpt"
    got = _model_parameters(run / "checkpoints" / final, tmp_path)
    want = _model_parameters(reference / "checkpoints" / final, tmp_path)
    assert got.keys() == want.keys() and len(want) > 0
    worst = max(float((got[n] - want[n]).abs().max()) for n in want)
    earlier = _model_parameters(reference / "checkpoints" / "step000002.ckpt", tmp_path)
    moved = max(float((want[n] - earlier[n]).abs().max()) for n in want)
    print(f"{run.name} parameters: max abs difference {worst:.2e} (largest move over steps 3-4: {moved:.2e})")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.distributed
def test_zero3_two_processes_match_one_process(reference_run, demo_data, tmp_path):
    run = _train(tmp_path, demo_data[0].cache_dir, "zero3", "deepspeed_zero3", 2)
    assert (run / "checkpoints" / f"step{STEPS:06d}.ckpt").is_dir()  # sharded: one directory
    _assert_matches_reference(run, reference_run, tmp_path)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_zero2"])
def test_two_processes_match_one_process(strategy, reference_run, demo_data, tmp_path):
    run = _train(tmp_path, demo_data[0].cache_dir, strategy, strategy, 2)
    _assert_matches_reference(run, reference_run, tmp_path)


def _metric_series(run_dir: Path, key: str) -> list[float]:
    """The metric's values in logging order, over every CSV version (a resume adds one)."""
    values = []
    for version in sorted((run_dir / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1])):
        with open(version / "metrics.csv", newline="") as stream:
            values += [float(row[key]) for row in csv.DictReader(stream) if row.get(key)]
    return values


def _model_parameters(checkpoint: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """The model's fp32 weights from a file checkpoint or a (consolidated) DeepSpeed directory."""
    if checkpoint.is_dir():
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        single = tmp_path / f"{checkpoint.parent.parent.name}_consolidated.pt"
        convert_zero_checkpoint_to_fp32_state_dict(str(checkpoint), str(single))
        checkpoint = single
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    return {k: v.float() for k, v in state.items() if k.startswith("model.")}


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_resumes_from_its_sharded_last_checkpoint(reference_run, demo_data, tmp_path):
    """2 steps, stop; `ckpt_path=last` follows last.json to the sharded directory; 2 more steps."""
    cache = demo_data[0].cache_dir
    run = _train(tmp_path, cache, "zero3_resumed", "deepspeed_zero3", 2, "+trainer.max_steps=2")
    assert json.loads((run / "checkpoints" / "last.json").read_text())["checkpoint"] == "step000002.ckpt"
    (run / "checkpoints" / ".step000004.ckpt.tmp").mkdir()  # a killed writer's partial shards
    _train(tmp_path, cache, "zero3_resumed", "deepspeed_zero3", 2, "ckpt_path=last")
    _assert_matches_reference(run, reference_run, tmp_path)


@pytest.mark.slow
@pytest.mark.distributed
def test_window_mode_two_processes_match_one_process(demo_data, tmp_path):
    """loader.unit=window: the token stores are built once under the prepare lock, and the two
    ranks train the same global windows as one process."""
    cache, window = demo_data[0].cache_dir, ("loader.unit=window", "loader.max_length=24")
    reference = _train(tmp_path, cache, "window_single", "single", 1, *window)
    run = _train(tmp_path, cache, "window_ddp", "ddp", 2, *window)
    _assert_matches_reference(run, reference, tmp_path)
