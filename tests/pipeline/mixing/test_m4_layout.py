"""M4 package layout: its modules import each other in one direction, only at module level."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import pipeline.balance.m4 as m4

PACKAGE = "pipeline.balance.m4"
ROOT = Path(m4.__file__).parent
# Each module may import only from the modules before it.
LAYERS = ["validation", "statistics", "problem", "streaming", "exact", "api", "stage"]
OUTSIDE = ("pipeline.mixing", "pipeline.storage", "pipeline.data", "pipeline.sampling")


def _pipeline_imports(tree: ast.AST) -> list[tuple[str, bool]]:
    """(imported pipeline module, at module level) for every import in the tree."""
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found += [(name, id(node) in top) for name in names if name.startswith("pipeline")]
    return found


def test_every_module_is_in_a_layer():
    assert sorted(p.stem for p in ROOT.glob("*.py") if p.stem != "__init__") == sorted(LAYERS)


@pytest.mark.parametrize("name", LAYERS)
def test_a_module_imports_only_lower_layers_at_module_level(name):
    imports = _pipeline_imports(ast.parse((ROOT / f"{name}.py").read_text()))
    below = {f"{PACKAGE}.{other}" for other in LAYERS[:LAYERS.index(name)]}
    for module, at_top in imports:
        assert at_top, f"{name}.py imports {module} inside a function"
        assert module in below or module.startswith(OUTSIDE), f"{name}.py imports {module}"


@pytest.mark.parametrize("name", LAYERS)
def test_a_module_imports_alone_in_a_fresh_interpreter(name):
    # The package __init__ (which imports every module) is bypassed, so a cycle cannot hide.
    code = (
        "import importlib, sys, types\n"
        f"package = types.ModuleType({PACKAGE!r})\n"
        f"package.__path__ = [{str(ROOT)!r}]\n"
        f"sys.modules[{PACKAGE!r}] = package\n"
        f"importlib.import_module('{PACKAGE}.{name}')\n"
        f"print(sorted(m for m in sys.modules if m.startswith('{PACKAGE}.')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    loaded = {module.rsplit(".", 1)[1] for module in ast.literal_eval(result.stdout.strip())}
    assert name in loaded and loaded <= set(LAYERS[:LAYERS.index(name) + 1])


def test_the_package_exports_its_public_names():
    for name in m4.__all__:
        assert getattr(m4, name) is getattr(importlib.import_module(getattr(m4, name).__module__), name)
    assert {"M4", "m4_keep_probabilities", "m4_statistics", "m4_subsample", "solve_sources"} <= set(m4.__all__)
