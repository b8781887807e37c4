"""The package as users install it: a wheel in a fresh environment, console scripts, completion.

* `pyproject.toml` lists every package folder (discovery cannot map `conf/` to `pipeline/conf`,
  so the list is explicit and this test keeps it complete).
* A wheel (not editable) installed into a new virtual environment built from requirements.lock
  trains the demo from a folder outside the checkout, with the configs shipped in the wheel,
  and its `mixpipe-*` console scripts start.
* Hydra's bash completion, installed as the README says, completes `mixpipe-train` overrides.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
UV = BIN / "uv"
TORCH_WHEELS = Path("/opt/wheels")


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_package_folder_is_listed():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(REPO).parts)
             for top in ("pipeline", "kernels", "data_recipes") for init in (REPO / top).rglob("__init__.py")}
    assert found | {"pipeline.conf"} == listed, f"unlisted: {found - listed}; stale: {listed - found - {'pipeline.conf'}}"


def test_every_console_script_points_at_a_main():
    import importlib

    for name, target in _pyproject()["project"]["scripts"].items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory) -> Path:
    """A new venv: requirements.lock (uv, from its cache), then the wheel without dependencies."""
    if not UV.exists():
        pytest.skip(f"{UV} absent: this environment was not built by `make`")
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run([str(UV), "build", "--wheel", "--out-dir", str(root / "dist"), "--quiet", str(REPO)],
                   check=True, timeout=300)
    wheel = next((root / "dist").glob("mixpipe-*.whl"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    torch_source = (["--find-links", str(TORCH_WHEELS)] if TORCH_WHEELS.is_dir()
                    else ["--extra-index-url", "https://download.pytorch.org/whl/cpu",
                          "--index-strategy", "unsafe-best-match"])
    python = venv / "bin" / "python"
    subprocess.run([str(UV), "pip", "install", "--quiet", "--python", str(python), "--require-hashes", "-r",
                    str(REPO / "requirements.lock"), *torch_source, "--no-build-isolation-package", "deepspeed"],
                   check=True, timeout=900)
    subprocess.run([str(UV), "pip", "install", "--quiet", "--python", str(python), "--no-deps", str(wheel)],
                   check=True, timeout=300)
    return venv


def _outside(venv: Path, *command: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}:{env['PATH']}", WANDB_MODE="offline", HF_DATASETS_OFFLINE="1",
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(list(command), cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_wheel_trains_the_demo_outside_the_checkout(wheel_env, tmp_path):
    where = _outside(wheel_env, "python", "-c", "import pipeline, kernels, data_recipes; print(pipeline.__file__)",
                     cwd=tmp_path)
    assert where.returncode == 0 and str(wheel_env) in where.stdout, where.stderr  # not the checkout's
    run = _outside(wheel_env, "python", "-m", "pipeline.train", "experiment=demo", "run.total_steps=2",
                   "run.global_batch_size=4", "validation.documents_per_source=1", "logger=none",
                   "trainer.enable_progress_bar=false", "progress=false", f"output_dir={tmp_path / 'run'}",
                   f"cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert (tmp_path / "run" / "results.json").is_file()
    for script in _pyproject()["project"]["scripts"]:
        help_ = _outside(wheel_env, script, "--help", cwd=tmp_path)
        assert help_.returncode == 0, f"{script} --help: {help_.stderr[-2000:]}"


def test_bash_completion_of_mixpipe_train(tmp_path):
    if not (BIN / "mixpipe-train").exists() or not shutil.which("bash"):
        pytest.skip("mixpipe-train is not installed in this environment")
    script = """
eval "$(mixpipe-train -sc install=bash)"
COMP_LINE="mixpipe-train mixture=unim"; COMP_POINT=${#COMP_LINE}
COMP_WORDS=(mixpipe-train mixture=unim); COMP_CWORD=1
hydra_bash_completion
printf '%s\\n' "${COMPREPLY[@]}"
"""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "mixture=unimax" in done.stdout.split(), done.stdout + done.stderr
