"""A real 2x2 multirun collected into one table; holes are reported, not fatal."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline.sweeps import collect, summarize

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def multirun(tmp_path_factory, demo_data):
    sweep_dir = tmp_path_factory.mktemp("multirun")
    command = [
        sys.executable, "-m", "pipeline.train", "-m", "experiment=demo",
        "mixture=proportional,cooldown", "run.total_steps=2,4", "run.global_batch_size=8",
        "loader.micro_batch_size=8", "logger=none", "trainer.enable_progress_bar=false",
        "progress=false", "validation.documents_per_source=1", f"cache_dir={demo_data[0].cache_dir}",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep_dir


def test_collects_one_row_per_run_and_source(multirun, tmp_path):
    frame = collect(multirun)
    runs = frame.drop_duplicates("run")
    assert len(runs) == 4 and set(runs["status"]) == {"completed"}
    assert set(runs["override.mixture"]) == {"proportional", "cooldown"}
    assert set(runs["override.run.total_steps"]) == {"2", "4"}
    assert len(frame) == 4 * 37  # 37 languages in the demo
    completed = frame[frame["status"] == "completed"]
    assert (completed["flops"] == 6 * completed["num_parameters"] * completed["tokens_seen_total"]).all()
    per_run_tokens = completed.groupby("run")["tokens_seen"].sum()
    assert (per_run_tokens.values == completed.groupby("run")["tokens_seen_total"].first().values).all()
    assert completed["source_val_loss"].notna().all()

    out = tmp_path / "sweep.csv"
    result = subprocess.run([sys.executable, "scripts/collect_sweep.py", str(multirun), "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "4 run(s): 4 completed" in result.stdout
    assert len(pd.read_csv(out)) == len(pd.read_parquet(out.with_suffix(".parquet"))) == 4 * 37


def test_failed_and_unfinished_runs_are_reported(multirun, tmp_path):
    import shutil

    sweep = tmp_path / "sweep"
    shutil.copytree(multirun, sweep)
    (sweep / "0" / "results.json").unlink()  # a run that never finished
    (sweep / "1" / "results.json").write_text("{ not json")  # a torn results file
    frame = collect(sweep)
    statuses = frame.drop_duplicates("run").set_index("run")["status"].to_dict()
    assert statuses["0"] == "unfinished" and statuses["1"] == "unreadable"
    assert list(statuses.values()).count("completed") == 2
    text = summarize(frame)
    assert "1 unfinished" in text and "1 unreadable" in text and "0: unfinished" in text


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        collect(tmp_path / "nope")
    result = subprocess.run([sys.executable, "scripts/collect_sweep.py", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "no run directories" in result.stderr
