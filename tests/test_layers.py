"""The layers import downward only: learners never import actors, the runtime or the tools; the
runtime (cluster/, actors/, envs/) never imports the offline tools (saferl/tools/)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from saferl.config import REPO_ROOT

FORBIDDEN = {"learners": ("saferl.actors", "saferl.cluster", "saferl.tools"),
             "actors": ("saferl.cluster", "saferl.tools"),
             "envs": ("saferl.cluster", "saferl.tools"),
             "cluster": ("saferl.tools",)}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_imports_only_the_layers_below_it(layer):
    bad = [f"{path.relative_to(REPO_ROOT)}: {name}" for path in sorted((REPO_ROOT / layer).rglob("*.py"))
           for name in imported_modules(path) if name.startswith(FORBIDDEN[layer])]
    assert not bad, bad
