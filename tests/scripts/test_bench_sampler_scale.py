"""Smoke test of scripts/bench_sampler_scale.py: a scaled-down --quick run, its table and its
JSON (every figure present and finite; no timing is asserted)."""

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "bench_sampler_scale.py"
CASE_KEYS = ("build_s", "build_peak_mib", "us_per_example_w1", "us_per_example_w8", "us_per_example_w64",
             "w64_over_w1", "resume_s")
RESTART_KEYS = ("wall_s", "startup_s", "import_s", "restart_s", "corpus_s")


def test_quick_run_prints_the_table_and_writes_finite_json(tmp_path):
    out = tmp_path / "scale.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--sources", "10", "--examples", "2048",
         "--restart-sources", "12", "--cache-dir", str(tmp_path / "cache"), "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for heading in ("us/ex W=1", "us/ex W=64", "W=64/W=1", "build peak MiB", "resume s", "restart work s",
                    "interpreter + imports s", "of which PreparedCorpus.load s", "goals:"):
        assert heading in proc.stdout
    payload = json.loads(out.read_text(encoding="utf-8"))
    cases = payload["cases"]
    assert {(c["schedule"], c["mode"]) for c in cases} == {(s, m) for s in ("temperature", "cooldown")
                                                           for m in ("exact", "stochastic")}
    for case in cases:
        for key in CASE_KEYS:
            assert math.isfinite(case[key]) and case[key] >= 0, (case, key)
    assert {r["mode"] for r in payload["restarts"]} == {"exact", "stochastic"}
    for restart in payload["restarts"]:
        assert restart["sources"] == 12
        for key in RESTART_KEYS:
            assert math.isfinite(restart[key]) and restart[key] >= 0, (restart, key)
    goals = payload["goals"]
    assert len(goals) == len(cases) + len(payload["restarts"])
    assert all(isinstance(goal["pass"], bool) and goal["value"] is not None for goal in goals.values())
    assert sum(line.startswith(("  PASS", "  MISS")) for line in proc.stdout.splitlines()) == len(goals)
