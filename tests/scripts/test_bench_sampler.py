"""Smoke test of scripts/bench_sampler.py: a --quick run, its table and its JSON."""

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "bench_sampler.py"


def run_quick(tmp_path: Path, *extra: str) -> tuple[str, dict]:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--cache-dir", str(tmp_path / "cache"),
         "--json", str(out), *extra],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, json.loads(out.read_text(encoding="utf-8"))


def check(stdout: str, data: dict, modes=("exact", "stochastic")) -> None:
    for mode in modes:
        assert f"ratio ours {mode} e2e / iterable interleave:" in stdout
        assert f"ratio ours {mode} e2e / map-style interleave (build excluded):" in stdout
    assert "goals:" in stdout and ("PASS" in stdout or "MISS" in stdout)

    results = data["results"]
    keys = ["map_build_s", "map_rows", "map_rows_incl_build", "map_batched", "iterable_build_s",
            "iterable_rows", "iterable_first_ms"]
    for mode in modes:
        keys += [f"ours_{mode}_index_rate", f"ours_{mode}_e2e", f"ours_{mode}_build_s",
                 f"ours_{mode}_resume_worst_ms", f"ours_{mode}_resume_ms@1000000"]
    keys += [k for k in results if k.startswith("iterable_resume_ms@")]
    assert len([k for k in results if k.startswith("iterable_resume_ms@")]) == 2
    for key in keys:
        median = results[key]["median"]
        assert math.isfinite(median) and median > 0, (key, results[key])
        assert results[key]["samples"] and all(s > 0 for s in results[key]["samples"])
    for mode in modes:
        for name in ("e2e_vs_iterable", "e2e_vs_map", "e2e_vs_map_incl_build", "resume_speedup"):
            ratio = data["ratios"][f"{mode}_{name}"]["value"]
            assert math.isfinite(ratio) and ratio > 0
        for goal in (f"{mode}_e2e_vs_iterable", f"{mode}_e2e_vs_map", f"{mode}_index_rate",
                     f"{mode}_resume"):
            assert isinstance(data["goals"][goal]["pass"], bool)
            assert data["goals"][goal]["value"] > 0
    assert data["info"]["iterable_resume_exact"] is True


def test_quick_run_prints_ratios_and_writes_json(tmp_path):
    stdout, data = run_quick(tmp_path)
    check(stdout, data)
    assert data["info"]["num_sources"] >= 50


def test_quick_run_falls_back_to_synthetic_sources(tmp_path):
    stdout, data = run_quick(tmp_path, "--data", str(tmp_path / "absent"), "--modes", "exact")
    check(stdout, data, modes=("exact",))
    assert "SYNTHETIC" in stdout
    assert data["info"]["num_sources"] == 60
    assert data["info"]["docs_max"] >= 100 * data["info"]["docs_min"]


def test_rejects_bad_batch_sizes():
    argv = ["--global-batch", "1000", "--micro-batch", "256"]
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "multiple of --micro-batch" in proc.stderr
