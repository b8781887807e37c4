"""Training the tiny LM with `loss=fused` follows `loss=torch` step for step.

Both runs use the same seed, data stream and model; only the loss implementation differs
(`F.cross_entropy` on materialised logits vs `kernels.fused_linear_cross_entropy`'s chunked
path). Gradient accumulation 2 (global batch 8, micro-batch 4) exercises the global
normaliser; label smoothing and z-loss exercise the options the LM config exposes.
"""

import csv
from pathlib import Path

import torch

from pipeline.train import train

FAST = ["experiment=demo", "model=lm_tiny", "run.total_steps=4", "run.global_batch_size=8",
        "loader.micro_batch_size=4", "logger=csv", "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1", "progress=false", "validation.documents_per_source=2",
        "model.translation_eval.max_new_tokens=4", "loss.label_smoothing=0.1",
        "loss.z_loss=1e-4"]


def _train_losses(run_dir: Path) -> list[float]:
    rows = list(csv.DictReader((run_dir / "csv" / "version_0" / "metrics.csv").open()))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def _run(compose_config, demo_data, tmp_path, impl, extra=()):
    run_dir = tmp_path / impl
    cfg = compose_config([*FAST, f"loss={impl}", *extra, f"output_dir={run_dir}",
                          f"cache_dir={demo_data[0].cache_dir}"])
    assert cfg.loss.impl == impl
    record = train(cfg)
    assert record["status"] == "completed" and record["global_steps"] == 4
    # The run's final checkpoint (named last.ckpt or by step, depending on the callback).
    final = max((p for p in (run_dir / "checkpoints").glob("*.ckpt") if p.is_file()),
                key=lambda p: p.stat().st_mtime)
    state = torch.load(final, map_location="cpu", weights_only=False)["state_dict"]
    return _train_losses(run_dir), state, record


def test_fused_loss_trains_like_torch_loss(compose_config, demo_data, tmp_path):
    torch_losses, torch_state, torch_record = _run(compose_config, demo_data, tmp_path, "torch")
    fused_losses, fused_state, fused_record = _run(compose_config, demo_data, tmp_path, "fused")
    assert len(torch_losses) == len(fused_losses) == 4
    # float32 end to end: the two losses differ only in summation order. Measured after 4
    # AdamW steps (lr up to 6e-4, so parameters move by up to ~1.5e-3): logged losses
    # identical, parameters within 1.6e-6 absolute (1.8e-5 of a tensor's largest entry).
    torch.testing.assert_close(torch.tensor(fused_losses), torch.tensor(torch_losses),
                               rtol=1e-5, atol=0)
    assert torch_state.keys() == fused_state.keys()
    params = [k for k, v in torch_state.items() if v.is_floating_point() and k.startswith("model.")]
    assert params, "no model parameters in the checkpoint"
    for key in params:
        torch.testing.assert_close(fused_state[key], torch_state[key], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, key=key: f"{key}: {m}")
    # The runs really trained (parameters moved) and validated with the same losses.
    for s_torch, s_fused in zip(torch_record["sources"].values(), fused_record["sources"].values(),
                                strict=True):
        assert abs(s_torch["val_loss"] - s_fused["val_loss"]) <= 1e-5 * s_torch["val_loss"]
