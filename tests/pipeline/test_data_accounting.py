"""One data-accounting path for both model families (`pipeline.models.data_accounting`).

* A multimodal run resumed at step 2 of 4 equals the uninterrupted run: samples and tokens
  seen per source (checkpointed counts) and per-step losses.
* `resume.allow_mismatch=true` with another mixture resumes the multimodal model too (the
  datamodule owns the stream restart, not the model).
* The LM and the contrastive model log the same `data/*` metric set.
"""

import csv
import re
from pathlib import Path

import pytest
import torch

from pipeline.train import train

REPO = Path(__file__).resolve().parents[2]
STEPS = 4
# The multimodal test corpus (tests/pipeline/test_multimodal_training.py::SMALL), logged every step.
MM = ["experiment=demo_multimodal", "data.sizes={eng:240,fra:120,deu:60}", "data.reference_size=64",
      "progress=false", "logger=csv", "trainer.enable_progress_bar=false",
      "run.global_batch_size=16", "loader.micro_batch_size=16", "validation.documents_per_source=8",
      "model.image_tower.n_layers=1", "model.text_tower.n_layers=1", f"run.total_steps={STEPS}",
      "trainer.log_every_n_steps=1", "checkpoint.every_n_steps=2", "evaluation.every_n_steps=null"]
LM = ["experiment=demo", "run.total_steps=2", "run.global_batch_size=8", "loader.micro_batch_size=8",
      "logger=csv", "trainer.enable_progress_bar=false", "progress=false", "trainer.log_every_n_steps=1",
      "validation.documents_per_source=2", "evaluation.every_n_steps=null"]


@pytest.fixture(scope="module")
def mm_cache(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "accounting_mm_cache"


def _mm(compose_config, cache, out: Path, *overrides: str) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # float32 CPU reductions group by thread count
    try:
        return train(compose_config([*MM, f"cache_dir={cache}", f"output_dir={out}", *overrides]))
    finally:
        torch.set_num_threads(threads)


def _rows(out: Path, version: int = 0) -> list[dict]:
    with open(out / "csv" / f"version_{version}" / "metrics.csv", newline="") as stream:
        return list(csv.DictReader(stream))


def _losses(out: Path, version: int = 0) -> list[float]:
    return [float(r["train/loss"]) for r in _rows(out, version) if r.get("train/loss")]


def _counts(record: dict) -> dict:
    return {name: (s["samples_seen"], s["tokens_seen"]) for name, s in record["sources"].items()}


def _compose(overrides):
    from pipeline.config.compose import compose_config

    return compose_config(overrides)


@pytest.fixture(scope="module")
def mm_full_run(tmp_path_factory, mm_cache):
    out = tmp_path_factory.mktemp("mm_full")
    record = _mm(_compose, mm_cache, out)
    assert record["status"] == "completed" and record["global_steps"] == STEPS
    return out, record


def test_multimodal_resume_equals_the_uninterrupted_run(mm_full_run, compose_config, mm_cache, tmp_path):
    full_out, full = mm_full_run
    out = tmp_path / "halves"
    first = _mm(compose_config, mm_cache, out, "+trainer.max_steps=2")
    assert first["global_steps"] == 2
    second = _mm(compose_config, mm_cache, out, "ckpt_path=last")
    assert second["status"] == "completed" and second["global_steps"] == STEPS
    assert sum(s["samples_seen"] for s in second["sources"].values()) == 16 * STEPS
    assert _counts(second) == _counts(full)
    assert second["tokens_seen_total"] == full["tokens_seen_total"]
    full_losses = _losses(full_out)
    assert len(full_losses) == STEPS
    assert _losses(out, 0) + _losses(out, 1) == full_losses  # bit for bit


def test_multimodal_allow_mismatch_continues_with_the_new_mixture(compose_config, mm_cache, tmp_path):
    out = tmp_path / "mismatch"
    _mm(compose_config, mm_cache, out, "+trainer.max_steps=2")
    record = _mm(compose_config, mm_cache, out, "ckpt_path=last", "mixture=proportional",
                 "resume.allow_mismatch=true")
    assert record["status"] == "completed" and record["global_steps"] == STEPS
    # Same sources: the per-source totals carry over (2 steps before, 2 after, 16 rows each).
    assert sum(s["samples_seen"] for s in record["sources"].values()) == 16 * STEPS
    assert record["mixture"]["stages"][0]["_target_"].endswith("Proportional")


def _data_metric_kinds(rows: list[dict]) -> set[str]:
    """`data/*` metric names with the source part replaced: data/prob/lang=x -> data/prob/<source>."""
    names = {key for row in rows for key, value in row.items() if key.startswith("data/") and value}
    return {re.sub(r"/lang=[^/]+$", "/<source>", key) for key in names if not key.startswith("data/m4_")}


def test_both_families_log_the_same_data_metrics(mm_full_run, compose_config, demo_data, tmp_path):
    full_out, _ = mm_full_run
    lm_out = tmp_path / "lm"
    train(compose_config([*LM, f"cache_dir={demo_data[0].cache_dir}", f"output_dir={lm_out}"]))
    lm, mm = _data_metric_kinds(_rows(lm_out)), _data_metric_kinds(_rows(full_out))
    expected = {"data/tokens_total", "data/tokens/<source>", "data/samples/<source>", "data/prob/<source>",
                "data/loss_weight/<source>", "data/epochs/<source>"}
    assert lm == expected
    assert mm == expected
