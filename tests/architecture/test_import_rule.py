"""The dependency rule of docs/ARCHITECTURE.md, checked on the source: every import statement
of every module (also those inside functions and under `if TYPE_CHECKING`), parsed, not run.

A layer may import the layers it is allowed (and, transitively, theirs); an edge against the
rule or any cycle between modules fails with the file and line.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "kernels", "data_recipes")

# Direct permissions; a layer may also import what its permitted layers may (transitively).
ALLOWED: dict[str, set[str]] = {
    "pipeline": set(),  # the root package's __init__ (empty)
    "kernels": set(),
    "data_recipes": set(),
    "pipeline.storage": set(),
    "pipeline.mixing": set(),
    "pipeline.scaling": set(),
    "pipeline.evaluation": {"pipeline.storage"},
    "pipeline.sampling": {"pipeline.mixing"},
    "pipeline.data": {"pipeline.sampling", "pipeline.mixing", "pipeline.storage", "data_recipes"},
    "pipeline.balance": {"pipeline.data", "pipeline.mixing"},
    "pipeline.models": {"pipeline.data", "pipeline.evaluation", "kernels"},
    "pipeline.training": {"pipeline.data", "pipeline.models"},
    "pipeline.config": {"pipeline.balance", "pipeline.training", "pipeline.scaling"},
    # Entries: the apps users run (train, prepare, report, cli/*); they import config and
    # training, and each other (train and report reuse `prepare`).
    "pipeline.entry": {"pipeline.config", "pipeline.training"},
}
ENTRIES = ("pipeline.train", "pipeline.prepare", "pipeline.report", "pipeline.cli")


def layer_of(module: str) -> str:
    """`pipeline.data.corpus` -> `pipeline.data`; entries -> `pipeline.entry`."""
    if module in ENTRIES or module.startswith("pipeline.cli."):
        return "pipeline.entry"
    parts = module.split(".")
    return parts[0] if parts[0] != "pipeline" else ".".join(parts[:2])


@cache
def permitted(layer: str) -> frozenset[str]:
    closure = set(ALLOWED[layer])
    for other in ALLOWED[layer]:
        closure |= permitted(other)
    return frozenset(closure)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if "conf" not in path.relative_to(REPO).parts:
                found[module_name(path)] = path
    return found


def imported(path: Path, module: str, known: set[str]) -> list[tuple[str, int]]:
    """(module imported, line) for every import of the project's own modules in `path`."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    edges = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from pipeline.x import y`: y is a module when it is one, else a name in x.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import pipeline.a.b.C` -> the module pipeline.a.b
                name = name.rpartition(".")[0]
            if name and name.split(".")[0] in PACKAGES:
                edges.append((name, node.lineno))
    return edges


def import_graph() -> dict[str, list[tuple[str, int]]]:
    found = modules()
    return {module: imported(path, module, set(found)) for module, path in found.items()}


def test_every_layer_is_declared():
    undeclared = sorted({layer_of(m) for m in modules()} - set(ALLOWED))
    assert not undeclared, f"modules outside any declared layer: {undeclared} (add them to ALLOWED and ARCHITECTURE.md)"


def test_imports_follow_the_dependency_rule():
    found = modules()
    broken = []
    for module, edges in import_graph().items():
        layer = layer_of(module)
        for target, line in edges:
            target_layer = layer_of(target)
            if target_layer == layer or target_layer in permitted(layer):
                continue
            broken.append(f"{found[module].relative_to(REPO)}:{line}: {layer} may not import {target} ({target_layer})")
    assert not broken, "imports against the rule in docs/ARCHITECTURE.md:\n" + "\n".join(broken)


def test_no_import_cycles():
    graph = {m: sorted({t for t, _ in edges if t != m}) for m, edges in import_graph().items()}
    # Package __init__ modules re-export their children; the child -> package edge is not
    # a cycle as long as children import siblings, not the package, which the rule enforces.
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in graph.get(node, []):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*stack[stack.index(target):], target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("source, target, allowed", [
    ("pipeline.mixing.base", "pipeline.sampling.sampler", False),
    ("pipeline.sampling.sampler", "pipeline.mixing.plan", True),
    ("pipeline.data.datamodule", "pipeline.sampling.sampler", True),
    ("pipeline.data.image_text", "pipeline.balance.multimodal", False),
    ("pipeline.models.lm", "kernels", True),
    ("pipeline.training.callbacks", "pipeline.models.lm", True),
    ("pipeline.training.callbacks", "pipeline.config.data", False),
    ("pipeline.config.data", "pipeline.balance.multimodal", True),
    ("kernels.flce", "pipeline.models.losses", False),
    ("pipeline.train", "pipeline.training.assemble", True),
])
def test_the_rule_itself(source, target, allowed):
    """The checker's verdicts on known edges, so a broken checker cannot pass silently."""
    layer, target_layer = layer_of(source), layer_of(target)
    assert (target_layer == layer or target_layer in permitted(layer)) is allowed


def test_the_parser_sees_every_kind_of_import(tmp_path):
    """Imports inside functions, under TYPE_CHECKING and relative ones are edges too."""
    source = tmp_path / "pipeline" / "mixing" / "probe.py"
    source.parent.mkdir(parents=True)
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import base\n"
        "if TYPE_CHECKING:\n    from pipeline.data.corpus import PreparedCorpus\n"
        "def f():\n    import pipeline.sampling.sampler\n    from ..training import callbacks\n")
    known = {"pipeline.mixing.base", "pipeline.data.corpus", "pipeline.sampling.sampler",
             "pipeline.training", "pipeline.training.callbacks"}
    edges = imported(source, "pipeline.mixing.probe", known)
    assert [name for name, _ in edges] == ["pipeline.mixing.base", "pipeline.data.corpus",
                                           "pipeline.sampling.sampler", "pipeline.training.callbacks"]


def test_architecture_doc_names_every_module():
    """docs/ARCHITECTURE.md's tree names every module (by file stem), so it cannot go stale."""
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    missing = sorted(str(path.relative_to(REPO)) for module, path in modules().items()
                     if module.startswith("pipeline") and path.stem != "__init__" and path.stem not in text)
    assert not missing, f"docs/ARCHITECTURE.md does not mention: {missing}"
