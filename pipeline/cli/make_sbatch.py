"""Print (and optionally submit) the SLURM batch script for a training config.

    mixpipe-sbatch experiment=tatoeba_lm trainer=gpu strategy=deepspeed_zero3 \
        trainer.num_nodes=2 trainer.devices=8 launch.partition=gpu launch.time=12:00:00
    mixpipe-sbatch ... --output job.sbatch --submit

Takes the same overrides as `python -m pipeline.train` plus `launch.*` (conf/launch/slurm.yaml).
Nodes and tasks per node come from trainer.num_nodes and trainer.devices; the tasks train
with exactly the overrides given here (launch.* dropped). Without --submit nothing runs:
the script goes to stdout (and to --output). In a checkout, `python scripts/make_sbatch.py`
runs the same.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from hydra.errors import HydraException

from pipeline.config.compose import compose_config
from pipeline.storage.atomic import atomic_write
from pipeline.training.identity import config_digest
from pipeline.training.slurm import is_launch_override, sbatch_script


def compose_with_launch(overrides: list[str]):
    if not any(is_launch_override(o) and o.lstrip("+").startswith("launch=") for o in overrides):
        overrides = ["launch=slurm", *overrides]
    return compose_config(overrides), overrides


def write_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda stream: stream.write(text), mode=0o755)  # an executable script


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m pipeline.train")
    parser.add_argument("--output", type=Path, help="also write the script here")
    parser.add_argument("--submit", action="store_true", help="submit with sbatch (needs --output)")
    args = parser.parse_args(argv)
    if args.submit and not args.output:
        parser.error("--submit needs --output (sbatch submits a file)")
    try:
        cfg, overrides = compose_with_launch(list(args.overrides))
        script = sbatch_script(cfg, overrides, config_digest(cfg))
    except (ValueError, HydraException) as error:
        print(f"make_sbatch: {error}", file=sys.stderr)
        return 2
    sys.stdout.write(script)
    if args.output:
        write_atomic(args.output, script)
        print(f"# written to {args.output}", file=sys.stderr)
    if args.submit:
        if shutil.which("sbatch") is None:
            print("make_sbatch: sbatch is not on PATH (not a SLURM login node?)", file=sys.stderr)
            return 2
        return subprocess.run(["sbatch", str(args.output)], check=False).returncode
    print("# not submitted (pass --output FILE --submit to submit)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
