"""Checkout shim for `mixpipe-consolidate` (the code is `pipeline/cli/consolidate_checkpoint.py`): `python scripts/consolidate_checkpoint.py --help`."""

import sys

from pipeline.cli.consolidate_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
