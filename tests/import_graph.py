"""What a Python file imports, read with ``ast`` (nothing is run): for the layout checks that keep
test modules out of each other (tests/test_layout.py) and out of the benchmarks
(tests/test_benchmarks_smoke.py), and the project's packages free of import cycles
(:func:`package_graph`, :func:`find_cycle`)."""

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


def package_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """module -> the project modules it imports, over every ``.py`` file of ``packages`` (folders
    of ``root``); ``pkg/__init__.py`` is module ``pkg``. An import of a name inside a module
    (``from a.b import f``) counts as an import of ``a.b``; function-level and TYPE_CHECKING
    imports count too (they are edges of the design even when Python defers them)."""
    files = {p: ".".join(p.relative_to(root).with_suffix("").parts) for pkg in packages
             for p in sorted((root / pkg).rglob("*.py"))}
    mods = {m.removesuffix(".__init__") for m in files.values()}
    graph: dict[str, set[str]] = {}
    for path, m in files.items():
        m = m.removesuffix(".__init__")
        deps = graph.setdefault(m, set())
        for _, name in imported_modules(path, root):
            if name.startswith(".") or not name:
                continue
            while name and name not in mods:
                name = name.rpartition(".")[0]
            if name and name != m:
                deps.add(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as ``[a, b, ..., a]``, or ``None`` (depth-first)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return [*path[path.index(d):], d]
            if d not in state and (found := visit(d, [*path, d])):
                return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m, [m])):
            return found
    return None
