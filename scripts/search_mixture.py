"""Checkout shim for the mixture search (the code is `pipeline/cli/search_mixture.py`): `python scripts/search_mixture.py --help`."""

import sys

from pipeline.cli.search_mixture import main

if __name__ == "__main__":
    sys.exit(main())
