"""Training the tiny LM with `loss=fused` follows `loss=torch` step for step.

Runs share the seed, data stream, model and global batch (8 rows: micro-batches of 2, so
gradient accumulation 4 on one process and 2 per rank on two); only the loss
implementation or the strategy differs. Label smoothing and z-loss exercise the options the
LM config exposes; the global normaliser makes the objective independent of accumulation and
world size, so every run below must agree with the single-process `loss=torch` run.

Under DeepSpeed ZeRO-3 the tied LM-head weight (the embedding) is partitioned across ranks;
`TokenLossHead` has it registered as an external parameter (pipeline/models/lm.py), so the
fused loss receives the gathered (V, H) weight and its gradient reaches the owner's
partition. A wrong gather would fail the shape checks; a lost gradient would move the
embedding differently from the reference run (compared below).
"""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.train import train

REPO = Path(__file__).resolve().parents[2]
STEPS = 3
FAST = ["experiment=demo", "model=lm_tiny", f"run.total_steps={STEPS}", "run.global_batch_size=8",
        "loader.micro_batch_size=2", "logger=csv", "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1", "progress=false", "validation.documents_per_source=2",
        "model.translation_eval.max_new_tokens=4", "loss.label_smoothing=0.1", "loss.z_loss=1e-4"]
ZERO3_TWO_RANKS = ["strategy=deepspeed_zero3", "trainer.devices=2"]

# Measured (3 AdamW steps, lr up to 4.5e-4, parameters move by up to ~1e-3): logged losses
# equal to the last printed digit or within 1.2e-7 relative; parameters within 1.6e-6 (one
# process, fused vs torch) and 1.2e-7 (ZeRO-3 on 2 ranks vs one process) absolute.
LOSS_RTOL = 1e-5
PARAM_TOL = dict(rtol=1e-4, atol=1e-6)

_RUNS: dict[tuple, tuple[list[float], dict]] = {}  # runs shared by the tests of this module


def _train_losses(run_dir: Path) -> list[float]:
    # Rank 0's CSV logger writes metrics.csv (other ranks may leave a metrics-less version).
    (metrics,) = (run_dir / "csv").glob("version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def _final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """Model parameters of the run's final checkpoint (a file, or a ZeRO directory)."""
    final = max((run_dir / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if final.is_dir():  # DeepSpeed: fp32 partitions of every rank, merged
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(final))
    else:
        state = torch.load(final, map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("model.")}


def _run(key, compose_config, demo_data, tmp_path_factory):
    """Train (impl, two_ranks) once per module; returns (train losses, parameters)."""
    if key in _RUNS:
        return _RUNS[key]
    impl, two_ranks = key
    run_dir = tmp_path_factory.mktemp(f"{impl}_{'zero3' if two_ranks else 'single'}")
    overrides = [*FAST, f"loss={impl}", f"output_dir={run_dir}", f"cache_dir={demo_data[0].cache_dir}"]
    if two_ranks:
        # Lightning launches the second rank by re-running this command line, so the run
        # gets its own interpreter rather than pytest's.
        cmd = [sys.executable, "-m", "pipeline.train", *overrides, *ZERO3_TWO_RANKS,
               f"hydra.run.dir={run_dir / 'hydra'}"]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.returncode == 0, f"ZeRO-3 run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    else:
        cfg = compose_config(overrides)
        assert cfg.loss.impl == impl
        record = train(cfg)
        assert record["status"] == "completed" and record["global_steps"] == STEPS
    _RUNS[key] = (_train_losses(run_dir), _final_state(run_dir))
    return _RUNS[key]


def _assert_same_training(got, expected):
    (losses, state), (ref_losses, ref_state) = got, expected
    assert len(losses) == len(ref_losses) == STEPS
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=LOSS_RTOL, atol=0)
    assert state.keys() == ref_state.keys() and "model.embed.weight" in state
    for key in state:
        torch.testing.assert_close(state[key], ref_state[key], **PARAM_TOL,
                                   msg=lambda m, key=key: f"{key}: {m}")


def test_fused_loss_trains_like_torch_loss(compose_config, demo_data, tmp_path_factory):
    reference = _run(("torch", False), compose_config, demo_data, tmp_path_factory)
    fused = _run(("fused", False), compose_config, demo_data, tmp_path_factory)
    _assert_same_training(fused, reference)


@pytest.mark.distributed
def test_zero3_two_ranks_fused_loss_trains_like_single_process_torch(compose_config, demo_data,
                                                                      tmp_path_factory):
    reference = _run(("torch", False), compose_config, demo_data, tmp_path_factory)
    zero3_fused = _run(("fused", True), compose_config, demo_data, tmp_path_factory)
    _assert_same_training(zero3_fused, reference)


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_two_ranks_fused_loss_matches_zero3_torch_loss(compose_config, demo_data,
                                                             tmp_path_factory):
    zero3_torch = _run(("torch", True), compose_config, demo_data, tmp_path_factory)
    zero3_fused = _run(("fused", True), compose_config, demo_data, tmp_path_factory)
    _assert_same_training(zero3_fused, zero3_torch)
