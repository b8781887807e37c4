"""Turn a sweep (Hydra multirun) directory into one table.

    python scripts/collect_sweep.py multirun/2026-11-23/10-00-00 --out sweep.csv

Writes CSV and parquet (same stem): one row per run and source with the run's parameters
(Hydra overrides as `override.*` columns), tokens, FLOPs (6 N D), losses and metrics, and
status; failed or unfinished runs are listed, not fatal.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.sweeps import collect, summarize  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, help="multirun directory (or any tree of run directories)")
    parser.add_argument("--out", type=Path, default=None, help="output CSV path (default: <sweep_dir>/sweep.csv)")
    args = parser.parse_args(argv)
    try:
        frame = collect(args.sweep_dir)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if frame.empty:
        print(f"error: no run directories under {args.sweep_dir}", file=sys.stderr)
        return 2
    out = args.out or args.sweep_dir / "sweep.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False)
    frame.to_parquet(out.with_suffix(".parquet"), index=False)
    print(summarize(frame))
    print(f"wrote {out} and {out.with_suffix('.parquet')} ({len(frame)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
