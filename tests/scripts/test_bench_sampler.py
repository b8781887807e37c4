"""Smoke test of scripts/bench_sampler.py: a --quick run, its table, its JSON and its checks.

The peer baselines (torchdata.nodes, mosaicml-streaming) live outside the project's venv
(`make bench-baselines`): the default tests make sure they are skipped with one line each; the
slow test runs them where they are installed and is skipped otherwise.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "bench_sampler.py"
BASELINES = REPO / ".cache" / "bench-baselines"
TORCHDATA_SITE = BASELINES / "site"
STREAMING_PYTHON = BASELINES / "streaming-venv" / "bin" / "python"
CHECKS = ("same_seed", "resume", "world_2", "world_3")


def run_quick(tmp_path: Path, *extra: str, env: dict | None = None, timeout: int = 120) -> tuple[str, dict]:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--cache-dir", str(tmp_path / "cache"),
         "--json", str(out), *extra],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, json.loads(out.read_text(encoding="utf-8"))


def without_baselines(tmp_path: Path) -> tuple[list[str], dict]:
    """Arguments and environment under which no peer baseline can be found."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return ["--streaming-python", str(tmp_path / "absent" / "python")], env


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
        for name in ("e2e_vs_iterable", "e2e_vs_map", "e2e_vs_map_incl_build", "resume_speedup",
                     "e2e_cpu_vs_iterable", "e2e_cpu_vs_map"):
            ratio = data["ratios"][f"{mode}_{name}"]["value"]
            assert math.isfinite(ratio) and ratio > 0
        for goal in (f"{mode}_e2e_vs_iterable", f"{mode}_e2e_vs_map", f"{mode}_index_rate",
                     f"{mode}_resume"):
            assert isinstance(data["goals"][goal]["pass"], bool)
            assert data["goals"][goal]["value"] > 0
    assert data["info"]["iterable_resume_exact"] is True

    # The check table: every sampler has a verdict per check; ours is deterministic,
    # resumable and world-size independent by construction, so it must pass all four.
    assert "determinism and elasticity checks" in stdout
    checks = data["checks"]
    assert {"interleave map-style", "interleave iterable"} <= set(checks)
    for name, cells in checks.items():
        assert set(cells) == set(CHECKS), name
        assert all(cell["verdict"] in ("PASS", "FAIL", "n/a") and cell["detail"] for cell in cells.values())
    for mode in modes:
        assert {c: checks[f"ours {mode}"][c]["verdict"] for c in CHECKS} == dict.fromkeys(CHECKS, "PASS")


def test_quick_run_prints_ratios_and_writes_json(tmp_path):
    extra, env = without_baselines(tmp_path)
    stdout, data = run_quick(tmp_path, *extra, env=env)
    check(stdout, data)
    assert data["info"]["num_sources"] >= 50
    # Absent peer baselines are skipped with one line each saying how to install them.
    assert "SKIP streaming baseline" in stdout and "make bench-baselines" in stdout
    if importlib.util.find_spec("torchdata") is None:
        assert "SKIP torchdata baseline" in stdout
    assert not any(k.startswith("streaming_") for k in data["results"])


def test_quick_run_falls_back_to_synthetic_sources(tmp_path):
    extra, env = without_baselines(tmp_path)
    stdout, data = run_quick(tmp_path, "--data", str(tmp_path / "absent"), "--modes", "exact", *extra, env=env)
    check(stdout, data, modes=("exact",))
    assert "SYNTHETIC" in stdout
    assert data["info"]["num_sources"] == 60
    assert data["info"]["docs_max"] >= 100 * data["info"]["docs_min"]


def test_rejects_bad_batch_sizes():
    argv = ["--global-batch", "1000", "--micro-batch", "256"]
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "multiple of --micro-batch" in proc.stderr


def baselines_installed() -> bool:
    """Both peer baselines as `make bench-baselines` installs them."""
    return (TORCHDATA_SITE / "torchdata").is_dir() and STREAMING_PYTHON.exists()


@pytest.mark.slow
@pytest.mark.skipif(not baselines_installed(), reason="peer baselines not installed (make bench-baselines)")
def test_quick_run_with_peer_baselines(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(TORCHDATA_SITE)}
    stdout, data = run_quick(tmp_path, "--modes", "exact", "--baselines", "all", env=env, timeout=600)
    check(stdout, data, modes=("exact",))
    assert "SKIP" not in stdout, stdout
    for name in ("torchdata", "streaming"):
        for key in (f"{name}_rows", f"{name}_first_ms", *(k for k in data["results"] if k.startswith(f"{name}_resume_ms@"))):
            assert data["results"][key]["median"] > 0, key
        for key in (f"exact_e2e_vs_{name}", f"exact_e2e_cpu_vs_{name}", f"exact_resume_speedup_{name}"):
            assert math.isfinite(data["ratios"][key]["value"]) and data["ratios"][key]["value"] > 0
        assert set(data["checks"][name]) == set(CHECKS)
        assert data["info"][f"{name}_resume_exact"] in (True, False)
    assert data["results"]["streaming_convert_s"]["median"] > 0
    assert {"torchdata", "mosaicml-streaming"} <= set(data["info"]["baseline_versions"])
