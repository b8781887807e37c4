"""Checkout shim for `mixpipe-sbatch` (the code is `pipeline/cli/make_sbatch.py`): `python scripts/make_sbatch.py --help`."""

import sys

from pipeline.cli.make_sbatch import main

if __name__ == "__main__":
    sys.exit(main())
