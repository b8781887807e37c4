"""Turn a sweep (Hydra multirun) directory into one table.

    mixpipe-collect multirun/2026-11-23/10-00-00 --out sweep.csv

Writes CSV and parquet (same stem): one row per run and source with the run's parameters
(Hydra overrides as `override.*` columns), tokens, FLOPs (6 N D), losses and metrics, and
status; failed or unfinished runs are listed, not fatal. In a checkout,
`python scripts/collect_sweep.py` runs the same.

    # and the mean validation loss of groups of sources per run (also <stem>_groups.csv)
    mixpipe-collect SWEEP --group high=eng,afr,ara --group low=tzl,swg,gsw
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.evaluation.sweeps import collect, group_means, summarize
from pipeline.storage.atomic import atomic_write


def parse_group(text: str) -> tuple[str, list[str]]:
    name, sep, sources = text.partition("=")
    if not sep or not name:
        raise ValueError(f"--group {text!r}: expected NAME=source1,source2,...")
    return name, [s.strip() for s in sources.split(",") if s.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "sweep_dir", type=Path, help="multirun directory (or any tree of run directories)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output CSV path (default: <sweep_dir>/sweep.csv)"
    )
    parser.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="NAME=SRC,SRC,...",
        help="print the mean source_val_loss of these sources per run (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        groups = dict(parse_group(text) for text in args.group)
        frame = collect(args.sweep_dir)
        table = group_means(frame, groups) if groups and not frame.empty else None
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if frame.empty:
        print(f"error: no run directories under {args.sweep_dir}", file=sys.stderr)
        return 2
    out = args.out or args.sweep_dir / "sweep.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda stream: frame.to_csv(stream, index=False))
    atomic_write(out.with_suffix(".parquet"), lambda stream: frame.to_parquet(stream, index=False), binary=True)
    print(summarize(frame))
    print(f"wrote {out} and {out.with_suffix('.parquet')} ({len(frame)} rows)")
    if table is not None:
        group_path = out.with_name(f"{out.stem}_groups.csv")
        atomic_write(group_path, table.to_csv)
        print("\nmean source_val_loss per group (every source counts once):")
        # Print the parameters that vary across runs (the CSV keeps them all).
        varying = [c for c in table.columns if c.startswith("override.") and table[c].nunique() > 1]
        shown = table[varying + list(groups)].rename(columns=lambda c: c.removeprefix("override."))
        print(shown.to_string(float_format=lambda v: f"{v:.4f}"))
        print(f"wrote {group_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
