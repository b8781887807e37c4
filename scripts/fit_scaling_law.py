"""Checkout shim for `mixpipe-fit` (the code is `pipeline/cli/fit_scaling_law.py`): `python scripts/fit_scaling_law.py --help`."""

import sys

from pipeline.cli.fit_scaling_law import main

if __name__ == "__main__":
    sys.exit(main())
