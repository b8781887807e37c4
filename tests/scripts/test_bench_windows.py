"""Smoke test of scripts/bench_windows.py: a --quick run, its tables and its JSON.

The timings are only checked to be present and finite; the real check is the trained share:
window mode must train every token of a pass exactly once (share 1.0, labels equal to every
document's ids + <eos>), document mode less on documents longer than max_length.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "bench_windows.py"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[str, dict]:
    """(stdout, JSON) of one `--quick` run in a temporary cache."""
    tmp = tmp_path_factory.mktemp("bench_windows")
    out = tmp / "bench.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--cache-dir", str(tmp / "cache"),
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text(encoding="utf-8"))


def finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def test_window_mode_trains_every_token_once(quick_run):
    _, data = quick_run
    window, document = data["share"]["window"], data["share"]["document"]
    assert window["share"] == 1.0 and window["trained"] == window["targets"] and window["exact"] is True
    # The same corpus counted the same way: ids + <eos> of every document.
    assert window["targets"] == document["targets"] == document["tokens"] + document["documents"]
    assert 0 < document["share"] < 1.0  # --quick documents are longer than its max_length
    assert document["checked_documents"] > 0
    assert data["goals"]["window_share"]["pass"] is True


def test_tables_and_goal_lines_are_printed(quick_run):
    stdout, _ = quick_run
    for line in ("ratio window / document trained share:", "ratio window / document tokens/s, 0 workers:",
                 "ratio window / document tokens/s, 2 workers:", "window mode stage (alone)",
                 "profile of the window loader", "ratio 2 / 1 processes, token stores MB/s",
                 "GPU tokens/s", "goals:", "window mode trains >=", "target tokens/s per process"):
        assert line in stdout, line
    for model in ("lm_small", "lm_base"):
        assert f"\n{model} " in stdout
    assert stdout.count("PASS") + stdout.count("MISS") >= 2


def test_json_numbers_are_present_and_finite(quick_run):
    _, data = quick_run
    for case in ("window_w0", "window_w2", "document_w0", "document_w2"):
        for key in ("tokens_per_s", "rows_per_s"):
            stats = data["loader"][case][key]
            assert finite(stats["median"]) and stats["median"] > 0 and len(stats["samples"]) >= 2
    for stage in ("sampler", "dataset (__getitems__)", "split mapping", "window read", "step target count", "collate"):
        assert finite(data["stage_costs"][stage]["median"]) and data["stage_costs"][stage]["median"] > 0
    assert data["profile"] and all(finite(row["own_s"]) for row in data["profile"])
    prep = data["preparation"]["inproc"]
    assert finite(prep["speedup"]) and prep["speedup"] > 0
    for workers in ("1", "2"):
        assert finite(prep["series"][workers]["mb_per_s"]["median"])
    assert {g["model"] for g in data["gpu"]} == {"lm_small", "lm_base"}
    for row in data["gpu"]:
        assert row["params"] > 0 and finite(row["gpu_tokens_per_s"]) and finite(row["headroom"])
        assert row["flops_per_token"] == 6 * row["params"] + 12 * row["n_layers"] * row["d_model"] * row["length"]
    base = next(g for g in data["gpu"] if g["model"] == "lm_base")
    assert 80e6 < base["params"] < 100e6  # GPT-2 small shape at the quick vocabulary
    for goal in ("window_share", "window_rate"):
        assert isinstance(data["goals"][goal]["pass"], bool) and finite(data["goals"][goal]["value"])
    corpus = data["corpus"]
    assert corpus["documents"] > 0 and len(corpus["languages"]) >= 2


@pytest.fixture
def bench_windows(monkeypatch):
    """The script as a module (its folder on sys.path, as when it runs)."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import bench_windows

    return bench_windows


def test_without_tatoeba_the_corpus_falls_back_to_embedded_documents(tmp_path, bench_windows):
    info = bench_windows.build_corpus(tmp_path / "docs", tmp_path / "absent", languages=3, lines_per_doc=10,
                                      min_mb=0.01)
    assert info["origin"].startswith("EMBEDDED CLDR fallback") and not info["reused"]
    files = sorted((tmp_path / "docs").glob("*.txt"))
    assert [f.stem for f in files] == info["languages"] and len(files) == 3
    documents = [line for f in files for line in f.read_text(encoding="utf-8").splitlines()]
    assert len(documents) == info["documents"] and all(documents)
    assert all(len(f.read_bytes()) >= 0.01e6 for f in files)  # each file repeated up to min_mb
    again = bench_windows.build_corpus(tmp_path / "docs", tmp_path / "absent", 3, 10, 0.01)
    assert again["reused"] and again["documents"] == info["documents"]


def test_join_documents_groups_consecutive_lines_and_repeats(bench_windows):
    assert bench_windows.join_documents(["a", "b", "c"], 2, 0) == ["a b", "c"]
    assert bench_windows.join_documents(["a", "b", "c"], 2, 12) == ["a b", "c a", "b c"]  # 6 bytes, twice
