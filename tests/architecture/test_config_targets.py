"""Every `_target_` in conf/ names an object that imports: a module move cannot leave a
config group pointing at a path that no longer exists (found at compose time otherwise only
by the one run that picks that option)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

CONF = Path(__file__).resolve().parents[2] / "conf"


def targets() -> list[tuple[str, str]]:
    found = []

    def walk(node, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "_target_" and isinstance(value, str) and "${" not in value:
                    found.append((where, value))
                walk(value, where)
        elif isinstance(node, list):
            for item in node:
                walk(item, where)

    for path in sorted(CONF.rglob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            walk(document, str(path.relative_to(CONF)))
    return found


def test_the_configs_have_targets():
    assert len(targets()) >= 15  # stages, recipes, models, strategies, loggers, tokenizer


@pytest.mark.parametrize("where, target", targets())
def test_target_imports(where, target):
    module, _, name = target.rpartition(".")
    assert module, f"conf/{where}: _target_={target!r} is not a dotted path"
    obj = importlib.import_module(module)
    assert hasattr(obj, name), f"conf/{where}: _target_={target!r}: {module} has no {name!r}"
