"""Command-line tools installed as `mixpipe-*` console scripts (see pyproject.toml).

`scripts/<name>.py` in a checkout runs the same `main`.
"""
