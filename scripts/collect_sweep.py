"""Checkout shim for `mixpipe-collect` (the code is `pipeline/cli/collect_sweep.py`): `python scripts/collect_sweep.py --help`."""

import sys

from pipeline.cli.collect_sweep import main

if __name__ == "__main__":
    sys.exit(main())
