"""Where the Hydra configs are: inside an installed wheel, or the checkout's `conf/`.

A wheel ships the repository's top-level `conf/` as `pipeline/conf/` (pyproject.toml maps it);
in a checkout (also an editable install) the same files are `<repo>/conf/`. Every entry
(`python -m pipeline.train`, `mixpipe-*`, scripts, tests) asks this module, so the two layouts
can never disagree about which configs a run composed.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]  # pipeline/


def config_dir() -> Path:
    """Absolute path of the folder holding `config.yaml` and the config groups."""
    for candidate in (_PACKAGE / "conf", _PACKAGE.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"no Hydra configs found: neither {_PACKAGE / 'conf'} (installed wheel) nor "
        f"{_PACKAGE.parent / 'conf'} (checkout) holds config.yaml; reinstall mixpipe")


CONFIG_DIR = str(config_dir())
