"""What a Python file imports, read with ``ast`` (nothing is run): for the layout checks that keep
test modules out of each other (tests/test_layout.py) and out of the benchmarks
(tests/test_benchmarks_smoke.py)."""

from __future__ import annotations

import ast
from pathlib import Path


def imported_modules(path: Path, root: Path) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of every import in ``path`` (a file under the repository ``root``),
    module level or inside functions. ``from a.b import c`` gives ``a.b.c`` (``c`` may be a module:
    ``from tests import test_x``); relative imports are resolved against the file's package."""
    package = path.resolve().relative_to(root.resolve()).parent.parts
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            module = ".".join([*base, *([node.module] if node.module else [])])
            found += [(node.lineno, f"{module}.{a.name}" if module else a.name) for a in node.names]
    return sorted(found, key=lambda hit: hit[0])  # ast.walk is breadth-first: back to file order


def imports_under(path: Path, root: Path, prefix: str) -> list[str]:
    """``"<file>:<line> imports <name>"`` for each import of ``path`` that names ``prefix`` or a
    module under it (``prefix="tests"``: ``tests``, ``tests.x``; ``prefix="tests.test_"``: any test
    module)."""
    hits = [(line, name) for line, name in imported_modules(path, root)
            if name == prefix or name.startswith(prefix if prefix.endswith("_") else prefix + ".")]
    return [f"{path.relative_to(root)}:{line} imports {name}" for line, name in hits]
