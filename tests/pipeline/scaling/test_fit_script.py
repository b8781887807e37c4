"""scripts/fit_scaling_law.py end to end on a tiny synthetic CSV, in a subprocess."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.scaling import ChinchillaLaw

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "scripts" / "fit_scaling_law.py"
TRUE = {"A": 400.0, "B": 2000.0, "E": 1.7, "alpha": 0.34, "beta": 0.36}


def _run(*args):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=120
    )


def test_fit_script_writes_json_table_and_plots(tmp_path):
    rng = np.random.default_rng(0)
    N = np.exp(rng.uniform(np.log(5e7), np.log(1e10), 60))
    D = np.exp(rng.uniform(np.log(1e9), np.log(3e11), 60))
    loss = ChinchillaLaw().predict_public(TRUE, np.c_[N, D]) * np.exp(rng.normal(0, 0.005, 60))
    pd.DataFrame({"num_params": N, "train_flops": 6 * N * D, "val_loss": loss}).to_csv(
        tmp_path / "runs.csv", index=False
    )
    out = tmp_path / "out"
    r = _run(
        "--csv",
        tmp_path / "runs.csv",
        "--law",
        "chinchilla",
        "--n-col",
        "num_params",
        "--c-col",
        "train_flops",
        "--loss-col",
        "val_loss",
        "--grid-size",
        "2",
        "--bootstrap",
        "20",
        "--jobs",
        "1",
        "--budget",
        "1e21",
        "--out",
        out,
    )
    assert r.returncode == 0, r.stderr
    assert "alpha" in r.stdout and "95% CI" in r.stdout and "N_opt" in r.stdout
    res = json.loads((out / "fit.json").read_text())
    fit = res["fits"][0]
    assert abs(fit["params"]["alpha"] - 0.34) < 0.05
    lo, hi = fit["bootstrap"]["ci"]["alpha"]
    assert lo <= fit["params"]["alpha"] <= hi
    assert fit["columns"] == {"loss": "val_loss", "N": "num_params", "C": "train_flops"}
    for name in ("fit.png", "residuals.png", "frontier.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fit_script_bad_column_exits_2(tmp_path):
    pd.DataFrame({"N": [1e8] * 10, "D": [1e9] * 10, "loss": [3.0] * 10}).to_csv(
        tmp_path / "t.csv", index=False
    )
    r = _run(
        "--csv",
        tmp_path / "t.csv",
        "--law",
        "chinchilla",
        "--n-col",
        "params",
        "--d-col",
        "D",
        "--out",
        tmp_path / "o",
    )
    assert r.returncode == 2
    assert "column 'params' (--n-col) not found" in r.stderr
    assert not (tmp_path / "o" / "fit.json").exists()


def _script_module():
    import pipeline.cli.fit_scaling_law

    return pipeline.cli.fit_scaling_law


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.drop(columns="D"), "column 'D' (--d-col) not found"),
        (
            lambda d: d.assign(N=d.N.where(d.index != 3, 0.0)),
            "column 'N' (N, parameters) must be > 0, row 3",
        ),
        (
            lambda d: d.assign(D=d.D.where(d.index != 5, -1e9)),
            "column 'D' (D, tokens) must be > 0, row 5",
        ),
        (
            lambda d: d.assign(loss=d.loss.where(d.index != 2)),
            "column 'loss' (loss) has 1 NaN/missing",
        ),
        (
            lambda d: d.head(5),
            "chinchilla law has 5 parameters and needs more than 5 points, got 5",
        ),
    ],
)
def test_fit_script_bad_input_exits_2_naming_the_problem(tmp_path, capsys, mutate, message):
    frame = pd.DataFrame(
        {
            "N": np.geomspace(1e7, 1e9, 10),
            "D": np.geomspace(1e9, 1e11, 10),
            "loss": np.linspace(4, 3, 10),
        }
    )
    mutate(frame).to_csv(tmp_path / "t.csv", index=False)
    args = ["--csv", str(tmp_path / "t.csv"), "--law", "chinchilla", "--n-col", "N", "--d-col", "D"]
    assert _script_module().main([*args, "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "fit.json").exists()


def test_identical_points_are_flagged_not_determined(tmp_path):
    """Issue 11: 4 identical points gave zero-width 95% intervals and no note."""
    (tmp_path / "same.csv").write_text("x,loss\n" + "1000,3.2\n" * 4)
    out = tmp_path / "out"
    r = _run("--csv", tmp_path / "same.csv", "--law", "power", "--x-col", "x", "--loss-col", "loss",
             "--grid-size", "2", "--bootstrap", "10", "--jobs", "1", "--no-plots", "--out", out)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith(("A ", "alpha ", "E "))]
    assert len(rows) == 3 and all(line.endswith("not determined") for line in rows)
    assert "note: alpha is not determined: degenerate design" in r.stdout
    fit = json.loads((out / "fit.json").read_text())["fits"][0]
    assert sorted(fit["not_determined"]) == ["A", "E", "alpha"]
