"""scripts/bench_harness.py: statistics, timing, goals, tables and strict JSON of the benchmarks,
and the scripts' use of it (no sys.path bootstraps, every benchmark starts)."""

import ast
import importlib.util
import json
import math
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
BENCHMARKS = [*sorted(p.name for p in SCRIPTS.glob("bench_*.py") if p.name != "bench_harness.py"),
              "m4_end_to_end.py"]


def _load_harness():
    """The module as the scripts see it (`import bench_harness` with scripts/ on sys.path[0]),
    loaded from its file so that scripts/ stays off the test session's sys.path."""
    spec = importlib.util.spec_from_file_location("bench_harness", SCRIPTS / "bench_harness.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_harness", module)
    spec.loader.exec_module(module)
    return module


bh = _load_harness()


def test_stats_median_spread_and_iqr():
    stats = bh.summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (stats.median, stats.min, stats.max, stats.iqr) == (3.0, 1.0, 5.0, 2.0)
    assert bh.summarize([7.0]).iqr == 0.0
    assert math.isnan(bh.summarize([]).median)
    assert bh.summarize([1, 3]).as_json() == {"median": 2.0, "min": 1.0, "max": 3.0, "iqr": 1.0,
                                              "samples": [1.0, 3.0]}


def test_measure_warms_up_syncs_and_frees_each_result_before_the_next_call():
    class Output:
        pass

    calls, syncs, alive_at_call = [], [], []
    previous = [None]

    def step():
        alive_at_call.append(previous[0] is not None and previous[0]() is not None)
        out = Output()
        previous[0] = weakref.ref(out)
        calls.append(1)
        return out

    stats = bh.measure(step, repeats=3, warmup=2, sync=lambda: syncs.append(1))
    assert len(calls) == 5 and len(syncs) == 5 and len(stats.samples) == 3
    assert all(s >= 0 for s in stats.samples)
    assert not any(alive_at_call)  # one call's output is gone before the next call starts
    with pytest.raises(ValueError, match="repeats >= 1"):
        bh.measure(step, repeats=0)


def test_timed_returns_the_result_and_seconds():
    result, seconds = bh.timed(sum, [1, 2, 3])
    assert result == 6 and seconds >= 0


def test_ratio_is_none_without_a_usable_baseline():
    assert bh.ratio(3.0, 2.0) == 1.5
    assert bh.ratio(3.0, 0) is None and bh.ratio(None, 2.0) is None and bh.ratio(1.0, None) is None
    assert bh.ratio(math.nan, 2.0) is None


@pytest.mark.parametrize(("value", "direction", "passed"), [
    (4.9, "<", True), (5.0, "<", False), (5.0, "<=", True), (5.1, "<=", False),
    (5.1, ">", True), (5.0, ">", False), (5.0, ">=", True), (4.9, ">=", False),
    (math.nan, ">=", False), (None, "<", False),
])
def test_goal_directions(value, direction, passed):
    goal = bh.Goal("g", "g", value, 5.0, direction)
    assert goal.passed is passed and goal.verdict == ("PASS" if passed else "MISS")
    assert goal.as_json()["pass"] is passed


def test_goal_rejects_an_unknown_direction():
    with pytest.raises(ValueError, match="'=>'"):
        bh.Goal("g", "g", 1.0, 5.0, "=>")


def test_render_goals_lists_verdicts_values_and_a_summary():
    text = bh.render_goals([bh.Goal("a", "speed-up >= 20x", 45.4, 20.0, ">=", unit="x"),
                            bh.Goal("b", "resume < 100 ms", 120.0, 100.0, "<", unit="ms", note="worst")])
    assert text.splitlines() == ["goals:", "  PASS  speed-up >= 20x: 45.40x", "  MISS  resume < 100 ms: 120.0 ms (worst)",
                                 "  1 of 2 goals met"]


def test_fmt_follows_the_unit():
    assert bh.fmt(2652633.4, "samples/s") == "2,652,633"
    assert (bh.fmt(0.0791, "s"), bh.fmt(3.594, "ms"), bh.fmt(25.53, "ms")) == ("0.079", "3.59", "25.5")
    assert bh.fmt(None) == "n/a" and bh.fmt(math.nan) == "n/a"
    assert bh.fmt_value(1.5, "x") == "1.50x" and bh.fmt_value(3.0, "ms") == "3.00 ms"
    assert bh.fmt_ratio(664.2, ".0f") == "664x" and bh.fmt_ratio(None) == "n/a"


def test_table_aligns_formats_and_renders_markdown():
    rows = [["ddp", 1234567, 0.5, None], ["deepspeed_zero3", 12, 12.25, "x"]]
    text = bh.table(["strategy", "params", "save s", "note"], rows, formats={"save s": ".3f"})
    assert text.splitlines() == ["strategy            params  save s  note",
                                 "ddp              1,234,567   0.500  -",
                                 "deepspeed_zero3         12  12.250  x"]
    markdown = bh.table(["quantity", "value"], [["a", 0.25]], formats={"value": "+.4f"}, markdown=True)
    assert markdown.splitlines() == ["| quantity | value |", "| --- | ---: |", "| a | +0.2500 |"]
    assert bh.table(["a", "b"], [["1", "2"]], align="<>").splitlines()[1] == "1  2"
    with pytest.raises(ValueError, match="2 cells for 3 columns"):
        bh.table(["a", "b", "c"], [[1, 2]])


def test_write_json_is_strict(tmp_path):
    payload = {"nan": math.nan, "inf": [math.inf, -math.inf], "np": np.float32(0.5), "arr": np.arange(3),
               "flag": np.bool_(True), "path": tmp_path, "stats": bh.summarize([1.0]), 7: (1, 2)}
    path = bh.write_json(tmp_path / "sub" / "out.json", payload)

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    data = json.loads(path.read_text(), parse_constant=refuse)
    assert data == {"nan": None, "inf": [None, None], "np": 0.5, "arr": [0, 1, 2], "flag": True,
                    "path": str(tmp_path), "stats": {"median": 1.0, "min": 1.0, "max": 1.0, "iqr": 0.0,
                                                     "samples": [1.0]}, "7": [1, 2]}
    assert json.loads(bh.dumps({"a": math.nan})) == {"a": None}


def test_machine_describes_python_and_given_versions():
    info = bh.machine(numpy=np.__version__)
    line = bh.describe_machine(info)
    assert info["cpus"] >= 1 and f"Python {info['python']}" in line and f"numpy {np.__version__}" in line


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_peak_rss_sees_a_64_mib_allocation():
    tracker = bh.PeakRss().start()
    block = b"x" * (64 * 2**20)  # written, so resident
    extra, method = tracker.extra_bytes()
    del block
    assert extra >= 48 * 2**20, (extra, method)


def test_harness_needs_only_the_standard_library():
    """bench_kernels.py's driver imports it in the CCE venv, where the project does not import."""
    tree = ast.parse((SCRIPTS / "bench_harness.py").read_text())
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module}
    assert modules <= set(sys.stdlib_module_names) | {"__future__"}, modules - set(sys.stdlib_module_names)


@pytest.mark.parametrize("script", sorted(p.name for p in SCRIPTS.glob("*.py")))
def test_no_script_edits_sys_path(script):
    """The project is installed (editable); scripts/ is sys.path[0] when a script runs."""
    assert "sys.path.insert" not in (SCRIPTS / script).read_text()


@pytest.mark.parametrize("script", BENCHMARKS)
def test_benchmark_uses_the_harness_and_starts(script):
    assert "from bench_harness import" in (SCRIPTS / script).read_text()
    proc = subprocess.run([sys.executable, str(SCRIPTS / script), "--help"], cwd=REPO.parent,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]
