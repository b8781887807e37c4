"""Install time of the environment: the locked uv install (`make`) against the unlocked pip one.

    .venv/bin/python scripts/bench_install.py --repeats 1

Each case builds a new virtual environment in a temporary folder and installs the project with
its `dev` extra, as the Makefile does:

* `pip, unlocked, cold` (the install before requirements.lock): `pip install torch==2.13.0`, then
  `pip install -e '.[dev]'` resolving every other version afresh, with pip's cache disabled;
* `uv, locked, cold`: the Makefile's own recipe (`make VENV=<new folder> <folder>/.installed`:
  `uv pip install --require-hashes -r requirements.lock`, then the project with `--no-deps`)
  into an empty uv cache (downloads and the deepspeed build included);
* `uv, locked, warm`: the same with the cache the cold run filled (what a second `make`, a CI
  rerun or a new clone on the same machine pays).

Prints wall seconds per case (median over repeats) and ratios to the pip install.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_harness import REPO, ratio, summarize, table, timed


def _run(*command: str, env: dict | None = None) -> None:
    subprocess.run(list(command), check=True, env=env, stdout=subprocess.DEVNULL, timeout=3600)


def pip_unlocked(root: Path, cache: Path) -> None:
    venv = root / "venv"
    _run(sys.executable, "-m", "venv", str(venv))
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-cache-dir"]
    _run(*pip, "torch==2.13.0")
    _run(*pip, "-e", f"{REPO}[dev]")


def uv_locked(root: Path, cache: Path) -> None:
    """What `make` pays: the Makefile's own venv recipe, pointed at a new folder and uv cache."""
    venv = root / "venv"
    _run("make", "-s", "-C", str(REPO), f"VENV={venv}", f"{venv}/.installed",
         env={**os.environ, "UV_CACHE_DIR": str(cache)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip-pip", action="store_true", help="only the uv cases (the pip case takes minutes)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    times: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as scratch:
            scratch = Path(scratch)
            uv_cache = scratch / "uv-cache"
            cases = [("uv, locked, cold", uv_locked), ("uv, locked, warm", uv_locked)]
            if not args.skip_pip:
                cases.insert(0, ("pip, unlocked, cold", pip_unlocked))
            for number, (name, install) in enumerate(cases):
                _, seconds = timed(install, scratch / f"case{number}", uv_cache)
                times.setdefault(name, []).append(seconds)
                print(f"{name}: {seconds:.1f} s", flush=True)

    medians = {name: summarize(values).median for name, values in times.items()}
    baseline = medians.get("pip, unlocked, cold")
    print()
    print(table(["case", "median s", "/ pip"],
                [[name, median, ratio(median, baseline)] for name, median in medians.items()],
                formats={"median s": ".1f", "/ pip": ".2f"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
